//! `Node`: the supervisor. It owns the pool and transfer actors, accepts connector
//! connections (one `SessionActor` each), serves HTTP, and drains on shutdown. A session that
//! fails is cleaned up here, so a crash in one connection leaks nothing and stops nothing else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pegaflow_config::NodeConfig;
use pegaflow_gpu_dma::{Arena, DmaError};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::context::NodeContext;
use crate::events::EventSink;
use crate::limits::NodeLimits;
use crate::metrics::Metrics;
use crate::peers::{FabricMetrics, Peers};
use crate::pool::{Extent, OwnerId, PoolActor, PoolState};
use crate::pools::{self, PoolHandle, Pools};
use crate::session::{release_session, SessionActor, SessionArgs};
use crate::socket_file::{self, SocketFileError};
use crate::ssd::{SsdError, SsdTier};
use crate::topology::HostTopology;
use crate::transfers::{Transfers, TransfersError};

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Socket(#[from] SocketFileError),
    #[error("cannot serve HTTP on http.addr {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot allocate the pool of pool.size {bytes} bytes: {source}")]
    Arena { bytes: u64, source: DmaError },
    #[error(transparent)]
    Transfers(#[from] TransfersError),
    #[error("cannot start the {0} actor: {1}")]
    Spawn(&'static str, String),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Ssd(#[from] SsdError),
    #[error(transparent)]
    Otlp(#[from] crate::otlp::OtlpError),
    #[error(transparent)]
    Events(#[from] crate::events::publisher::EventsError),
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
        for pool in self.ctx.pools.all() {
            pool.actor.stop(None);
        }
        self.ctx.transfers.stop();
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
    let listener = socket_file::bind(&config.socket.path)?;
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
    let topology = HostTopology::discover(&config.topology);
    tracing::info!("host topology:\n{}", topology.render().trim_end());
    let plan = pools::plan(config, &topology, arena.len());
    pools::place(&arena, &plan);
    let transfers = Transfers::start(config, &topology, arena.clone(), metrics.clone()).await?;
    let dma = transfers.dma();
    let events = crate::events::publisher::start(&config.events, metrics.clone()).await?;
    let pools = spawn_pools(config, &plan, &arena, &metrics, &events).await?;
    let peers = match config.fabric.enabled {
        true => {
            let fabric_metrics = FabricMetrics::new(metrics.registry())?;
            let pool = pools.first().clone();
            Some(Peers::start(&config.fabric, pool, arena.clone(), fabric_metrics).await?)
        }
        false => None,
    };
    let ctx = Arc::new(
        NodeContext::new(
            pools,
            transfers,
            topology,
            metrics,
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

/// Starts one pool actor per entry of `plan`; the SSD tier (on only with a single pool) goes
/// to the first.
async fn spawn_pools(
    config: &NodeConfig,
    plan: &[(u32, Extent)],
    arena: &Arc<Arena>,
    metrics: &Arc<Metrics>,
    events: &EventSink,
) -> Result<Pools, StartError> {
    let mut pools = Vec::with_capacity(plan.len());
    for (i, &(numa_node, span)) in plan.iter().enumerate() {
        let ssd = match i {
            0 => SsdTier::open(&config.ssd, arena.clone(), metrics.clone(), events.clone())?,
            _ => None,
        };
        let align = config.pool.page_align.0;
        let state = PoolState::over(span, numa_node, align, metrics.clone(), ssd)
            .with_events(events.clone());
        let (actor, _) = Actor::spawn(None, PoolActor, state)
            .await
            .map_err(|e| StartError::Spawn("pool", e.to_string()))?;
        tracing::info!(numa_node, bytes = span.len, "pool started");
        pools.push(PoolHandle { numa_node, actor });
    }
    Ok(Pools::new(pools))
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
