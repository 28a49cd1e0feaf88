//! The publisher task: gathers the pool's and the SSD tier's changes into batches, sends each
//! on the PUB socket as vLLM's three frames `(topic, seq, payload)`, keeps it for replay, and
//! answers replay requests on the ROUTER socket exactly as vLLM's `ZmqEventPublisher` does.
//!
//! Sequence numbers start at 0 in every epoch (a node start; the epoch is its start time in
//! milliseconds), and batch 0 holds only `AllBlocksCleared`. Events dropped for a full queue
//! cost a sequence number that is never sent, so subscribers see the loss as a gap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pegaflow_config::EventsConfig;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::MissedTickBehavior;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::batch::{encode_batch, KvEvent};
use super::replay::ReplayBuffer;
use super::EventSink;
use crate::metrics::Metrics;

/// Changes queued between the pool and the publisher; beyond it they are dropped and counted.
pub const QUEUE_EVENTS: usize = 65_536;

/// The sequence number vLLM's replay answer ends with (-1 as a signed 64-bit integer).
const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

/// How long one replay answer may wait on a subscriber that does not read.
const REPLAY_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Why events could not start; each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("events.{key} {endpoint}: cannot bind: {source}")]
    Bind {
        key: &'static str,
        endpoint: String,
        source: zeromq::ZmqError,
    },
}

/// Binds the sockets of `config` and starts publishing; the sink to hand the pool and the SSD
/// tier. An off sink when `events.enabled` is false.
pub async fn start(config: &EventsConfig, metrics: Arc<Metrics>) -> Result<EventSink, EventsError> {
    if !config.enabled {
        return Ok(EventSink::off());
    }
    let bind_error = |key, endpoint: &str| {
        let endpoint = endpoint.to_owned();
        move |source| EventsError::Bind {
            key,
            endpoint,
            source,
        }
    };
    let mut publish = PubSocket::new();
    publish
        .bind(&config.endpoint)
        .await
        .map_err(bind_error("endpoint", &config.endpoint))?;
    let replay = match &config.replay_endpoint {
        Some(endpoint) => {
            let mut socket = RouterSocket::new();
            socket
                .bind(endpoint)
                .await
                .map_err(bind_error("replay_endpoint", endpoint))?;
            Some(socket)
        }
        None => None,
    };
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (queue, events) = mpsc::channel(QUEUE_EVENTS);
    let lost = Arc::new(AtomicU64::new(0));
    let publisher = Publisher {
        publish,
        topic: Bytes::from(config.topic.clone().into_bytes()),
        epoch,
        next_seq: 0,
        seen_lost: 0,
        lost: lost.clone(),
        buffer: ReplayBuffer::new(usize::try_from(config.replay_buffer).unwrap_or(usize::MAX)),
        batch_max: config.batch_max,
        metrics: metrics.clone(),
    };
    tracing::info!(
        endpoint = %config.endpoint,
        replay_endpoint = config.replay_endpoint.as_deref().unwrap_or("off"),
        epoch,
        "publishing KV events"
    );
    let flush = Duration::from_millis(config.flush_ms);
    tokio::spawn(publisher.run(events, replay, flush));
    Ok(EventSink::new(queue, lost, metrics))
}

struct Publisher {
    publish: PubSocket,
    topic: Bytes,
    epoch: u64,
    next_seq: u64,
    /// `lost` as of the last batch sent.
    seen_lost: u64,
    lost: Arc<AtomicU64>,
    buffer: ReplayBuffer,
    batch_max: u64,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// Runs until every sink is gone (the pool and the SSD tier stopped), then sends what is
    /// pending. The queue is drained on a timer, never awaited: a task waiting on it would be
    /// woken by every change the pool queues, a cross-thread wake-up per evicted block.
    async fn run(
        mut self,
        mut events: mpsc::Receiver<KvEvent>,
        mut replay: Option<RouterSocket>,
        flush: Duration,
    ) {
        self.send_batch(vec![KvEvent::Cleared]).await;
        let mut tick = tokio::time::interval(flush);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if !self.drain(&mut events).await {
                        return;
                    }
                }
                request = recv_replay(&mut replay) => match request {
                    Ok(request) => {
                        if let Some(router) = replay.as_mut() {
                            self.answer_replay(router, request).await;
                        }
                    }
                    Err(error) => tracing::warn!(%error, "cannot receive a KV event replay request"),
                },
            }
        }
    }

    /// Sends everything queued, in batches of about `batch_max` blocks; false once every sink
    /// is gone.
    async fn drain(&mut self, events: &mut mpsc::Receiver<KvEvent>) -> bool {
        let mut pending = Vec::new();
        let mut weight = 0;
        let open = loop {
            match events.try_recv() {
                Ok(event) => {
                    weight += event.weight();
                    merge_into(&mut pending, event);
                    if weight >= self.batch_max {
                        self.send_batch(std::mem::take(&mut pending)).await;
                        weight = 0;
                    }
                }
                Err(TryRecvError::Empty) => break true,
                Err(TryRecvError::Disconnected) => break false,
            }
        };
        if !pending.is_empty() {
            self.send_batch(pending).await;
        }
        open
    }

    /// Numbers, encodes, publishes and keeps one batch.
    async fn send_batch(&mut self, events: Vec<KvEvent>) {
        let lost = self.lost.load(Ordering::SeqCst);
        if lost != self.seen_lost {
            tracing::warn!(
                dropped = lost - self.seen_lost,
                seq = self.next_seq,
                "KV events dropped (publisher queue full); this sequence number is skipped"
            );
            self.seen_lost = lost;
            self.next_seq += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let payload = Bytes::from(encode_batch(ts, &events, self.epoch));
        let frames = vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload.clone(),
        ];
        // PUB drops for slow subscribers rather than waiting; an error here is a closed socket.
        if let Ok(message) = ZmqMessage::try_from(frames) {
            if let Err(error) = self.publish.send(message).await {
                tracing::warn!(%error, seq, "cannot publish a KV event batch");
            }
        }
        self.buffer.push(seq, payload);
        let published: u64 = events.iter().map(KvEvent::weight).sum();
        self.metrics.events_published_total.inc_by(published);
    }

    /// Answers `[identity, "", start_seq]` with every kept batch from `start_seq` on, as
    /// `[identity, "", topic, seq, payload]`, then `[identity, "", "", -1, ""]`.
    async fn answer_replay(&self, router: &mut RouterSocket, request: ZmqMessage) {
        let frames = request.into_vec();
        let [identity, delimiter, start] = frames.as_slice() else {
            tracing::warn!(
                frames = frames.len(),
                "ignoring a KV event replay request that is not [identity, empty, start_seq]"
            );
            return;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else {
            tracing::warn!(
                bytes = start.len(),
                "ignoring a KV event replay request whose start_seq is not 8 bytes"
            );
            return;
        };
        let start = u64::from_be_bytes(start);
        let answers = self
            .buffer
            .since(start)
            .map(|(seq, payload)| {
                vec![
                    self.topic.clone(),
                    Bytes::copy_from_slice(&seq.to_be_bytes()),
                    payload.clone(),
                ]
            })
            .chain(std::iter::once(vec![
                Bytes::new(),
                Bytes::copy_from_slice(&END_SEQ),
                Bytes::new(),
            ]));
        for tail in answers {
            let mut frames = vec![identity.clone(), delimiter.clone()];
            frames.extend(tail);
            let Ok(message) = ZmqMessage::try_from(frames) else {
                return;
            };
            match tokio::time::timeout(REPLAY_SEND_TIMEOUT, router.send(message)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "KV event replay stopped: cannot send");
                    return;
                }
                Err(_) => {
                    tracing::warn!("KV event replay stopped: the subscriber does not read");
                    return;
                }
            }
        }
    }
}

/// The next replay request; never ready without a replay socket.
async fn recv_replay(replay: &mut Option<RouterSocket>) -> zeromq::ZmqResult<ZmqMessage> {
    match replay {
        Some(router) => router.recv().await,
        None => std::future::pending().await,
    }
}

/// Appends `event`, merged into the last pending event when both are the same kind on the same
/// tier (an eviction storm becomes one removal of many blocks, not many of one).
fn merge_into(pending: &mut Vec<KvEvent>, event: KvEvent) {
    match (pending.last_mut(), event) {
        (
            Some(KvEvent::Stored { medium, keys }),
            KvEvent::Stored {
                medium: next,
                keys: more,
            },
        )
        | (
            Some(KvEvent::Removed { medium, keys }),
            KvEvent::Removed {
                medium: next,
                keys: more,
            },
        ) if *medium == next => keys.extend(more),
        (_, event) => pending.push(event),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Medium;

    #[tokio::test]
    async fn dropped_events_cost_a_sequence_number_that_is_never_sent() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let lost = Arc::new(AtomicU64::new(0));
        let mut publisher = Publisher {
            publish: PubSocket::new(),
            topic: Bytes::new(),
            epoch: 1,
            next_seq: 0,
            seen_lost: 0,
            lost: lost.clone(),
            buffer: ReplayBuffer::new(8),
            batch_max: 8,
            metrics: metrics.clone(),
        };
        let stored = || {
            vec![KvEvent::Stored {
                medium: Medium::Memory,
                keys: vec![[1; 32]; 2],
            }]
        };
        publisher.send_batch(vec![KvEvent::Cleared]).await;
        publisher.send_batch(stored()).await;
        lost.fetch_add(5, Ordering::SeqCst);
        publisher.send_batch(stored()).await;
        publisher.send_batch(stored()).await;
        let seqs: Vec<u64> = publisher.buffer.since(0).map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [0, 1, 3, 4], "2 stands for the lost events");
        assert_eq!(metrics.events_published_total.get(), 1 + 3 * 2);
    }

    #[test]
    fn merges_only_the_same_change_on_the_same_tier() {
        let stored = |medium, key| KvEvent::Stored {
            medium,
            keys: vec![[key; 32]],
        };
        let removed = |medium, key| KvEvent::Removed {
            medium,
            keys: vec![[key; 32]],
        };
        let mut pending = Vec::new();
        for event in [
            removed(Medium::Memory, 1),
            removed(Medium::Memory, 2),
            stored(Medium::Ssd, 1),
            stored(Medium::Memory, 3),
            stored(Medium::Memory, 4),
            removed(Medium::Memory, 5),
        ] {
            merge_into(&mut pending, event);
        }
        assert_eq!(
            pending,
            [
                KvEvent::Removed {
                    medium: Medium::Memory,
                    keys: vec![[1; 32], [2; 32]]
                },
                stored(Medium::Ssd, 1),
                KvEvent::Stored {
                    medium: Medium::Memory,
                    keys: vec![[3; 32], [4; 32]]
                },
                removed(Medium::Memory, 5),
            ]
        );
    }
}
