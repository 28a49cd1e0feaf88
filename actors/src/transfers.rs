//! The host's transfer actors: one per GPU, each with its own copy engine (its own CUDA context,
//! streams and event rings for a CUDA GPU), and one for host engines that name no GPU. A region
//! is opened on the actor of the GPU its `register` names, so work for one GPU never queues
//! behind another's.

use std::sync::Arc;

use pegaflow_config::{DmaEngine as DmaChoice, NodeConfig};
use pegaflow_gpu_dma::{Arena, CudaDmaEngine, DmaEngine, DmaError, HostDmaEngine};
use ractor::{Actor, ActorRef};

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

/// One transfer actor and the device it serves.
pub struct TransferHandle {
    /// [`HOST_DEVICE`] or the GPU's UUID: the `device` label of its metrics and stats.
    pub device: String,
    /// The NUMA node of the device (the first node for [`HOST_DEVICE`]).
    pub numa_node: u32,
    pub actor: ActorRef<TransferMsg>,
}

/// Every transfer actor of the node.
pub struct Transfers {
    host: Arc<TransferHandle>,
    gpus: Vec<(GpuView, Arc<TransferHandle>)>,
    /// `cuda` when some GPU has a CUDA engine, else `host`; reported by `hello` and stats.
    dma: &'static str,
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
        let first_node = topology.numa_nodes[0];
        let host_engine = HostDmaEngine::new(arena.clone());
        let host = spawn(HOST_DEVICE, first_node, host_engine, &arena, &metrics).await?;
        let mut gpus = Vec::new();
        let mut first_cuda: Option<Arc<CudaDmaEngine>> = None;
        for gpu in &topology.gpus {
            let handle = match (gpu.kind, gpu.ordinal) {
                (GpuKind::Host, _) => {
                    let engine = HostDmaEngine::new(arena.clone());
                    spawn(&gpu.uuid, gpu.numa_node, engine, &arena, &metrics).await?
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
                    spawn_cuda(
                        &gpu.uuid,
                        gpu.numa_node,
                        engine,
                        &arena,
                        &metrics,
                        &mut first_cuda,
                    )
                    .await?
                }
                (GpuKind::Cuda, None) => continue,
            };
            gpus.push((gpu.clone(), Arc::new(handle)));
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
            host: Arc::new(host),
            gpus,
            dma,
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

/// Spawns the actor of a CUDA engine; the first one reports the pool's pinning progress.
async fn spawn_cuda(
    device: &str,
    numa_node: u32,
    engine: CudaDmaEngine,
    arena: &Arc<Arena>,
    metrics: &Arc<Metrics>,
    first: &mut Option<Arc<CudaDmaEngine>>,
) -> Result<TransferHandle, TransfersError> {
    let state = TransferState::new(device, engine, arena.clone(), metrics.clone());
    if first.is_none() {
        let engine = state.engine().clone();
        let progress = engine.clone();
        metrics.track_pinning(move || progress.pin_progress());
        *first = Some(engine);
    }
    spawn_state(device, numa_node, state).await
}

async fn spawn<E: DmaEngine>(
    device: &str,
    numa_node: u32,
    engine: E,
    arena: &Arc<Arena>,
    metrics: &Arc<Metrics>,
) -> Result<TransferHandle, TransfersError> {
    let state = TransferState::new(device, engine, arena.clone(), metrics.clone());
    spawn_state(device, numa_node, state).await
}

async fn spawn_state<E: DmaEngine>(
    device: &str,
    numa_node: u32,
    state: TransferState<E>,
) -> Result<TransferHandle, TransfersError> {
    let (actor, _) = Actor::spawn(None, TransferActor::<E>::default(), state)
        .await
        .map_err(|e| TransfersError::Spawn {
            device: device.to_owned(),
            message: e.to_string(),
        })?;
    Ok(TransferHandle {
        device: device.to_owned(),
        numa_node,
        actor,
    })
}
