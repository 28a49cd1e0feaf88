//! What each pegaflow-node holds, learned from its KV events (docs/events.md): one task per
//! `--node-events NODE=PUB[+REPLAY]` subscribes to the node's PUB socket, decodes vLLM's
//! `KVEventBatch` and keeps the set of block keys the node holds on any tier.
//!
//! A view is *synced* once it has applied a node's `AllBlocksCleared` (batch 0 of an epoch) and
//! every batch after it. A gap (or a new epoch seen after its batch 0) is filled from the
//! node's replay socket when one is given; a view that cannot be filled stays unsynced until
//! the node's next start, and the prefix-aware choice asks `POST /api/holders` for that node
//! instead.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rmpv::Value;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

/// A node key: what the node's events name as block hashes.
pub type Key = [u8; 32];

/// How long a replay may take before the view gives up on it.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before subscribing again after the PUB connection failed.
const RETRY: Duration = Duration::from_secs(1);

/// A node's event endpoints, as `--node-events NODE=PUB[+REPLAY]` names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEndpoints {
    pub node: String,
    pub publish: String,
    pub replay: Option<String>,
}

impl NodeEndpoints {
    /// Parses `NODE=tcp://HOST:PORT[+tcp://HOST:PORT]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (node, endpoints) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}`: expected NODE=tcp://HOST:PORT[+tcp://HOST:PORT]"))?;
        if node.is_empty() || node.contains(char::is_whitespace) {
            return Err(format!(
                "`{text}`: the node id before `=` must be non-empty, without spaces"
            ));
        }
        let (publish, replay) = match endpoints.split_once('+') {
            Some((publish, replay)) => (publish, Some(replay)),
            None => (endpoints, None),
        };
        for endpoint in std::iter::once(publish).chain(replay) {
            let valid = endpoint
                .strip_prefix("tcp://")
                .and_then(|rest| rest.rsplit_once(':'))
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(format!(
                    "`{text}`: `{endpoint}` is not a ZMQ endpoint tcp://HOST:PORT"
                ));
            }
        }
        Ok(Self {
            node: node.to_owned(),
            publish: publish.to_owned(),
            replay: replay.map(str::to_owned),
        })
    }
}

/// What one node holds, by its events.
#[derive(Debug, Default)]
struct NodeView {
    epoch: Option<u64>,
    next_seq: u64,
    synced: bool,
    /// Key -> the media that hold it.
    held: HashMap<Key, HashSet<String>>,
}

/// Every subscribed node's view, shared by the subscriber tasks and the prefix-aware choice.
#[derive(Clone, Default)]
pub struct NodeViews {
    views: Arc<Mutex<HashMap<String, NodeView>>>,
}

impl NodeViews {
    /// Subscribes to every node of `nodes` in the background (tasks on the current runtime).
    pub fn subscribe(nodes: &[NodeEndpoints]) -> Self {
        let views = Self::default();
        for endpoints in nodes {
            views
                .lock()
                .insert(endpoints.node.clone(), NodeView::default());
            tokio::spawn(views.clone().follow(endpoints.clone()));
        }
        views
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeView>> {
        self.views.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many leading `keys` `node` holds on any tier; None when its view is not synced (or
    /// it is not subscribed).
    pub fn leading_held(&self, node: &str, keys: &[Key]) -> Option<u32> {
        let views = self.lock();
        let view = views.get(node).filter(|view| view.synced)?;
        Some(
            keys.iter()
                .take_while(|key| view.held.contains_key(*key))
                .count() as u32,
        )
    }

    /// Receives `endpoints`' batches for as long as the router runs.
    async fn follow(self, endpoints: NodeEndpoints) {
        loop {
            let mut sub = SubSocket::new();
            let connected = async {
                sub.connect(&endpoints.publish).await?;
                sub.subscribe("").await
            };
            if let Err(error) = connected.await {
                tracing::warn!(node = %endpoints.node, endpoint = %endpoints.publish, %error,
                               "cannot subscribe to the node's KV events; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
            tracing::info!(node = %endpoints.node, endpoint = %endpoints.publish,
                           "subscribed to the node's KV events");
            loop {
                match sub.recv().await {
                    Ok(message) => self.take(&endpoints, message).await,
                    Err(error) => {
                        tracing::warn!(node = %endpoints.node, %error, "KV event subscription lost");
                        break;
                    }
                }
            }
        }
    }

    /// One published message: applied in order, a gap filled from the replay socket first.
    async fn take(&self, endpoints: &NodeEndpoints, message: ZmqMessage) {
        let Some((seq, batch)) = decode_message(&message.into_vec()) else {
            tracing::warn!(node = %endpoints.node, "ignoring a KV event message that is not (topic, seq, KVEventBatch)");
            return;
        };
        let expected = {
            let mut views = self.lock();
            let view = views.entry(endpoints.node.clone()).or_default();
            if view.epoch != batch.epoch || seq < view.next_seq {
                // A (re)started node: everything before is void; its batches count from 0.
                *view = NodeView {
                    epoch: batch.epoch,
                    ..NodeView::default()
                };
            }
            view.next_seq
        };
        if seq > expected {
            self.replay(endpoints, expected, seq, batch.epoch).await;
        }
        let mut views = self.lock();
        let view = views.entry(endpoints.node.clone()).or_default();
        if seq > view.next_seq {
            view.synced = false;
            view.next_seq = seq;
        }
        if seq == view.next_seq {
            view.apply(&batch);
            view.next_seq = seq + 1;
        }
    }

    /// Asks the replay socket for batches `from..until` of `epoch` and applies them.
    async fn replay(&self, endpoints: &NodeEndpoints, from: u64, until: u64, epoch: Option<u64>) {
        let Some(replay) = &endpoints.replay else {
            return;
        };
        let answered = tokio::time::timeout(REPLAY_TIMEOUT, async {
            let mut dealer = DealerSocket::new();
            dealer.connect(replay).await?;
            let request = vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())];
            dealer
                .send(ZmqMessage::try_from(request).map_err(|_| zeromq::ZmqError::NoMessage)?)
                .await?;
            loop {
                let frames = dealer.recv().await?.into_vec();
                // [empty, topic, seq, payload]; the end is seq -1.
                if frames
                    .get(2)
                    .is_some_and(|seq| seq.as_ref() == (-1i64).to_be_bytes())
                {
                    return Ok::<(), zeromq::ZmqError>(());
                }
                let Some((seq, batch)) = frames.get(1..).and_then(decode_message) else {
                    continue;
                };
                let mut views = self.lock();
                let view = views.entry(endpoints.node.clone()).or_default();
                if batch.epoch == epoch && seq == view.next_seq && seq < until {
                    view.apply(&batch);
                    view.next_seq = seq + 1;
                }
            }
        })
        .await;
        match answered {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(node = %endpoints.node, %error, "KV event replay failed")
            }
            Err(_) => tracing::warn!(node = %endpoints.node, "KV event replay timed out"),
        }
    }
}

impl NodeView {
    fn apply(&mut self, batch: &Batch) {
        for event in &batch.events {
            match event {
                Event::Cleared => {
                    self.held.clear();
                    self.synced = true;
                }
                Event::Stored { medium, keys } => {
                    for key in keys {
                        self.held.entry(*key).or_default().insert(medium.clone());
                    }
                }
                Event::Removed { medium, keys } => {
                    for key in keys {
                        if let Some(media) = self.held.get_mut(key) {
                            media.remove(medium);
                            if media.is_empty() {
                                self.held.remove(key);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The parts of a `KVEventBatch` the router uses.
#[derive(Debug, PartialEq)]
struct Batch {
    epoch: Option<u64>,
    events: Vec<Event>,
}

#[derive(Debug, PartialEq)]
enum Event {
    Stored { medium: String, keys: Vec<Key> },
    Removed { medium: String, keys: Vec<Key> },
    Cleared,
}

/// `(topic, seq, payload)` -> the sequence number and the batch.
fn decode_message(frames: &[Bytes]) -> Option<(u64, Batch)> {
    let [_topic, seq, payload] = frames else {
        return None;
    };
    let seq = u64::from_be_bytes(<[u8; 8]>::try_from(seq.as_ref()).ok()?);
    Some((seq, decode_batch(payload)?))
}

/// vLLM's `[ts, events, data_parallel_rank?, epoch?]`; events of other types are skipped, and
/// hashes that are not 32 bytes (an engine's own) are not the node's keys.
fn decode_batch(payload: &[u8]) -> Option<Batch> {
    let value = rmpv::decode::read_value(&mut &payload[..]).ok()?;
    let items = value.as_array()?;
    let events = items.get(1)?.as_array()?;
    let epoch = items.get(3).and_then(Value::as_u64);
    let events = events.iter().filter_map(decode_event).collect();
    Some(Batch { epoch, events })
}

fn decode_event(value: &Value) -> Option<Event> {
    let map = value.as_map()?;
    let field = |name: &str| {
        map.iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v)
    };
    let keys = || -> Vec<Key> {
        field("block_hashes")
            .and_then(Value::as_array)
            .map(|hashes| {
                hashes
                    .iter()
                    .filter_map(|hash| Key::try_from(hash.as_slice()?).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let medium = || {
        field("medium")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    match field("type")?.as_str()? {
        "BlockStored" => Some(Event::Stored {
            medium: medium(),
            keys: keys(),
        }),
        "BlockRemoved" => Some(Event::Removed {
            medium: medium(),
            keys: keys(),
        }),
        "AllBlocksCleared" => Some(Event::Cleared),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node's golden batch (connector/tests/golden/kv_events_batch.hex, pinned by the
    /// node's encoder test): stored CPU [1;32],[2;32], removed STORAGE [3;32], cleared, epoch 7.
    const GOLDEN_BATCH_HEX: &str = include_str!("../../connector/tests/golden/kv_events_batch.hex");

    #[test]
    fn decodes_the_nodes_golden_batch() {
        let payload = hex::decode(GOLDEN_BATCH_HEX.trim()).expect("hex");
        assert_eq!(
            decode_batch(&payload),
            Some(Batch {
                epoch: Some(7),
                events: vec![
                    Event::Stored {
                        medium: "CPU".into(),
                        keys: vec![[1; 32], [2; 32]]
                    },
                    Event::Removed {
                        medium: "STORAGE".into(),
                        keys: vec![[3; 32]]
                    },
                    Event::Cleared,
                ],
            })
        );
        assert_eq!(decode_batch(b"\x93\x01"), None, "truncated");
        assert_eq!(decode_batch(&[0xc1]), None, "not msgpack");
    }

    #[test]
    fn a_block_is_held_while_any_medium_holds_it() {
        let mut view = NodeView::default();
        let stored = |medium: &str, key| Event::Stored {
            medium: medium.into(),
            keys: vec![[key; 32]],
        };
        let removed = |medium: &str, key| Event::Removed {
            medium: medium.into(),
            keys: vec![[key; 32]],
        };
        let batch = |events| Batch {
            epoch: Some(1),
            events,
        };
        view.apply(&batch(vec![
            Event::Cleared,
            stored("CPU", 1),
            stored("CPU", 2),
        ]));
        view.apply(&batch(vec![removed("CPU", 1), stored("STORAGE", 1)]));
        view.apply(&batch(vec![removed("CPU", 2)]));
        assert!(view.synced);
        assert_eq!(view.held.keys().copied().collect::<Vec<_>>(), [[1; 32]]);
        view.apply(&batch(vec![Event::Cleared]));
        assert!(view.held.is_empty());
    }

    #[test]
    fn endpoints_parse_with_and_without_replay() {
        assert_eq!(
            NodeEndpoints::parse("n1=tcp://10.0.0.1:5557+tcp://10.0.0.1:5558"),
            Ok(NodeEndpoints {
                node: "n1".into(),
                publish: "tcp://10.0.0.1:5557".into(),
                replay: Some("tcp://10.0.0.1:5558".into()),
            })
        );
        assert_eq!(
            NodeEndpoints::parse("n1=tcp://h:1").map(|e| e.replay),
            Ok(None)
        );
        for bad in [
            "tcp://h:1",
            "=tcp://h:1",
            "n1=http://h:1",
            "n1=tcp://h:1+tcp://h",
        ] {
            assert!(NodeEndpoints::parse(bad).is_err(), "{bad}");
        }
    }
}
