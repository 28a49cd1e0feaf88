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

/// The SSD tier, from its metrics; present only when the tier is on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SsdStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub pages: u64,
    pub segments: u64,
    /// False after a write error (disk full) stopped spills.
    pub healthy: bool,
    pub hit_blocks: u64,
    pub reads: u64,
    pub read_bytes: u64,
    /// Read bandwidth while reading (bytes over time spent in reads), GB/s.
    pub read_gbps: f64,
    pub writes: u64,
    pub write_bytes: u64,
    /// Write bandwidth while writing, fdatasync included, GB/s.
    pub write_gbps: f64,
    pub write_errors: u64,
    pub segments_dropped: u64,
    pub checksum_failures: u64,
    pub spills_dropped: u64,
    pub admission_rejected: u64,
}

impl SsdStats {
    /// `None` when the tier is off (no capacity).
    fn collect(m: &Metrics) -> Option<Box<Self>> {
        let capacity = m.ssd_capacity_bytes.get();
        let gbps = |bytes: u64, seconds: f64| {
            if seconds > 0.0 {
                bytes as f64 / seconds / 1e9
            } else {
                0.0
            }
        };
        (capacity > 0).then(|| {
            Box::new(SsdStats {
                capacity_bytes: capacity as u64,
                used_bytes: m.ssd_used_bytes.get().max(0) as u64,
                pages: m.ssd_pages.get().max(0) as u64,
                segments: m.ssd_segments.get().max(0) as u64,
                healthy: m.ssd_healthy.get() == 1,
                hit_blocks: m.ssd_lookup_hit_blocks_total.get(),
                reads: m.ssd_reads_total.get(),
                read_bytes: m.ssd_read_bytes_total.get(),
                read_gbps: gbps(m.ssd_read_bytes_total.get(), m.ssd_read_seconds_total.get()),
                writes: m.ssd_writes_total.get(),
                write_bytes: m.ssd_write_bytes_total.get(),
                write_gbps: gbps(
                    m.ssd_write_bytes_total.get(),
                    m.ssd_write_seconds_total.get(),
                ),
                write_errors: m.ssd_write_errors_total.get(),
                segments_dropped: m.ssd_segments_dropped_total.get(),
                checksum_failures: m.ssd_checksum_failures_total.get(),
                spills_dropped: m.ssd_spills_dropped_total.get(),
                admission_rejected: m.ssd_admission_rejected_total.get(),
            })
        })
    }
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
    /// The SSD tier; absent when it is off. Boxed: most replies carry no stats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssd: Option<Box<SsdStats>>,
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
            ssd: SsdStats::collect(metrics),
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
