//! What every session needs from the node: the shared actors, metrics and limits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pegaflow_config::LimitsConfig;
use ractor::{ActorRef, RpcReplyPort};

use crate::limits::NodeLimits;
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::pools::{self, Pools};
use crate::protocol::{ErrorCode, ProtoError};
use crate::stats::NodeStats;
use crate::topology::HostTopology;
use crate::transfers::Transfers;

/// Shared, read-mostly node facts handed to each session and the HTTP server.
pub struct NodeContext {
    /// One pool per NUMA node.
    pub pools: Pools,
    /// One transfer actor per GPU and one for host engines.
    pub transfers: Transfers,
    /// The NUMA nodes and GPUs served, as `/api/stats` shows them.
    pub topology: HostTopology,
    pub metrics: Arc<Metrics>,
    pub max_frame_bytes: u64,
    pub max_page_bytes: u64,
    /// The fabric, when `fabric.enabled`: lookups and loads then cover peers' memory too.
    pub peers: Option<Arc<Peers>>,
    /// What clients may hold of the node (`limits.*`).
    pub limits: NodeLimits,
    pub started: Instant,
    draining: AtomicBool,
}

impl NodeContext {
    /// Bundles the node's shared handles.
    pub fn new(
        pools: Pools,
        transfers: Transfers,
        topology: HostTopology,
        metrics: Arc<Metrics>,
        max_frame_bytes: u64,
        max_page_bytes: u64,
        peers: Option<Arc<Peers>>,
    ) -> Self {
        Self {
            pools,
            transfers,
            topology,
            metrics,
            max_frame_bytes,
            max_page_bytes,
            peers,
            limits: NodeLimits::new(&LimitsConfig::default()),
            started: Instant::now(),
            draining: AtomicBool::new(false),
        }
    }

    /// Name of the copy engine in use (`cuda` or `host`), reported by `hello` and stats.
    pub fn dma(&self) -> &'static str {
        self.transfers.dma()
    }

    /// The same context with `limits` instead of the default ones.
    pub fn with_limits(self, limits: NodeLimits) -> Self {
        Self { limits, ..self }
    }

    /// Stops new work during a graceful shutdown.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Refuses new work once the node drains.
    pub fn check_open(&self) -> Result<(), ProtoError> {
        if self.draining.load(Ordering::SeqCst) {
            Err(ProtoError::new(
                ErrorCode::ShuttingDown,
                "the node is shutting down",
            ))
        } else {
            Ok(())
        }
    }

    /// The stats document, asking each pool for its occupancy.
    pub async fn stats(&self) -> Result<NodeStats, ProtoError> {
        let per_node = self.pools.stats().await?;
        let mut stats = NodeStats::collect(
            &self.metrics,
            pools::total(&per_node),
            self.dma(),
            self.started.elapsed().as_secs(),
        );
        stats.topology = Some(self.topology.clone());
        stats.pools = per_node;
        stats.fabric = self.peers.as_ref().map(|peers| peers.stats());
        Ok(stats)
    }
}

/// Calls an actor, turning a dead or silent actor into an `internal` error reply.
pub async fn ask<M, T>(
    actor: &ActorRef<M>,
    name: &str,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, ProtoError>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(build, None).await {
        Ok(ractor::rpc::CallResult::Success(value)) => Ok(value),
        Ok(_) => Err(ProtoError::new(
            ErrorCode::Internal,
            format!("the {name} actor did not answer"),
        )),
        Err(_) => Err(ProtoError::new(
            ErrorCode::Internal,
            format!("the {name} actor is not running"),
        )),
    }
}
