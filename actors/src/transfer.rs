//! `TransferActor`: one per copy device (one per GPU; one host engine without a GPU). Owns the
//! DMA engine and the engine regions opened on it, and runs copy jobs off the actor's thread
//! so saves and loads proceed concurrently, as CUDA streams will.

use std::collections::HashMap;
use std::sync::Arc;

use pegaflow_gpu_dma::{Arena, CopyOp, Direction, DmaEngine, DmaError, RegionSource};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

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

/// Messages the transfer actor answers.
pub enum TransferMsg {
    /// Opens a region for the session `owner`; it stays open until `CloseOwner`.
    Open {
        owner: OwnerId,
        source: RegionSource,
        reply: RpcReplyPort<Result<RegionId, DmaError>>,
    },
    /// Closes every region of a session that ended.
    CloseOwner { owner: OwnerId },
    /// Replies with one crc32c per entry of `checksum_pages`.
    Copy {
        job: CopyJob,
        reply: RpcReplyPort<Result<Vec<u32>, TransferError>>,
    },
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

/// The engine, the arena it copies into, and the regions opened so far.
pub struct TransferState<E: DmaEngine> {
    engine: Arc<E>,
    arena: Arc<Arena>,
    regions: HashMap<RegionId, (OwnerId, Arc<E::Region>)>,
    metrics: Arc<Metrics>,
    next_region: RegionId,
}

impl<E: DmaEngine> TransferState<E> {
    /// State for an engine copying into `arena`.
    pub fn new(engine: E, arena: Arc<Arena>, metrics: Arc<Metrics>) -> Self {
        Self {
            engine: Arc::new(engine),
            arena,
            metrics,
            regions: HashMap::new(),
            next_region: 1,
        }
    }
}

fn run_job<E: DmaEngine>(
    engine: &E,
    arena: &Arena,
    region: &E::Region,
    job: &CopyJob,
) -> Result<Vec<u32>, TransferError> {
    for ops in &job.layers {
        engine.copy_layer(region, job.direction, ops)?;
    }
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
        _myself: ActorRef<TransferMsg>,
        message: TransferMsg,
        state: &mut TransferState<E>,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TransferMsg::Open {
                owner,
                source,
                reply,
            } => {
                let opened = state.engine.open_region(&source).map(|region| {
                    let id = state.next_region;
                    state.next_region += 1;
                    state.regions.insert(id, (owner, Arc::new(region)));
                    id
                });
                state.metrics.engines.set(state.regions.len() as i64);
                drop(reply.send(opened));
            }
            TransferMsg::CloseOwner { owner } => {
                // In-flight jobs hold their own reference; the mapping goes when they finish.
                state.regions.retain(|_, (held_by, _)| *held_by != owner);
                state.metrics.engines.set(state.regions.len() as i64);
            }
            TransferMsg::Copy { job, reply } => {
                let Some((_, region)) = state.regions.get(&job.region).cloned() else {
                    drop(reply.send(Err(TransferError::UnknownRegion(job.region))));
                    return Ok(());
                };
                let engine = state.engine.clone();
                let arena = state.arena.clone();
                tokio::task::spawn_blocking(move || {
                    drop(reply.send(run_job(&*engine, &arena, &region, &job)));
                });
            }
        }
        Ok(())
    }
}
