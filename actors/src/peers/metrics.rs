//! `pegaflow_fabric_*`: what the fabric does for this node, registered in the node's registry
//! next to every other metric (docs/metrics.md).

use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry};

use super::FetchSummary;
use crate::metrics::TRANSFER_BUCKETS;

/// The fabric's series; created only when `fabric.enabled`.
pub struct FabricMetrics {
    pub peers: IntGauge,
    pub fetch_pages_total: IntCounter,
    pub fetch_bytes_total: IntCounter,
    pub fetch_false_positives_total: IntCounter,
    pub fetch_failures_total: IntCounter,
    pub fetch_duration_seconds: Histogram,
    pub served_pages_total: IntCounter,
    /// By `peer`: the smoothed link round trip this node measured.
    pub peer_rtt_seconds: GaugeVec,
}

impl FabricMetrics {
    /// Creates and registers the series in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(format!("pegaflow_fabric_{name}"), help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let peers = IntGauge::new("pegaflow_fabric_peers", "Live peers in the fabric")?;
        registry.register(Box::new(peers.clone()))?;
        let fetch_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "pegaflow_fabric_fetch_duration_seconds",
                "Time a load spent fetching its missed blocks from peers into the pool",
            )
            .buckets(TRANSFER_BUCKETS.into()),
        )?;
        registry.register(Box::new(fetch_duration_seconds.clone()))?;
        let peer_rtt_seconds = GaugeVec::new(
            Opts::new(
                "pegaflow_fabric_peer_rtt_seconds",
                "Smoothed link round trip to each peer, as measured by this node's fetches",
            ),
            &["peer"],
        )?;
        registry.register(Box::new(peer_rtt_seconds.clone()))?;
        Ok(Self {
            peers,
            fetch_pages_total: counter(
                "fetch_pages_total",
                "Blocks fetched from peers into the pool",
            )?,
            fetch_bytes_total: counter("fetch_bytes_total", "Bytes fetched from peers")?,
            fetch_false_positives_total: counter(
                "fetch_false_positives_total",
                "Peers whose digest claimed a block they did not hold",
            )?,
            fetch_failures_total: counter(
                "fetch_failures_total",
                "Peer fetches that failed (unreachable, refused, corrupt page, deadline)",
            )?,
            fetch_duration_seconds,
            served_pages_total: counter(
                "served_pages_total",
                "Blocks this node pinned to send to peers",
            )?,
            peer_rtt_seconds,
        })
    }

    /// Counts one fetch into the pool.
    pub fn fetch_done(&self, summary: &FetchSummary, seconds: f64) {
        self.fetch_pages_total.inc_by(u64::from(summary.stored));
        self.fetch_bytes_total.inc_by(summary.bytes);
        self.fetch_false_positives_total
            .inc_by(u64::from(summary.false_positives));
        self.fetch_failures_total
            .inc_by(u64::from(summary.failures));
        self.fetch_duration_seconds.observe(seconds);
    }

    /// Sets `peer`'s round-trip gauge.
    pub fn peer_rtt(&self, peer: &str, rtt: std::time::Duration) {
        let gauge: Gauge = self.peer_rtt_seconds.with_label_values(&[peer]);
        gauge.set(rtt.as_secs_f64());
    }
}
