//! The node's stats document, served as `GET /api/stats` and by the `stats` op.

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::pool::PoolStats;

/// Totals since start, read from the metric counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub lookup_blocks: u64,
    pub hit_blocks: u64,
    pub miss_blocks: u64,
    pub saved_blocks: u64,
    pub loaded_blocks: u64,
    pub save_bytes: u64,
    pub load_bytes: u64,
}

/// A snapshot of the node for operators and clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    pub version: String,
    pub dma: String,
    pub uptime_seconds: u64,
    pub sessions: u64,
    pub engines: u64,
    pub pool: PoolStats,
    pub totals: Totals,
}

impl NodeStats {
    /// Assembles the document from the pool's answer and the metric counters.
    pub fn collect(metrics: &Metrics, pool: PoolStats, dma: &str, uptime_seconds: u64) -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            dma: dma.to_string(),
            uptime_seconds,
            sessions: metrics.sessions.get().max(0) as u64,
            engines: metrics.engines.get().max(0) as u64,
            pool,
            totals: Totals {
                lookup_blocks: metrics.lookup_blocks_total.get(),
                hit_blocks: metrics.lookup_hit_blocks_total.get(),
                miss_blocks: metrics.lookup_miss_blocks_total.get(),
                saved_blocks: metrics.saved_blocks_total.get(),
                loaded_blocks: metrics.loaded_blocks_total.get(),
                save_bytes: metrics.save_bytes_total.get(),
                load_bytes: metrics.load_bytes_total.get(),
            },
        }
    }
}
