//! `Node`: the supervisor. It owns the pool and transfer actors, accepts connector
//! connections (one `SessionActor` each), serves HTTP, and drains on shutdown. A session that
//! fails is cleaned up here, so a crash in one connection leaks nothing and stops nothing else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pegaflow_config::{DmaEngine as DmaChoice, NodeConfig};
use pegaflow_gpu_dma::{Arena, CudaDmaEngine, DmaEngine, DmaError, HostDmaEngine};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::context::NodeContext;
use crate::limits::NodeLimits;
use crate::metrics::Metrics;
use crate::peers::{FabricMetrics, Peers};
use crate::pool::{OwnerId, PoolActor, PoolState};
use crate::session::{release_session, SessionActor, SessionArgs};
use crate::ssd::{SsdError, SsdTier};
use crate::transfer::{TransferActor, TransferMsg, TransferState};

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("socket path {0} is in use by a running pegaflow-node (or another program); stop it or choose another socket.path")]
    SocketInUse(PathBuf),
    #[error("cannot listen on socket path {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve HTTP on http.addr {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot allocate the pool of pool.size {bytes} bytes: {source}")]
    Arena { bytes: u64, source: DmaError },
    #[error("dma.engine = \"cuda\", but {0}; use \"auto\" or \"host\"")]
    Cuda(DmaError),
    #[error("cannot start the {0} actor: {1}")]
    Spawn(&'static str, String),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Ssd(#[from] SsdError),
    #[error(transparent)]
    Otlp(#[from] crate::otlp::OtlpError),
    #[error("cannot join the fabric: {0}")]
    Fabric(#[from] pegaflow_fabric::FabricError),
}

/// Messages of the supervisor.
pub enum NodeMsg {
    /// A connector connected.
    Accepted(UnixStream),
    /// Refuse new work and close every session; replies once they are gone.
    Drain(ractor::RpcReplyPort<()>),
}

struct Supervisor;

struct SupervisorState {
    ctx: Arc<NodeContext>,
    sessions: HashMap<ActorId, (OwnerId, ActorCell)>,
    next_session: OwnerId,
}

impl Actor for Supervisor {
    type Msg = NodeMsg;
    type State = SupervisorState;
    type Arguments = Arc<NodeContext>;

    async fn pre_start(
        &self,
        _myself: ActorRef<NodeMsg>,
        ctx: Arc<NodeContext>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            ctx,
            sessions: HashMap::new(),
            next_session: 1,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        message: NodeMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            NodeMsg::Accepted(stream) => {
                let id = state.next_session;
                state.next_session += 1;
                let args = SessionArgs {
                    id,
                    stream,
                    ctx: state.ctx.clone(),
                };
                match Actor::spawn_linked(None, SessionActor, args, myself.get_cell()).await {
                    Ok((session, _)) => {
                        state
                            .sessions
                            .insert(session.get_id(), (id, session.get_cell()));
                    }
                    Err(error) => tracing::error!(session = id, %error, "cannot start session"),
                }
            }
            NodeMsg::Drain(reply) => {
                state.ctx.start_draining();
                for (_, (_, session)) in state.sessions.drain() {
                    session.stop(Some("node shutting down".into()));
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<NodeMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.sessions.remove(&cell.get_id());
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some((id, _)) = state.sessions.remove(&cell.get_id()) {
                    tracing::error!(session = id, %error, "session failed; releasing what it held");
                    release_session(&state.ctx, id);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A started node; dropping it without [`RunningNode::shutdown`] leaves the tasks running.
pub struct RunningNode {
    ctx: Arc<NodeContext>,
    supervisor: ActorRef<NodeMsg>,
    accept: JoinHandle<()>,
    http: JoinHandle<()>,
    http_addr: SocketAddr,
    socket_path: PathBuf,
    otlp: Option<crate::otlp::Exporter>,
}

impl RunningNode {
    /// Where the HTTP server listens (the real port when the config asked for port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The connector socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The shared context (pool, transfer, metrics), for in-process tools.
    pub fn context(&self) -> &Arc<NodeContext> {
        &self.ctx
    }

    /// Graceful shutdown: stop accepting, refuse new work, close sessions, give in-flight
    /// copies a moment to finish, stop the actors, and remove the socket file.
    pub async fn shutdown(self) {
        self.accept.abort();
        if let Some(peers) = &self.ctx.peers {
            peers.leave().await;
        }
        if let Err(error) = ractor::call_t!(self.supervisor, NodeMsg::Drain, 5_000) {
            tracing::warn!(%error, "drain did not complete");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.supervisor.stop(None);
        self.ctx.pool.stop(None);
        self.ctx.transfer.stop(None);
        self.http.abort();
        if let Some(otlp) = self.otlp {
            otlp.shutdown().await;
        }
        if let Err(error) = std::fs::remove_file(&self.socket_path) {
            tracing::warn!(path = %self.socket_path.display(), %error, "cannot remove socket");
        }
        tracing::info!("pegaflow-node stopped");
    }
}

/// Starts every actor, the socket listener and the HTTP server. The socket is claimed first,
/// so a second node on the same path fails before allocating anything, and released again if
/// a later step fails.
pub async fn start(config: &NodeConfig) -> Result<RunningNode, StartError> {
    let listener = bind_socket(&config.socket.path)?;
    let started = start_serving(config, listener).await;
    if started.is_err() {
        let _ = std::fs::remove_file(&config.socket.path);
    }
    started
}

async fn start_serving(
    config: &NodeConfig,
    listener: UnixListener,
) -> Result<RunningNode, StartError> {
    let metrics = Arc::new(Metrics::new()?);
    let otlp = crate::otlp::Exporter::start(&config.otlp, &metrics)?;
    let pool_bytes = config.pool.size.0;
    let arena =
        Arc::new(
            Arena::new(pool_bytes, "pegaflow-pool").map_err(|source| StartError::Arena {
                bytes: pool_bytes,
                source,
            })?,
        );
    let (transfer, dma) = spawn_transfer(config, arena.clone(), metrics.clone()).await?;
    let ssd = SsdTier::open(&config.ssd, arena.clone(), metrics.clone())?;
    let pool_state = PoolState::new(arena.len(), config.pool.page_align.0, metrics.clone(), ssd);
    let (pool, _) = Actor::spawn(None, PoolActor, pool_state)
        .await
        .map_err(|e| StartError::Spawn("pool", e.to_string()))?;
    let peers = match config.fabric.enabled {
        true => {
            let fabric_metrics = FabricMetrics::new(metrics.registry())?;
            Some(Peers::start(&config.fabric, pool.clone(), arena.clone(), fabric_metrics).await?)
        }
        false => None,
    };
    let ctx = Arc::new(
        NodeContext::new(
            pool,
            transfer,
            metrics,
            dma,
            config.socket.max_frame.0,
            config.pool.max_page_size.0,
            peers,
        )
        .with_limits(NodeLimits::new(&config.limits)),
    );
    let (supervisor, _) = Actor::spawn(None, Supervisor, ctx.clone())
        .await
        .map_err(|e| StartError::Spawn("node", e.to_string()))?;
    let accept = tokio::spawn(accept_loop(listener, supervisor.clone()));
    let (http_addr, http) = crate::http::serve(config, ctx.clone()).await?;
    tracing::info!(
        socket = %config.socket.path.display(),
        http = %http_addr,
        pool_bytes,
        dma,
        "pegaflow-node serving"
    );
    Ok(RunningNode {
        ctx,
        supervisor,
        accept,
        http,
        http_addr,
        socket_path: config.socket.path.clone(),
        otlp,
    })
}

/// Chooses the copy engine (`dma.engine`), says which and why, and starts the transfer actor
/// on it.
async fn spawn_transfer(
    config: &NodeConfig,
    arena: Arc<Arena>,
    metrics: Arc<Metrics>,
) -> Result<(ActorRef<TransferMsg>, &'static str), StartError> {
    let cuda = || CudaDmaEngine::new(0, arena.clone());
    match config.dma.engine {
        DmaChoice::Host => {
            tracing::info!(dma = "host", "copy engine: host (dma.engine = \"host\")");
            start_transfer(HostDmaEngine::new(arena.clone()), arena, metrics, |_, _| {}).await
        }
        DmaChoice::Cuda => {
            let engine = cuda().map_err(StartError::Cuda)?;
            tracing::info!(dma = "cuda", engine = %engine.describe(), "copy engine: cuda (dma.engine = \"cuda\")");
            start_transfer(engine, arena, metrics, track_pinning).await
        }
        DmaChoice::Auto => match cuda() {
            Ok(engine) => {
                tracing::info!(dma = "cuda", engine = %engine.describe(), "copy engine: cuda (dma.engine = \"auto\" and a GPU is present)");
                start_transfer(engine, arena, metrics, track_pinning).await
            }
            Err(why) => {
                tracing::info!(
                    dma = "host",
                    "copy engine: host (dma.engine = \"auto\"; {why})"
                );
                start_transfer(HostDmaEngine::new(arena.clone()), arena, metrics, |_, _| {}).await
            }
        },
    }
}

async fn start_transfer<E: DmaEngine>(
    engine: E,
    arena: Arc<Arena>,
    metrics: Arc<Metrics>,
    watch: fn(&Arc<E>, &Arc<Metrics>),
) -> Result<(ActorRef<TransferMsg>, &'static str), StartError> {
    let dma = engine.name();
    let state = TransferState::new(engine, arena, metrics.clone());
    watch(state.engine(), &metrics);
    let (transfer, _) = Actor::spawn(None, TransferActor::<E>::default(), state)
        .await
        .map_err(|e| StartError::Spawn("transfer", e.to_string()))?;
    Ok((transfer, dma))
}

/// Reports the CUDA engine's background pinning of the pool as `pool_pinned_bytes`.
fn track_pinning(engine: &Arc<CudaDmaEngine>, metrics: &Arc<Metrics>) {
    let engine = engine.clone();
    metrics.track_pinning(move || engine.pin_progress());
}

/// Binds the connector socket, replacing a stale file but never a live node's socket.
fn bind_socket(path: &Path) -> Result<UnixListener, StartError> {
    let socket_error = |source| StartError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(socket_error)?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(socket_error)?;
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(socket_error)?;
    Ok(listener)
}

async fn accept_loop(listener: UnixListener, supervisor: ActorRef<NodeMsg>) {
    let own_uid = rustix::process::getuid().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == own_uid || cred.uid() == 0 => {}
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), "refused a connection from another user");
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read peer credentials; refusing connection");
                continue;
            }
        }
        if supervisor.cast(NodeMsg::Accepted(stream)).is_err() {
            return;
        }
    }
}
