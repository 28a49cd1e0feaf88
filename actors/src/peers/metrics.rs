//! `pegaflow_fabric_*`: what the fabric does for this node, registered in the node's registry
//! next to every other metric (docs/metrics.md).

use std::time::Duration;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

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
    /// By `peer` and `direction` (`received`, `sent`): page bytes moved over the links.
    pub peer_bytes_total: IntCounterVec,
    /// By `peer`: how old this node's copy of the peer's digest is.
    pub peer_digest_age_seconds: GaugeVec,
}

/// `direction` label of bytes this node fetched from a peer.
const RECEIVED: &str = "received";
/// `direction` label of bytes this node served to a peer.
const SENT: &str = "sent";

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
        let peer_bytes_total = IntCounterVec::new(
            Opts::new(
                "pegaflow_fabric_peer_bytes_total",
                "Page bytes fetched from (received) or served to (sent) each peer",
            ),
            &["peer", "direction"],
        )?;
        registry.register(Box::new(peer_bytes_total.clone()))?;
        let peer_digest_age_seconds = GaugeVec::new(
            Opts::new(
                "pegaflow_fabric_peer_digest_age_seconds",
                "Age of this node's copy of each live peer's digest, from the peer's last stamp",
            ),
            &["peer"],
        )?;
        registry.register(Box::new(peer_digest_age_seconds.clone()))?;
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
            served_pages_total: counter("served_pages_total", "Blocks this node sent to peers")?,
            peer_rtt_seconds,
            peer_bytes_total,
            peer_digest_age_seconds,
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
    pub fn peer_rtt(&self, peer: &str, rtt: Duration) {
        let gauge: Gauge = self.peer_rtt_seconds.with_label_values(&[peer]);
        gauge.set(rtt.as_secs_f64());
    }

    /// Counts `bytes` fetched from `peer`.
    pub fn received_from(&self, peer: &str, bytes: u64) {
        self.peer_bytes_total
            .with_label_values(&[peer, RECEIVED])
            .inc_by(bytes);
    }

    /// Counts `pages` pages (`bytes` in all) served to `peer`.
    pub fn sent_to(&self, peer: &str, pages: usize, bytes: u64) {
        self.served_pages_total.inc_by(pages as u64);
        self.peer_bytes_total
            .with_label_values(&[peer, SENT])
            .inc_by(bytes);
    }

    /// Bytes received from and sent to `peer` so far.
    pub fn bytes_with(&self, peer: &str) -> (u64, u64) {
        let count = |direction| {
            self.peer_bytes_total
                .with_label_values(&[peer, direction])
                .get()
        };
        (count(RECEIVED), count(SENT))
    }

    /// Sets `peer`'s digest-age gauge.
    pub fn peer_digest_age(&self, peer: &str, age: Duration) {
        let gauge: Gauge = self.peer_digest_age_seconds.with_label_values(&[peer]);
        gauge.set(age.as_secs_f64());
    }

    /// Drops the gauges of a peer that left (its counters stay: a peer that comes back under
    /// the same name continues them).
    pub fn forget_peer(&self, peer: &str) {
        // Absent series (never measured) are fine to skip.
        let _ = self.peer_rtt_seconds.remove_label_values(&[peer]);
        let _ = self.peer_digest_age_seconds.remove_label_values(&[peer]);
    }
}
