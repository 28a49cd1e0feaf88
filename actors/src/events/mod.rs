//! KV events (docs/events.md): every block the node stores or drops, on every tier, published
//! in vLLM's `KVEventBatch` format over a ZMQ PUB socket, with vLLM's replay socket, so a
//! KV-aware router that already reads vLLM engines' events sees what the node holds.
//!
//! [`batch`] is the wire format, [`replay`] the buffer of recent batches, [`publisher`] the task
//! that owns the sockets. The pool and the SSD tier report changes through an [`EventSink`]:
//! a cheap cloneable handle that never blocks them. It queues each change on a bounded
//! channel and counts what does not fit as dropped; the publisher then skips a sequence number,
//! so subscribers see a gap that no replay fills and know to resynchronise.

pub mod batch;
pub mod publisher;
pub mod replay;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

pub use batch::{KvEvent, Medium};

use crate::keys::BlockKey;
use crate::metrics::Metrics;

/// Where the pool and the SSD tier hand their changes; does nothing when events are off.
#[derive(Clone, Default)]
pub struct EventSink {
    inner: Option<Arc<SinkInner>>,
}

struct SinkInner {
    queue: mpsc::Sender<KvEvent>,
    /// Events dropped for a full queue so far; the publisher compares it batch to batch.
    lost: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

impl EventSink {
    /// A sink that publishes nothing (`events.enabled` false, tests).
    pub fn off() -> Self {
        Self::default()
    }

    /// A sink feeding `queue`, counting what does not fit in `lost` and the metrics.
    fn new(queue: mpsc::Sender<KvEvent>, lost: Arc<AtomicU64>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Some(Arc::new(SinkInner {
                queue,
                lost,
                metrics,
            })),
        }
    }

    /// `keys` are now held by `medium`.
    pub fn stored(&self, medium: Medium, keys: &[BlockKey]) {
        if !keys.is_empty() {
            self.send(|| KvEvent::Stored {
                medium,
                keys: keys.to_vec(),
            });
        }
    }

    /// `keys` are no longer held by `medium`.
    pub fn removed(&self, medium: Medium, keys: &[BlockKey]) {
        if !keys.is_empty() {
            self.send(|| KvEvent::Removed {
                medium,
                keys: keys.to_vec(),
            });
        }
    }

    fn send(&self, event: impl FnOnce() -> KvEvent) {
        let Some(inner) = &self.inner else {
            return;
        };
        let event = event();
        let weight = event.weight();
        // Full (a stalled publisher) or closed (shutting down): never wait, count instead.
        if inner.queue.try_send(event).is_err() {
            inner.lost.fetch_add(weight, Ordering::SeqCst);
            inner.metrics.events_dropped_total.inc_by(weight);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (queue, mut events) = mpsc::channel(1);
        let lost = Arc::new(AtomicU64::new(0));
        let sink = EventSink::new(queue, lost.clone(), metrics.clone());
        sink.stored(Medium::Memory, &[[1; 32], [2; 32]]);
        sink.removed(Medium::Ssd, &[[3; 32]; 3]);
        sink.removed(Medium::Ssd, &[]);
        assert_eq!(lost.load(Ordering::SeqCst), 3);
        assert_eq!(metrics.events_dropped_total.get(), 3);
        assert_eq!(
            events.try_recv().ok(),
            Some(KvEvent::Stored {
                medium: Medium::Memory,
                keys: vec![[1; 32], [2; 32]]
            })
        );
        assert!(
            events.try_recv().is_err(),
            "the empty removal sends nothing"
        );
    }

    #[test]
    fn the_pool_reports_stores_and_evictions_in_order() {
        use crate::pool::{PoolState, SaveSlot};
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (queue, mut events) = mpsc::channel(16);
        let sink = EventSink::new(queue, Arc::new(AtomicU64::new(0)), metrics.clone());
        let mut pool = PoolState::new(2 * 4096, 4096, metrics, None).with_events(sink);
        let mut save = |keys: &[BlockKey]| {
            let reservation = pool.reserve_save(keys, 4096);
            let written = reservation
                .slots
                .iter()
                .filter(|slot| matches!(slot, SaveSlot::Write(_)))
                .count();
            pool.commit_save(reservation.lease, &vec![0; written]);
        };
        save(&[[1; 32], [2; 32]]);
        save(&[[3; 32]]);
        save(&[[3; 32]]);
        let memory = Medium::Memory;
        let received: Vec<KvEvent> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert_eq!(
            received,
            [
                KvEvent::Stored {
                    medium: memory,
                    keys: vec![[1; 32], [2; 32]]
                },
                KvEvent::Removed {
                    medium: memory,
                    keys: vec![[1; 32]]
                },
                KvEvent::Stored {
                    medium: memory,
                    keys: vec![[3; 32]]
                },
            ],
            "a block already held is not stored again"
        );
    }

    #[test]
    fn an_off_sink_does_nothing() {
        EventSink::off().stored(Medium::Memory, &[[1; 32]]);
    }
}
