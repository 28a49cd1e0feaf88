//! The host's transfer actors: one per GPU, each with its own copy engine (its own CUDA context,
//! streams and event rings for a CUDA GPU), and one for host engines that name no GPU. A region
//! is opened on the actor of the GPU its `register` names, so work for one GPU never queues
//! behind another's.
//!
//! The actors are linked to a supervisor that restarts one that fails, over the same engine and
//! regions (engines stay registered); the jobs in its mailbox are dropped, so their callers get
//! an error reply. Restarts are logged and counted (`pegaflow_actor_restarts_total`), and
//! [`Transfers::problems`] (`/healthz`) names an actor that is down or restarting too often.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use pegaflow_config::{DmaEngine as DmaChoice, NodeConfig};
use pegaflow_gpu_dma::{Arena, CudaDmaEngine, DmaEngine, DmaError, HostDmaEngine};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr,
    SupervisionEvent,
};

use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, ProtoError};
use crate::topology::{GpuKind, GpuView, HostTopology};
use crate::transfer::{TransferActor, TransferMsg, TransferState};

/// The device label of the transfer actor for host engines that name no GPU.
pub const HOST_DEVICE: &str = "host";

/// Why the transfer actors could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransfersError {
    #[error("dma.engine = \"cuda\", but {0}; use \"auto\" or \"host\"")]
    Cuda(DmaError),
    #[error("cannot start the transfer actor of {device}: {message}")]
    Spawn { device: String, message: String },
}

/// More restarts than this within [`RESTART_WINDOW`] make `/healthz` unhealthy.
const RESTART_LIMIT: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// One transfer actor and the device it serves.
pub struct TransferHandle {
    /// [`HOST_DEVICE`] or the GPU's UUID: the `device` label of its metrics and stats.
    pub device: String,
    /// The NUMA node of the device (the first node for [`HOST_DEVICE`]).
    pub numa_node: u32,
    /// The running actor; `None` while it is being restarted.
    actor: RwLock<Option<ActorRef<TransferMsg>>>,
    /// Starts an actor over the device's engine and regions.
    respawn: Box<dyn Respawn>,
    /// When the actor was restarted, within the last [`RESTART_WINDOW`].
    restarts: Mutex<VecDeque<Instant>>,
}

impl TransferHandle {
    /// The device's actor, or an `internal` error naming the device while it restarts.
    pub fn actor(&self) -> Result<ActorRef<TransferMsg>, ProtoError> {
        self.actor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                ProtoError::new(
                    ErrorCode::Internal,
                    format!("the transfer actor of {} is restarting", self.device),
                )
            })
    }

    fn set_actor(&self, actor: Option<ActorRef<TransferMsg>>) {
        *self.actor.write().unwrap_or_else(PoisonError::into_inner) = actor;
    }

    /// Restarts within the window, counting one now when `now` is given.
    fn recent_restarts(&self, now: Option<Instant>) -> usize {
        let mut restarts = self.restarts.lock().unwrap_or_else(PoisonError::into_inner);
        restarts.extend(now);
        while restarts
            .front()
            .is_some_and(|at| at.elapsed() > RESTART_WINDOW)
        {
            restarts.pop_front();
        }
        restarts.len()
    }
}

/// How the supervisor starts a device's actor again: over the same engine and regions.
trait Respawn: Send + Sync {
    fn spawn(&self, supervisor: ActorCell) -> SpawnFuture<'_>;
}

type SpawnFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ActorRef<TransferMsg>, SpawnErr>> + Send + 'a>>;

impl<E: DmaEngine> Respawn for TransferState<E> {
    fn spawn(&self, supervisor: ActorCell) -> SpawnFuture<'_> {
        Box::pin(async move {
            let actor = TransferActor::<E>::default();
            let (actor, _) = Actor::spawn_linked(None, actor, self.clone(), supervisor).await?;
            Ok(actor)
        })
    }
}

/// Every transfer actor of the node.
pub struct Transfers {
    host: Arc<TransferHandle>,
    gpus: Vec<(GpuView, Arc<TransferHandle>)>,
    /// `cuda` when some GPU has a CUDA engine, else `host`; reported by `hello` and stats.
    dma: &'static str,
    supervisor: ActorRef<SuperviseMsg>,
    /// Set at shutdown: actors that stop then are not restarted.
    stopping: Arc<AtomicBool>,
}

impl Transfers {
    /// Starts one actor per GPU of `topology` and one for host engines. CUDA GPUs get a CUDA
    /// engine when `dma.engine` allows and the device opens (the first one pins `arena`, which
    /// the node placed on its NUMA nodes, the others share its registration); with
    /// `dma.engine = "cuda"` every one must open.
    pub async fn start(
        config: &NodeConfig,
        topology: &HostTopology,
        arena: Arc<Arena>,
        metrics: Arc<Metrics>,
    ) -> Result<Transfers, TransfersError> {
        let stopping = Arc::new(AtomicBool::new(false));
        let args = (metrics.clone(), stopping.clone());
        let (supervisor, _) = Actor::spawn(None, TransferSupervisor, args)
            .await
            .map_err(|e| TransfersError::Spawn {
                device: "every device (supervisor)".into(),
                message: e.to_string(),
            })?;
        let first_node = topology.numa_nodes[0];
        let host_engine = HostDmaEngine::new(arena.clone());
        let host_state =
            TransferState::new(HOST_DEVICE, host_engine, arena.clone(), metrics.clone());
        let host = supervise(&supervisor, HOST_DEVICE, first_node, Box::new(host_state)).await?;
        let mut gpus = Vec::new();
        let mut first_cuda: Option<Arc<CudaDmaEngine>> = None;
        for gpu in &topology.gpus {
            let handle = match (gpu.kind, gpu.ordinal) {
                (GpuKind::Host, _) => {
                    let engine = HostDmaEngine::new(arena.clone());
                    let state =
                        TransferState::new(&gpu.uuid, engine, arena.clone(), metrics.clone());
                    supervise(&supervisor, &gpu.uuid, gpu.numa_node, Box::new(state)).await?
                }
                (GpuKind::Cuda, Some(ordinal)) => {
                    let Some(engine) = open_cuda(
                        config.dma.engine,
                        ordinal,
                        first_cuda.as_deref(),
                        &arena,
                        &gpu.uuid,
                    )?
                    else {
                        continue;
                    };
                    let state =
                        TransferState::new(&gpu.uuid, engine, arena.clone(), metrics.clone());
                    if first_cuda.is_none() {
                        // The first CUDA engine pinned the pool: it reports the progress.
                        let engine = state.engine().clone();
                        let progress = engine.clone();
                        metrics.track_pinning(move || progress.pin_progress());
                        first_cuda = Some(engine);
                    }
                    supervise(&supervisor, &gpu.uuid, gpu.numa_node, Box::new(state)).await?
                }
                (GpuKind::Cuda, None) => continue,
            };
            gpus.push((gpu.clone(), handle));
        }
        if config.dma.engine == DmaChoice::Cuda && first_cuda.is_none() {
            return Err(TransfersError::Cuda(DmaError::CudaUnavailable(
                topology
                    .driver_error
                    .clone()
                    .unwrap_or_else(|| "the driver reports no GPU".into()),
            )));
        }
        let dma = match first_cuda {
            Some(_) => "cuda",
            None => "host",
        };
        Ok(Transfers {
            host,
            gpus,
            dma,
            supervisor,
            stopping,
        })
    }

    /// `cuda` when some GPU copies with the CUDA engine, else `host`.
    pub fn dma(&self) -> &'static str {
        self.dma
    }

    /// The transfer actor a `register` goes to: for a GPU region (`cuda_ipc`), the CUDA actor of
    /// the GPU named in `region.gpu`; for a shared-memory region, that of the `topology.gpus`
    /// entry it names, or the host engines' actor when it names none.
    pub fn route(
        &self,
        gpu: Option<&str>,
        cuda_ipc: bool,
    ) -> Result<Arc<TransferHandle>, ProtoError> {
        let bad = |message: String| ProtoError::new(ErrorCode::BadField, message);
        let Some(named) = gpu else {
            return match cuda_ipc {
                true => Err(bad(
                    "field `region.gpu`: a `region.cuda_ipc` must name the UUID of the GPU \
                     holding the allocation"
                        .into(),
                )),
                false => Ok(self.host.clone()),
            };
        };
        let uuid = pegaflow_gpu_dma::canonical_gpu_uuid(named);
        let Some((view, handle)) = self.gpus.iter().find(|(view, _)| view.uuid == uuid) else {
            let known: Vec<&str> = self.gpus.iter().map(|(v, _)| v.uuid.as_str()).collect();
            return Err(bad(format!(
                "field `region.gpu`: no GPU {named:?} is served on this host (GPUs: {})",
                match known.is_empty() {
                    true => "none".to_owned(),
                    false => known.join(", "),
                }
            )));
        };
        match (view.kind, cuda_ipc) {
            (GpuKind::Cuda, true) | (GpuKind::Host, false) => Ok(handle.clone()),
            (GpuKind::Cuda, false) => Err(bad(format!(
                "field `region.gpu`: {uuid} is a CUDA GPU; a `region.shm` names a GPU of \
                 `topology.gpus` or none"
            ))),
            (GpuKind::Host, true) => Err(bad(format!(
                "field `region.gpu`: {uuid} is a GPU of host engines (`topology.gpus`); a \
                 `region.cuda_ipc` names a CUDA GPU"
            ))),
        }
    }

    /// Every transfer actor: the host engines' first, then one per GPU.
    pub fn all(&self) -> impl Iterator<Item = &Arc<TransferHandle>> {
        std::iter::once(&self.host).chain(self.gpus.iter().map(|(_, handle)| handle))
    }

    /// What is wrong with the transfer actors, one line each: an actor down, or restarted more
    /// than [`RESTART_LIMIT`] times within [`RESTART_WINDOW`]. Empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        self.all()
            .filter_map(|handle| {
                let running = handle.actor.read().unwrap_or_else(PoisonError::into_inner);
                let restarts = handle.recent_restarts(None);
                if running.is_none() {
                    Some(format!("transfer actor {} is down", handle.device))
                } else if restarts >= RESTART_LIMIT {
                    Some(format!(
                        "transfer actor {} restarted {restarts} times in the last {} s",
                        handle.device,
                        RESTART_WINDOW.as_secs()
                    ))
                } else {
                    None
                }
            })
            .collect()
    }

    /// Fault hook for tests: the next copy job sent to `device`'s actor makes it fail, as a
    /// panic in it would (that job gets an error reply; the supervisor restarts the actor).
    /// False when no such device is served or its actor is down.
    pub fn fail_next_copy(&self, device: &str) -> bool {
        self.all()
            .find(|handle| handle.device == device)
            .and_then(|handle| handle.actor().ok())
            .is_some_and(|actor| actor.cast(TransferMsg::FailNextCopy).is_ok())
    }

    /// Stops every transfer actor and their supervisor, without restarts.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for handle in self.all() {
            if let Ok(actor) = handle.actor() {
                actor.stop(None);
            }
        }
        self.supervisor.stop(None);
    }
}

/// Hands `state` to the supervisor, which starts its actor linked to itself.
async fn supervise(
    supervisor: &ActorRef<SuperviseMsg>,
    device: &str,
    numa_node: u32,
    state: Box<dyn Respawn>,
) -> Result<Arc<TransferHandle>, TransfersError> {
    let handle = Arc::new(TransferHandle {
        device: device.to_owned(),
        numa_node,
        actor: RwLock::new(None),
        respawn: state,
        restarts: Mutex::new(VecDeque::new()),
    });
    let spawn_error = |message: String| TransfersError::Spawn {
        device: device.to_owned(),
        message,
    };
    let start = |reply| SuperviseMsg::Start {
        handle: handle.clone(),
        reply,
    };
    supervisor
        .call(start, None)
        .await
        .map_err(|e| spawn_error(e.to_string()))?
        .success_or(())
        .map_err(|()| spawn_error("the supervisor did not answer".into()))?
        .map_err(spawn_error)?;
    Ok(handle)
}

/// Messages of the transfer actors' supervisor.
enum SuperviseMsg {
    /// Starts the actor of `handle`, linked to the supervisor, and keeps it running.
    Start {
        handle: Arc<TransferHandle>,
        reply: RpcReplyPort<Result<(), String>>,
    },
}

/// Restarts a transfer actor that failed or stopped while the node was not shutting down.
struct TransferSupervisor;

struct SupervisorState {
    metrics: Arc<Metrics>,
    stopping: Arc<AtomicBool>,
    /// The handle of each running actor.
    watched: HashMap<ActorId, Arc<TransferHandle>>,
}

impl SupervisorState {
    /// The restart counter of `handle`'s actor.
    fn restarts(&self, handle: &TransferHandle) -> prometheus::IntCounter {
        let actor = format!("transfer:{}", handle.device);
        self.metrics
            .actor_restarts_total
            .with_label_values(&[actor.as_str()])
    }

    /// Starts `handle`'s actor linked to `supervisor` and watches it.
    async fn start(
        &mut self,
        supervisor: ActorCell,
        handle: Arc<TransferHandle>,
    ) -> Result<(), String> {
        let actor = handle
            .respawn
            .spawn(supervisor)
            .await
            .map_err(|e| e.to_string())?;
        // The actor's restart counter is exported from its first start, at 0.
        self.restarts(&handle);
        self.watched.insert(actor.get_id(), handle.clone());
        handle.set_actor(Some(actor));
        Ok(())
    }
}

impl Actor for TransferSupervisor {
    type Msg = SuperviseMsg;
    type State = SupervisorState;
    type Arguments = (Arc<Metrics>, Arc<AtomicBool>);

    async fn pre_start(
        &self,
        _myself: ActorRef<SuperviseMsg>,
        (metrics, stopping): (Arc<Metrics>, Arc<AtomicBool>),
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            metrics,
            stopping,
            watched: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SuperviseMsg>,
        message: SuperviseMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SuperviseMsg::Start { handle, reply } => {
                let started = state.start(myself.get_cell(), handle).await;
                drop(reply.send(started));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SuperviseMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let Some(handle) = state.watched.remove(&cell.get_id()) else {
            return Ok(());
        };
        handle.set_actor(None);
        if state.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let restarts = handle.recent_restarts(Some(Instant::now()));
        state.restarts(&handle).inc();
        tracing::error!(
            device = %handle.device,
            reason = %why,
            restarts_in_window = restarts,
            "transfer actor died; restarting it over the same engine and regions"
        );
        if let Err(error) = state.start(myself.get_cell(), handle.clone()).await {
            tracing::error!(device = %handle.device, %error, "cannot restart the transfer actor");
        }
        Ok(())
    }
}

/// The CUDA engine of the GPU at `ordinal`, or `None` when `dma.engine` leaves it out or (with
/// `auto`) it does not open; the reason is logged.
fn open_cuda(
    choice: DmaChoice,
    ordinal: usize,
    first: Option<&CudaDmaEngine>,
    arena: &Arc<Arena>,
    uuid: &str,
) -> Result<Option<CudaDmaEngine>, TransfersError> {
    if choice == DmaChoice::Host {
        tracing::info!(
            gpu = uuid,
            "no CUDA engine for this GPU (dma.engine = \"host\")"
        );
        return Ok(None);
    }
    let opened = match first {
        Some(first) => CudaDmaEngine::alongside(ordinal, first),
        None => CudaDmaEngine::over_placed(ordinal, arena.clone()),
    };
    match (opened, choice) {
        (Ok(engine), _) => {
            tracing::info!(gpu = uuid, engine = %engine.describe(), "copy engine: cuda");
            Ok(Some(engine))
        }
        (Err(error), DmaChoice::Cuda) => Err(TransfersError::Cuda(error)),
        (Err(error), _) => {
            tracing::warn!(gpu = uuid, %error, "no CUDA engine for this GPU (dma.engine = \"auto\")");
            Ok(None)
        }
    }
}
