//! `TransferActor`: one per copy device (one per GPU; one for host engines naming no GPU). Owns the
//! DMA engine and the engine regions opened on it, and runs copy jobs off the actor's thread
//! so saves and loads proceed concurrently, as CUDA streams will.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use pegaflow_gpu_dma::{
    enqueue_layers, finish_layers, Arena, CopyOp, Direction, DmaEngine, DmaError, EnqueuedLayer,
    EventRing, ProgressBoard, RegionSource,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

use crate::metrics::{direction_label, Metrics};
use crate::page_crc::LayerwiseCrcs;
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

/// What an engine may wait on before a job's copies are done: the event slot each layer ends
/// with, and for a load with a progress board the ticket the board shows once a slot is
/// recorded. The default is a job answered once its copies are done: nothing to wait on.
#[derive(Debug, Default)]
pub struct QueuedCopy {
    pub event_slots: Vec<u32>,
    /// `Some` when the engine has a progress board: then this comes before any layer is
    /// enqueued, and each slot is usable once the board shows the ticket.
    pub ticket: Option<u64>,
}

/// Messages the transfer actor answers.
pub enum TransferMsg {
    /// Opens a region for the session `owner`; it stays open until `CloseOwner`. `progress` is
    /// the engine's load progress board, kept only for regions with layer events.
    Open {
        owner: OwnerId,
        source: RegionSource,
        progress: Option<Arc<ProgressBoard>>,
        reply: RpcReplyPort<Result<OpenedRegion, DmaError>>,
    },
    /// Closes every region of a session that ended.
    CloseOwner { owner: OwnerId },
    /// Runs a copy job. Given `queued`, on an engine with events, it receives the event slot
    /// of each layer before the copies finish, so the engine can wait on them GPU-side: for a
    /// load with a progress board at once with a ticket, else once every layer's copy and event
    /// are enqueued. Without events, or with the region's event ring full, `queued` is dropped
    /// unanswered. `reply` comes when the copies are done, with one crc32c per entry of
    /// `checksum_pages`.
    Copy {
        job: CopyJob,
        queued: Option<oneshot::Sender<QueuedCopy>>,
        reply: RpcReplyPort<Result<Vec<u32>, TransferError>>,
    },
    /// Fault hook for tests ([`crate::transfers::Transfers::fail_next_copy`]): the next `Copy`
    /// makes the actor fail, as a panic in it would, dropping that job unanswered.
    FailNextCopy,
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
    /// Which event slots are in use by jobs in flight; `None` without events.
    ring: Option<EventRing>,
    /// The engine's load progress board, with the ticket of its next load.
    progress: Option<(Arc<ProgressBoard>, u64)>,
}

/// A job's event slots, and a load's board and ticket when the engine has a board.
struct Reservation {
    first: u32,
    slots: Vec<u32>,
    board: Option<(Arc<ProgressBoard>, u64)>,
}

/// The regions opened on one device's engine.
struct Regions<R> {
    opened: HashMap<RegionId, Opened<R>>,
    next: RegionId,
}

/// The engine, the arena it copies into, and the regions opened so far.
///
/// The regions are shared with the jobs in flight (each hands its event slots back itself when
/// done) and with the actor that replaces this one after a crash: a cloned state serves the
/// same regions, so engines stay registered across a restart.
pub struct TransferState<E: DmaEngine> {
    /// `host` or the GPU's UUID: the `device` label of this actor's metrics.
    device: Arc<str>,
    engine: Arc<E>,
    arena: Arc<Arena>,
    regions: Arc<Mutex<Regions<E::Region>>>,
    metrics: Arc<Metrics>,
    /// Set by [`TransferMsg::FailNextCopy`]; a restarted actor starts without it.
    fail_next_copy: bool,
}

impl<E: DmaEngine> Clone for TransferState<E> {
    /// The same engine and regions, for the actor that replaces a crashed one.
    fn clone(&self) -> Self {
        Self {
            device: self.device.clone(),
            engine: self.engine.clone(),
            arena: self.arena.clone(),
            regions: self.regions.clone(),
            metrics: self.metrics.clone(),
            fail_next_copy: false,
        }
    }
}

impl<E: DmaEngine> TransferState<E> {
    /// State for the engine of `device` copying into `arena`.
    pub fn new(device: &str, engine: E, arena: Arc<Arena>, metrics: Arc<Metrics>) -> Self {
        metrics.add_device(device);
        Self {
            device: device.into(),
            engine: Arc::new(engine),
            arena,
            metrics,
            regions: Arc::new(Mutex::new(Regions {
                opened: HashMap::new(),
                next: 1,
            })),
            fail_next_copy: false,
        }
    }

    /// The copy engine, for node-level watchers (pinning progress).
    pub fn engine(&self) -> &Arc<E> {
        &self.engine
    }

    fn regions(&self) -> MutexGuard<'_, Regions<E::Region>> {
        self.regions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(
        &self,
        owner: OwnerId,
        source: &RegionSource,
        progress: Option<Arc<ProgressBoard>>,
    ) -> Result<OpenedRegion, DmaError> {
        let region = self.engine.open_region(source)?;
        let event_handles = self.engine.layer_event_handles(&region);
        let ring = (!event_handles.is_empty()).then(|| EventRing::new(event_handles.len() as u32));
        let progress = progress.filter(|_| ring.is_some()).map(|board| (board, 1));
        let mut regions = self.regions();
        let id = regions.next;
        regions.next += 1;
        regions.opened.insert(
            id,
            Opened {
                owner,
                region: Arc::new(region),
                ring,
                progress,
            },
        );
        self.metrics.engines.inc();
        Ok(OpenedRegion { id, event_handles })
    }

    /// Closes the regions of `owner`; in-flight jobs hold their own reference, so a mapping
    /// goes when they finish.
    fn close_owner(&self, owner: OwnerId) {
        let mut regions = self.regions();
        let before = regions.opened.len();
        regions.opened.retain(|_, opened| opened.owner != owner);
        let closed = before - regions.opened.len();
        self.metrics.engines.sub(closed as i64);
    }

    /// Event slots for a job's layers (and a load's next ticket), when the region has events
    /// and the ring has room; a job without them is answered only once its copies are done.
    fn reserve_slots(&self, job: &CopyJob) -> Option<Reservation> {
        let mut regions = self.regions();
        let opened = regions.opened.get_mut(&job.region)?;
        let ring = opened.ring.as_mut()?;
        let layers = job.layers.len() as u32;
        let Some(first) = ring.reserve(layers) else {
            let direction = direction_label(job.direction);
            self.metrics
                .event_ring_full_total
                .with_label_values(&[direction])
                .inc();
            return None;
        };
        let slots = (0..layers).map(|l| ring.slot(first, l)).collect();
        let progress = opened.progress.as_mut();
        let board = progress
            .filter(|_| job.direction == Direction::Load)
            .map(|(board, next)| {
                *next += 1;
                (board.clone(), *next - 1)
            });
        Some(Reservation {
            first,
            slots,
            board,
        })
    }
}

/// Runs one job: enqueues its layers (answering `queued` as early as is safe), then waits for
/// them and checksums a save's pages.
fn run_job<E: DmaEngine>(
    engine: &E,
    arena: &Arena,
    region: &E::Region,
    job: &CopyJob,
    reserved: Option<&Reservation>,
    queued: Option<oneshot::Sender<QueuedCopy>>,
    metrics: &Metrics,
) -> Result<Vec<u32>, TransferError> {
    let layers = match enqueue_answering(engine, region, job, reserved, queued) {
        Ok(layers) => layers,
        Err(error) => {
            // The layers enqueued before the failure still run: they must land before the
            // caller hands the job's pages back to the pool.
            let _ = engine.finish(region, job.direction);
            return Err(error);
        }
    };
    finish_checksumming(engine, arena, region, job, layers, metrics)
}

/// Enqueues every layer (after a wait on the engine's event of that layer when the job names one,
/// ending each layer with its event slot when reserved) and tells `queued`: before enqueueing a
/// load with a progress board, whose slots it then arms layer by layer (and marks failed from the
/// first layer it could not enqueue); after enqueueing without one.
fn enqueue_answering<E: DmaEngine>(
    engine: &E,
    region: &E::Region,
    job: &CopyJob,
    reserved: Option<&Reservation>,
    queued: Option<oneshot::Sender<QueuedCopy>>,
) -> Result<Vec<EnqueuedLayer<E::LayerEnd>>, TransferError> {
    let slots = reserved.map_or(&[][..], |r| &r.slots);
    let board = reserved.and_then(|r| r.board.as_ref());
    let answer = |queued: oneshot::Sender<QueuedCopy>, ticket| {
        // The caller may have stopped waiting (its session ended); the copies still complete.
        let _ = queued.send(QueuedCopy {
            event_slots: slots.to_vec(),
            ticket,
        });
    };
    let mut queued = queued.filter(|_| !slots.is_empty());
    if let Some((_, ticket)) = board {
        if let Some(early) = queued.take() {
            answer(early, Some(*ticket));
        }
    }
    let mut armed = 0;
    let enqueued = enqueue_layers(
        engine,
        region,
        job.direction,
        &job.layers,
        &job.wait_events,
        slots,
        |layer| {
            if let Some((board, ticket)) = board {
                board.arm(slots[layer], *ticket);
            }
            armed = layer + 1;
        },
    );
    if let (Err(_), Some((board, ticket))) = (&enqueued, board) {
        slots[armed..]
            .iter()
            .for_each(|&slot| board.fail(slot, *ticket));
    }
    let layers = enqueued?;
    if let Some(queued) = queued {
        answer(queued, None);
    }
    Ok(layers)
}

/// Waits for the layers in order (observing each one's latency) and returns the crc32c of a
/// save's pages: checksummed as each layer lands when the save waited on the engine's events
/// (its layers land while the engine still computes), else once all landed.
fn finish_checksumming<E: DmaEngine>(
    engine: &E,
    arena: &Arena,
    region: &E::Region,
    job: &CopyJob,
    layers: Vec<EnqueuedLayer<E::LayerEnd>>,
    metrics: &Metrics,
) -> Result<Vec<u32>, TransferError> {
    let layerwise = !job.wait_events.is_empty();
    let mut crcs = LayerwiseCrcs::new(arena, &job.checksum_pages);
    let mut landed = job.layers.iter().filter(|_| layerwise);
    let mut absorbed = Ok(());
    finish_layers(engine, region, job.direction, layers, |took| {
        metrics.layer_done(job.direction, took);
        // `landed` advances with every layer, so it stays in step with the layers waited for.
        if let (Some(ops), Ok(())) = (landed.next(), &absorbed) {
            absorbed = crcs.absorb(ops);
        }
    })?;
    absorbed?;
    crcs.finish()
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
                progress,
                reply,
            } => drop(reply.send(state.open(owner, &source, progress))),
            TransferMsg::CloseOwner { owner } => state.close_owner(owner),
            TransferMsg::FailNextCopy => state.fail_next_copy = true,
            TransferMsg::Copy { .. } if state.fail_next_copy => {
                return Err(
                    format!("fault hook: failing the {} transfer actor", state.device).into(),
                )
            }
            TransferMsg::Copy { job, queued, reply } => {
                let region = state
                    .regions()
                    .opened
                    .get(&job.region)
                    .map(|o| o.region.clone());
                let Some(region) = region else {
                    drop(reply.send(Err(TransferError::UnknownRegion(job.region))));
                    return Ok(());
                };
                if let Err(error) = state.engine.begin_job(&region, job.direction) {
                    drop(reply.send(Err(error.into())));
                    return Ok(());
                }
                let reserved = queued.as_ref().and_then(|_| state.reserve_slots(&job));
                let worker = state.clone();
                tokio::task::spawn_blocking(move || {
                    let started = std::time::Instant::now();
                    let result = run_job(
                        &*worker.engine,
                        &worker.arena,
                        &region,
                        &job,
                        reserved.as_ref(),
                        queued,
                        &worker.metrics,
                    );
                    if result.is_ok() {
                        worker.metrics.transfer_done(
                            &worker.device,
                            job.direction,
                            job.bytes(),
                            started.elapsed(),
                        );
                    }
                    match reserved {
                        // A board shows a failed load's slots as failed until they are armed
                        // again, so they stay reserved: a late waiter must never read another
                        // load's ticket in them. Later loads then wait for their copies instead.
                        Some(r) if r.board.is_some() && result.is_err() => tracing::warn!(
                            region = job.region,
                            "a load failed after it was answered; its event slots stay reserved"
                        ),
                        // Re-recording a slot after this job's copies completed can only make a
                        // late waiter wait longer (same stream, later copy), never too little.
                        Some(r) => {
                            let mut regions = worker.regions();
                            let opened = regions.opened.get_mut(&job.region);
                            if let Some(ring) = opened.and_then(|o| o.ring.as_mut()) {
                                ring.release(r.first);
                            }
                        }
                        None => {}
                    }
                    drop(reply.send(result));
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use pegaflow_gpu_dma::PROGRESS_FAILED;

    use super::*;

    /// A copy engine with layer events that notes, at each copy, whether the load was already
    /// answered, and fails the end of layer `fail_at`.
    struct Evented {
        answer: Mutex<Option<oneshot::Receiver<QueuedCopy>>>,
        answered_at_copy: Mutex<Vec<bool>>,
        fail_at: Option<usize>,
        ends: Mutex<usize>,
        drained: Mutex<usize>,
    }

    impl Evented {
        fn new(answer: oneshot::Receiver<QueuedCopy>, fail_at: Option<usize>) -> Self {
            Self {
                answer: Mutex::new(Some(answer)),
                answered_at_copy: Mutex::new(Vec::new()),
                fail_at,
                ends: Mutex::new(0),
                drained: Mutex::new(0),
            }
        }
    }

    impl DmaEngine for Evented {
        type Region = ();
        type LayerEnd = ();

        fn name(&self) -> &'static str {
            "evented"
        }

        fn open_region(&self, _: &RegionSource) -> Result<(), DmaError> {
            Ok(())
        }

        fn copy_layer(&self, _: &(), _: Direction, _: &[CopyOp]) -> Result<(), DmaError> {
            let answered = match self.answer.lock().unwrap().as_mut() {
                Some(answer) => answer.try_recv().is_ok(),
                None => true,
            };
            if answered {
                self.answer.lock().unwrap().take();
            }
            self.answered_at_copy.lock().unwrap().push(answered);
            Ok(())
        }

        fn end_layer(&self, _: &(), _: Direction, _: Option<u32>) -> Result<(), DmaError> {
            let mut ends = self.ends.lock().unwrap();
            *ends += 1;
            match self.fail_at == Some(*ends - 1) {
                true => Err(DmaError::Cuda {
                    op: "cuEventRecord (test)".into(),
                    message: "injected".into(),
                }),
                false => Ok(()),
            }
        }

        fn wait_layer(&self, _: &(), _: ()) -> Result<std::time::Instant, DmaError> {
            Ok(std::time::Instant::now())
        }

        fn finish(&self, _: &(), _: Direction) -> Result<(), DmaError> {
            *self.drained.lock().unwrap() += 1;
            Ok(())
        }
    }

    /// A board file in /dev/shm, removed when dropped.
    struct BoardFile(String);

    impl BoardFile {
        fn new(tag: &str) -> (Self, Arc<ProgressBoard>) {
            let name = format!("pegaflow-test-board-{}-{tag}", std::process::id());
            let file = std::fs::File::create(format!("/dev/shm/{name}")).expect("create");
            file.set_len(8 * 8).expect("size");
            let board = ProgressBoard::open(&name, 8).expect("open board");
            (Self(name), Arc::new(board))
        }
    }

    impl Drop for BoardFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(format!("/dev/shm/{}", self.0));
        }
    }

    fn load_job(layers: usize) -> CopyJob {
        CopyJob {
            region: 1,
            direction: Direction::Load,
            layers: vec![Vec::new(); layers],
            checksum_pages: Vec::new(),
            wait_events: Vec::new(),
        }
    }

    fn run(engine: &Evented, reserved: &Reservation, answer: oneshot::Sender<QueuedCopy>) -> bool {
        let arena = Arena::new(4096, "transfer-test").expect("arena");
        let metrics = Metrics::new().expect("metrics");
        let job = load_job(reserved.slots.len());
        run_job(
            engine,
            &arena,
            &(),
            &job,
            Some(reserved),
            Some(answer),
            &metrics,
        )
        .is_ok()
    }

    #[test]
    fn with_a_board_the_load_is_answered_first_and_each_slot_armed_with_its_ticket() {
        let (_file, board) = BoardFile::new("armed");
        let (answer, answered) = oneshot::channel();
        let engine = Evented::new(answered, None);
        let reserved = Reservation {
            first: 2,
            slots: vec![2, 3, 4],
            board: Some((board.clone(), 7)),
        };
        assert!(run(&engine, &reserved, answer));
        assert_eq!(*engine.answered_at_copy.lock().unwrap(), [true, true, true]);
        let words: Vec<_> = (0..6).map(|slot| board.read(slot)).collect();
        assert_eq!(words, [0, 0, 7, 7, 7, 0].map(Some));
    }

    #[test]
    fn a_load_failing_midway_marks_the_slots_it_did_not_record() {
        let (_file, board) = BoardFile::new("failed");
        let (answer, answered) = oneshot::channel();
        let engine = Evented::new(answered, Some(1));
        let reserved = Reservation {
            first: 0,
            slots: vec![0, 1, 2],
            board: Some((board.clone(), 9)),
        };
        assert!(!run(&engine, &reserved, answer));
        let words: Vec<_> = (0..3).map(|slot| board.read(slot)).collect();
        let failed = 9 | PROGRESS_FAILED;
        assert_eq!(words, [9, failed, failed].map(Some));
        // Layer 0 was enqueued: the lane is drained before the job's pages may go back.
        assert_eq!(*engine.drained.lock().unwrap(), 1);
    }

    #[test]
    fn without_a_board_the_load_is_answered_once_every_layer_is_enqueued() {
        let (answer, answered) = oneshot::channel();
        let engine = Evented::new(answered, None);
        let reserved = Reservation {
            first: 0,
            slots: vec![0, 1],
            board: None,
        };
        assert!(run(&engine, &reserved, answer));
        assert_eq!(*engine.answered_at_copy.lock().unwrap(), [false, false]);
        let mut answer = engine.answer.lock().unwrap().take().expect("receiver");
        let queued = answer.try_recv().expect("answered after enqueueing");
        assert_eq!((queued.event_slots, queued.ticket), (vec![0, 1], None));
    }

    #[test]
    fn a_layer_wise_save_checksums_each_page_as_its_layers_land() {
        const SEGMENT: u64 = 4096;
        const LAYERS: u64 = 3;
        let dir = tempfile::tempdir().expect("tempdir");
        let region_bytes: Vec<u8> = (0..4 * LAYERS * SEGMENT).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("kv"), &region_bytes).expect("region");
        let arena = Arc::new(Arena::new(4 * LAYERS * SEGMENT, "transfer-crc-test").expect("arena"));
        let engine =
            pegaflow_gpu_dma::HostDmaEngine::with_shm_root(arena.clone(), dir.path().into());
        let region = engine
            .open_region(&RegionSource::SharedMemory {
                name: "kv".into(),
                bytes: region_bytes.len() as u64,
            })
            .expect("region");
        // Blocks 2 and 0 into pages 0 and 3; each page holds its block's layers in order.
        let page = LAYERS * SEGMENT;
        let blocks = [(2u64, 0u64), (0, 3)];
        let job = CopyJob {
            region: 1,
            direction: Direction::Save,
            layers: (0..LAYERS)
                .map(|layer| {
                    blocks
                        .iter()
                        .map(|&(block, slot)| CopyOp {
                            region_offset: (layer * 4 + block) * SEGMENT,
                            arena_offset: slot * page + layer * SEGMENT,
                            len: SEGMENT,
                        })
                        .collect()
                })
                .collect(),
            checksum_pages: blocks
                .iter()
                .map(|&(_, slot)| (slot * page, page))
                .collect(),
            wait_events: vec![0; LAYERS as usize],
        };
        let metrics = Metrics::new().expect("metrics");
        let crcs = run_job(&engine, &arena, &region, &job, None, None, &metrics).expect("save");
        let expected: Vec<u32> = blocks
            .iter()
            .map(|&(block, _)| {
                let bytes: Vec<u8> = (0..LAYERS)
                    .flat_map(|layer| {
                        let start = ((layer * 4 + block) * SEGMENT) as usize;
                        region_bytes[start..start + SEGMENT as usize].to_vec()
                    })
                    .collect();
                crc32c::crc32c(&bytes)
            })
            .collect();
        assert_eq!(crcs, expected);
    }

    /// A copy engine with a ring of 8 layer events that journals the calls it gets.
    #[derive(Default)]
    struct Journal {
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl Journal {
        fn log(&self, direction: Direction, call: &str) {
            let call = format!("{direction:?} {call}");
            self.calls.lock().unwrap().push(call);
        }
    }

    impl DmaEngine for Journal {
        type Region = ();
        type LayerEnd = ();

        fn name(&self) -> &'static str {
            "journal"
        }

        fn open_region(&self, _: &RegionSource) -> Result<(), DmaError> {
            Ok(())
        }

        fn copy_layer(&self, _: &(), direction: Direction, _: &[CopyOp]) -> Result<(), DmaError> {
            self.log(direction, "copy");
            Ok(())
        }

        fn end_layer(
            &self,
            _: &(),
            direction: Direction,
            slot: Option<u32>,
        ) -> Result<(), DmaError> {
            self.log(direction, &format!("end {slot:?}"));
            Ok(())
        }

        fn wait_layer(&self, _: &(), _: ()) -> Result<std::time::Instant, DmaError> {
            Ok(std::time::Instant::now())
        }

        fn begin_job(&self, _: &(), direction: Direction) -> Result<(), DmaError> {
            self.log(direction, "begin");
            Ok(())
        }

        fn layer_event_handles(&self, _: &()) -> Vec<[u8; 64]> {
            vec![[0; 64]; 8]
        }
    }

    /// A transfer actor over a [`Journal`] engine with one region open (id 1).
    async fn journaled() -> (ActorRef<TransferMsg>, Arc<Mutex<Vec<String>>>, Arc<Metrics>) {
        let journal = Journal::default();
        let calls = journal.calls.clone();
        let arena = Arc::new(Arena::new(4096, "transfer-journal-test").expect("arena"));
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let state = TransferState::new("journal", journal, arena, metrics.clone());
        let (actor, _) = Actor::spawn(None, TransferActor::default(), state)
            .await
            .expect("spawn");
        let source = RegionSource::SharedMemory {
            name: "unused".into(),
            bytes: 0,
        };
        let opened = actor
            .call(
                |reply| TransferMsg::Open {
                    owner: 1,
                    source,
                    progress: None,
                    reply,
                },
                None,
            )
            .await
            .expect("open")
            .unwrap()
            .expect("opened");
        assert_eq!((opened.id, opened.event_handles.len()), (1, 8));
        (actor, calls, metrics)
    }

    /// Sends `job`; returns what `queued` was told (if anything) and the job's result.
    async fn copy(
        actor: &ActorRef<TransferMsg>,
        job: CopyJob,
        early: bool,
    ) -> (Option<QueuedCopy>, Result<Vec<u32>, TransferError>) {
        let (queued, answered) = oneshot::channel();
        let done = actor
            .call(
                |reply| TransferMsg::Copy {
                    job,
                    queued: early.then_some(queued),
                    reply,
                },
                None,
            )
            .await
            .expect("copy")
            .unwrap();
        (answered.await.ok(), done)
    }

    fn save_job(layers: usize) -> CopyJob {
        CopyJob {
            direction: Direction::Save,
            ..load_job(layers)
        }
    }

    #[tokio::test]
    async fn a_save_asked_to_answer_when_queued_ends_each_layer_with_a_slot_it_hands_out() {
        let (actor, journal, metrics) = journaled().await;
        let (queued, done) = copy(&actor, save_job(2), true).await;
        assert_eq!(done.expect("saved"), Vec::<u32>::new());
        let queued = queued.expect("answered when queued");
        assert_eq!((queued.event_slots, queued.ticket), (vec![0, 1], None));
        let calls = journal.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                "Save begin",
                "Save copy",
                "Save end Some(0)",
                "Save copy",
                "Save end Some(1)"
            ]
        );
        // Each save hands its slots back when done: five more saves of 2 layers fit a ring of 8.
        for round in 1..=5u32 {
            let (queued, _) = copy(&actor, save_job(2), true).await;
            let slots = queued.expect("answered when queued").event_slots;
            assert_eq!(slots, [2 * round % 8, (2 * round + 1) % 8]);
        }
        // A job needing more slots than the ring has free is answered when done, and counted.
        let full = |direction| {
            metrics
                .event_ring_full_total
                .with_label_values(&[direction])
        };
        let (queued, done) = copy(&actor, save_job(9), true).await;
        assert!(queued.is_none() && done.is_ok());
        assert_eq!((full("save").get(), full("load").get()), (1, 0));
        // A save that did not ask is answered when done and records no ring slot.
        journal.lock().unwrap().clear();
        let (queued, done) = copy(&actor, save_job(1), false).await;
        assert!(queued.is_none() && done.is_ok());
        let calls = journal.lock().unwrap().clone();
        assert_eq!(calls, ["Save begin", "Save copy", "Save end None"]);
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_load_begins_before_its_copies_and_after_every_layer_of_an_answered_save() {
        let (actor, journal, _) = journaled().await;
        let (save, load) = (save_job(3), load_job(3));
        let (queued, answer) = oneshot::channel();
        let (reply, saved) = ractor::concurrency::oneshot();
        let save = TransferMsg::Copy {
            job: save,
            queued: Some(queued),
            reply: reply.into(),
        };
        actor.cast(save).expect("save sent");
        answer.await.expect("answered when queued"); // the save may still be finishing
        let (_, loaded) = copy(&actor, load, true).await;
        assert!(saved.await.expect("save done").is_ok() && loaded.is_ok());
        let calls = journal.lock().unwrap().clone();
        let first = |call: &str| calls.iter().position(|c| c == call).expect(call);
        let last_save_end = calls.iter().rposition(|c| c.starts_with("Save end"));
        assert!(last_save_end < Some(first("Load begin")), "{calls:?}");
        assert!(first("Load begin") < first("Load copy"), "{calls:?}");
        actor.stop(None);
    }
}
