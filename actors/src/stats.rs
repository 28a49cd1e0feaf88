//! The node's stats document, served as `GET /api/stats` (the dashboard polls it) and by the
//! `stats` op. Everything in it is read from the metrics registry, so it never disagrees with
//! `/metrics`; latency percentiles are interpolated from the histogram buckets the same way
//! PromQL's `histogram_quantile` does, and the buckets are included so a client can compute
//! percentiles over a window from two polls.

use std::collections::BTreeMap;

use prometheus::core::Collector;
use prometheus::proto::{Metric, MetricFamily};
use serde::{Deserialize, Serialize};

use crate::metrics::{Metrics, TIERS};
use crate::pool::PoolStats;

/// Totals since start, read from the metric counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub lookup_blocks: u64,
    /// Hits over every tier.
    pub hit_blocks: u64,
    /// Hits by tier: `memory`, `ssd`, `remote`.
    #[serde(default)]
    pub hit_blocks_by_tier: BTreeMap<String, u64>,
    pub miss_blocks: u64,
    pub saved_blocks: u64,
    #[serde(default)]
    pub save_dropped_blocks: u64,
    pub loaded_blocks: u64,
    /// Bytes saved over every copy device.
    pub save_bytes: u64,
    /// Bytes loaded over every copy device.
    pub load_bytes: u64,
}

/// A latency histogram: its count and sum, percentiles since start, and the buckets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub sum_seconds: f64,
    pub p50_seconds: f64,
    pub p90_seconds: f64,
    pub p99_seconds: f64,
    /// `[upper bound in seconds, cumulative count]`, finite bounds only (`count` is +Inf's).
    pub buckets: Vec<(f64, u64)>,
}

impl Latency {
    fn from_metric(metric: &Metric) -> Self {
        let h = metric.get_histogram();
        let buckets: Vec<(f64, u64)> = h
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        let count = h.get_sample_count();
        Self {
            count,
            sum_seconds: h.get_sample_sum(),
            p50_seconds: quantile(0.5, &buckets, count),
            p90_seconds: quantile(0.9, &buckets, count),
            p99_seconds: quantile(0.99, &buckets, count),
            buckets,
        }
    }
}

/// The `q` quantile of a cumulative histogram, interpolated linearly inside its bucket as
/// PromQL's `histogram_quantile` does; an observation past the last bound reports that bound.
pub fn quantile(q: f64, buckets: &[(f64, u64)], count: u64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    let rank = q * count as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(upper, cumulative) in buckets {
        if cumulative as f64 >= rank {
            let inside = cumulative - below;
            if inside == 0 {
                return upper;
            }
            return lower + (upper - lower) * (rank - below as f64) / inside as f64;
        }
        (lower, below) = (upper, cumulative);
    }
    lower
}

/// One direction of one copy device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DirectionStats {
    pub bytes: u64,
    /// Bandwidth while copying (bytes over the summed copy time), GB/s.
    pub gb_per_s: f64,
    /// Per save or load job.
    pub latency: Latency,
}

/// Copies of one device (`host`, or a GPU) each way.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub device: String,
    pub save: DirectionStats,
    pub load: DirectionStats,
}

fn families(collector: &impl Collector) -> Vec<MetricFamily> {
    collector.collect()
}

/// The value of label `name` on `metric`, empty when absent.
fn label<'a>(metric: &'a Metric, name: &str) -> &'a str {
    metric
        .get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

/// Each series of a labelled counter as `(value of label, count)`.
fn counts_by(collector: &impl Collector, name: &str) -> BTreeMap<String, u64> {
    families(collector)
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| {
            (
                label(m, name).to_string(),
                m.get_counter().get_value() as u64,
            )
        })
        .collect()
}

/// Bytes per second over seconds, in GB/s; 0 before any time was spent.
fn gb_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        0.0
    }
}

/// The `direction` side of a device's stats.
fn side<'a>(stats: &'a mut DeviceStats, direction: &str) -> Option<&'a mut DirectionStats> {
    match direction {
        "save" => Some(&mut stats.save),
        "load" => Some(&mut stats.load),
        _ => None,
    }
}

fn device_stats(m: &Metrics) -> Vec<DeviceStats> {
    let mut devices: BTreeMap<String, DeviceStats> = BTreeMap::new();
    for metric in families(&m.transfer_duration_seconds)
        .iter()
        .flat_map(|f| f.get_metric())
    {
        let device = label(metric, "device");
        let entry = devices
            .entry(device.to_string())
            .or_insert_with(|| DeviceStats {
                device: device.to_string(),
                ..DeviceStats::default()
            });
        if let Some(side) = side(entry, label(metric, "direction")) {
            side.latency = Latency::from_metric(metric);
        }
    }
    for metric in families(&m.transfer_bytes_total)
        .iter()
        .flat_map(|f| f.get_metric())
    {
        let Some(entry) = devices.get_mut(label(metric, "device")) else {
            continue;
        };
        if let Some(side) = side(entry, label(metric, "direction")) {
            side.bytes = metric.get_counter().get_value() as u64;
            side.gb_per_s = gb_per_s(side.bytes, side.latency.sum_seconds);
        }
    }
    devices.into_values().collect()
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
    pub read_gb_per_s: f64,
    pub writes: u64,
    pub write_bytes: u64,
    /// Write bandwidth while writing, fdatasync included, GB/s.
    pub write_gb_per_s: f64,
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
                read_gb_per_s: gb_per_s(
                    m.ssd_read_bytes_total.get(),
                    m.ssd_read_seconds_total.get(),
                ),
                writes: m.ssd_writes_total.get(),
                write_bytes: m.ssd_write_bytes_total.get(),
                write_gb_per_s: gb_per_s(
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
    /// Pool bytes page-locked for GPU DMA so far (CUDA engine; 0 with the host engine).
    #[serde(default)]
    pub pool_pinned_bytes: u64,
    /// The SSD tier; absent when it is off. Boxed: most replies carry no stats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssd: Option<Box<SsdStats>>,
    pub totals: Totals,
    /// Copies per device and direction.
    #[serde(default)]
    pub transfers: Vec<DeviceStats>,
    /// Request latency by op, from arrival to reply.
    #[serde(default)]
    pub requests: BTreeMap<String, Latency>,
    /// Error replies by code (codes never sent are absent).
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// The fabric; absent when `fabric.enabled` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric: Option<crate::peers::FabricStats>,
    /// Each NUMA node's pool (`pool` is their sum).
    #[serde(default)]
    pub pools: Vec<crate::pools::NumaPoolStats>,
    /// The NUMA nodes and GPUs the node serves (absent from `stats` replies of older nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<crate::topology::HostTopology>,
}

impl NodeStats {
    /// Assembles the document from the pool's answer and the metric counters.
    pub fn collect(metrics: &Metrics, pool: PoolStats, dma: &str, uptime_seconds: u64) -> Self {
        let hit_blocks_by_tier = counts_by(&metrics.lookup_hit_blocks_total, "tier");
        let transfers = device_stats(metrics);
        let requests = families(&metrics.request_duration_seconds)
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|m| (label(m, "op").to_string(), Latency::from_metric(m)))
            .collect();
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            dma: dma.to_string(),
            uptime_seconds,
            sessions: metrics.sessions.get().max(0) as u64,
            engines: metrics.engines.get().max(0) as u64,
            pool,
            pool_pinned_bytes: metrics.pool_pinned_bytes.get().max(0) as u64,
            ssd: SsdStats::collect(metrics),
            totals: Totals {
                lookup_blocks: metrics.lookup_blocks_total.get(),
                hit_blocks: TIERS
                    .iter()
                    .filter_map(|tier| hit_blocks_by_tier.get(*tier))
                    .sum(),
                hit_blocks_by_tier,
                miss_blocks: metrics.lookup_miss_blocks_total.get(),
                saved_blocks: metrics.saved_blocks_total.get(),
                save_dropped_blocks: metrics.save_dropped_blocks_total.get(),
                loaded_blocks: metrics.loaded_blocks_total.get(),
                save_bytes: transfers.iter().map(|d| d.save.bytes).sum(),
                load_bytes: transfers.iter().map(|d| d.load.bytes).sum(),
            },
            transfers,
            requests,
            errors: counts_by(&metrics.errors_total, "code"),
            fabric: None,
            pools: Vec::new(),
            topology: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_interpolate_inside_buckets_like_promql() {
        let buckets = [(0.001, 0), (0.002, 50), (0.004, 100)];
        assert_eq!(quantile(0.5, &buckets, 100), 0.002);
        assert!((quantile(0.25, &buckets, 100) - 0.0015).abs() < 1e-12);
        assert!((quantile(0.75, &buckets, 100) - 0.003).abs() < 1e-12);
        assert_eq!(quantile(0.99, &buckets, 0), 0.0);
        // Past the last finite bound: that bound.
        assert_eq!(quantile(0.99, &buckets, 200), 0.004);
    }
}
