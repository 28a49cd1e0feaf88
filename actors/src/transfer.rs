//! `TransferActor`: one per copy device (one per GPU; one host engine without a GPU). Owns the
//! DMA engine and the engine regions opened on it, and runs copy jobs off the actor's thread
//! so saves and loads proceed concurrently, as CUDA streams will.

use std::collections::HashMap;
use std::sync::Arc;

use pegaflow_gpu_dma::{
    enqueue_layers, finish_layers, Arena, CopyOp, Direction, DmaEngine, DmaError, EventRing,
    RegionSource,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::pool::OwnerId;

/// Handle of an opened engine region.
pub type RegionId = u64;

/// A batch of copies for one save or load.
pub struct CopyJob {
    pub region: RegionId,
    pub direction: Direction,
    /// Per layer, the copies of that layer; layers run in order.
    pub layers: Vec<Vec<CopyOp>>,
    /// Pages `(arena offset, bytes)` to checksum once a save's copies are done.
    pub checksum_pages: Vec<(u64, u64)>,
    /// Per layer, the engine event slot whose firing that layer's copies wait for (GPU-side; a
    /// save whose engine did not synchronize its stream). Empty: start at once.
    pub wait_events: Vec<u32>,
}

impl CopyJob {
    /// Bytes the job moves, over every layer.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|op| op.len).sum()
    }
}

/// Why a copy job failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("region {0} is not open on this transfer actor")]
    UnknownRegion(RegionId),
    #[error(transparent)]
    Dma(#[from] DmaError),
    #[error("copy worker failed: {0}")]
    Worker(String),
}

/// A region opened for a session, with the event handles a GPU engine's loads signal through.
pub struct OpenedRegion {
    pub id: RegionId,
    /// Interprocess event handles, one per ring slot; empty for engines without events.
    pub event_handles: Vec<[u8; 64]>,
}

/// Messages the transfer actor answers.
pub enum TransferMsg {
    /// Opens a region for the session `owner`; it stays open until `CloseOwner`.
    Open {
        owner: OwnerId,
        source: RegionSource,
        reply: RpcReplyPort<Result<OpenedRegion, DmaError>>,
    },
    /// Closes every region of a session that ended.
    CloseOwner { owner: OwnerId },
    /// Runs a copy job. For a load on an engine with events, `queued` receives the event slot
    /// of each layer once every layer's copy and event are enqueued, before the copies finish,
    /// so the engine can wait on them GPU-side; `reply` comes when the copies are done, with
    /// one crc32c per entry of `checksum_pages`.
    Copy {
        job: CopyJob,
        queued: Option<oneshot::Sender<Vec<u32>>>,
        reply: RpcReplyPort<Result<Vec<u32>, TransferError>>,
    },
    /// A job finished; its event slots may be handed out again.
    JobDone { region: RegionId, first_slot: u32 },
}

/// The actor, generic over the copy engine chosen at start.
pub struct TransferActor<E: DmaEngine> {
    _engine: std::marker::PhantomData<fn() -> E>,
}

impl<E: DmaEngine> Default for TransferActor<E> {
    fn default() -> Self {
        Self {
            _engine: std::marker::PhantomData,
        }
    }
}

struct Opened<R> {
    owner: OwnerId,
    region: Arc<R>,
    /// Which event slots are in use by loads in flight; `None` without events.
    ring: Option<EventRing>,
}

/// The engine, the arena it copies into, and the regions opened so far.
pub struct TransferState<E: DmaEngine> {
    engine: Arc<E>,
    arena: Arc<Arena>,
    regions: HashMap<RegionId, Opened<E::Region>>,
    metrics: Arc<Metrics>,
    next_region: RegionId,
}

impl<E: DmaEngine> TransferState<E> {
    /// State for an engine copying into `arena`.
    pub fn new(engine: E, arena: Arc<Arena>, metrics: Arc<Metrics>) -> Self {
        metrics.add_device(engine.name());
        Self {
            engine: Arc::new(engine),
            arena,
            metrics,
            regions: HashMap::new(),
            next_region: 1,
        }
    }

    /// The copy engine, for node-level watchers (pinning progress).
    pub fn engine(&self) -> &Arc<E> {
        &self.engine
    }

    fn open(&mut self, owner: OwnerId, source: &RegionSource) -> Result<OpenedRegion, DmaError> {
        let region = self.engine.open_region(source)?;
        let event_handles = self.engine.layer_event_handles(&region);
        let ring = (!event_handles.is_empty()).then(|| EventRing::new(event_handles.len() as u32));
        let id = self.next_region;
        self.next_region += 1;
        self.regions.insert(
            id,
            Opened {
                owner,
                region: Arc::new(region),
                ring,
            },
        );
        self.metrics.engines.set(self.regions.len() as i64);
        Ok(OpenedRegion { id, event_handles })
    }

    /// Event slots for a load's layers, when the region has events and the ring has room; a
    /// load without them is answered only once its copies are done.
    fn reserve_slots(&mut self, job: &CopyJob) -> Option<(u32, Vec<u32>)> {
        if job.direction != Direction::Load {
            return None;
        }
        let ring = self.regions.get_mut(&job.region)?.ring.as_mut()?;
        let layers = job.layers.len() as u32;
        let first = ring.reserve(layers)?;
        Some((first, (0..layers).map(|l| ring.slot(first, l)).collect()))
    }
}

/// Enqueues every layer (after a wait on the engine's event of that layer when the job names one,
/// ending a load's layer with its event slot when `slots` are given), tells `queued`, waits for
/// the layers in order (observing each one's latency), then checksums a save's pages.
fn run_job<E: DmaEngine>(
    engine: &E,
    arena: &Arena,
    region: &E::Region,
    job: &CopyJob,
    slots: &[u32],
    queued: Option<oneshot::Sender<Vec<u32>>>,
    metrics: &Metrics,
) -> Result<Vec<u32>, TransferError> {
    let layers = enqueue_layers(
        engine,
        region,
        job.direction,
        &job.layers,
        &job.wait_events,
        slots,
    )?;
    if let Some(queued) = queued {
        // The caller may have stopped waiting (its session ended); the copies still complete.
        let _ = queued.send(slots.to_vec());
    }
    finish_layers(engine, region, job.direction, layers, |took| {
        metrics.layer_done(job.direction, took)
    })?;
    checksum_pages(arena, &job.checksum_pages)
}

/// Below this many bytes a save's checksums run on the copy thread; above, spread over cores
/// (crc32c runs at ~14 GB/s per core, slower than a DMA engine fills pages).
const PARALLEL_CHECKSUM_BYTES: u64 = 8 << 20;

fn checksum_pages(arena: &Arena, pages: &[(u64, u64)]) -> Result<Vec<u32>, TransferError> {
    let checksum = |part: &[(u64, u64)]| -> Result<Vec<u32>, TransferError> {
        part.iter()
            .map(|&(offset, len)| Ok(crc32c::crc32c(arena.read(offset, len)?)))
            .collect()
    };
    let total: u64 = pages.iter().map(|&(_, len)| len).sum();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if total < PARALLEL_CHECKSUM_BYTES || threads == 1 || pages.len() < 2 {
        return checksum(pages);
    }
    let chunk = pages.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = pages
            .chunks(chunk)
            .map(|part| scope.spawn(move || checksum(part)))
            .collect();
        let mut crcs = Vec::with_capacity(pages.len());
        for worker in workers {
            let part = worker
                .join()
                .map_err(|_| TransferError::Worker("checksum thread panicked".into()))??;
            crcs.extend(part);
        }
        Ok(crcs)
    })
}

impl<E: DmaEngine> Actor for TransferActor<E> {
    type Msg = TransferMsg;
    type State = TransferState<E>;
    type Arguments = TransferState<E>;

    async fn pre_start(
        &self,
        _myself: ActorRef<TransferMsg>,
        state: TransferState<E>,
    ) -> Result<TransferState<E>, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<TransferMsg>,
        message: TransferMsg,
        state: &mut TransferState<E>,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TransferMsg::Open {
                owner,
                source,
                reply,
            } => drop(reply.send(state.open(owner, &source))),
            TransferMsg::CloseOwner { owner } => {
                // In-flight jobs hold their own reference; the mapping goes when they finish.
                state.regions.retain(|_, opened| opened.owner != owner);
                state.metrics.engines.set(state.regions.len() as i64);
            }
            TransferMsg::Copy { job, queued, reply } => {
                let Some(region) = state.regions.get(&job.region).map(|o| o.region.clone()) else {
                    drop(reply.send(Err(TransferError::UnknownRegion(job.region))));
                    return Ok(());
                };
                let reserved = state.reserve_slots(&job);
                let engine = state.engine.clone();
                let arena = state.arena.clone();
                let metrics = state.metrics.clone();
                tokio::task::spawn_blocking(move || {
                    let slots = reserved.as_ref().map_or(&[][..], |(_, slots)| slots);
                    let queued = queued.filter(|_| !slots.is_empty());
                    let started = std::time::Instant::now();
                    let result = run_job(&*engine, &arena, &region, &job, slots, queued, &metrics);
                    if result.is_ok() {
                        metrics.transfer_done(
                            engine.name(),
                            job.direction,
                            job.bytes(),
                            started.elapsed(),
                        );
                    }
                    if let Some((first_slot, _)) = reserved {
                        // Re-recording a slot after this job's copies completed can only make a
                        // late waiter wait longer (same stream, later copy), never too little.
                        let _ = myself.cast(TransferMsg::JobDone {
                            region: job.region,
                            first_slot,
                        });
                    }
                    drop(reply.send(result));
                });
            }
            TransferMsg::JobDone { region, first_slot } => {
                if let Some(ring) = state.regions.get_mut(&region).and_then(|o| o.ring.as_mut()) {
                    ring.release(first_slot);
                }
            }
        }
        Ok(())
    }
}
