//! Prometheus metrics of the node (`/metrics`). Names follow Prometheus conventions: the
//! `pegaflow_` prefix, units in the name, `_total` on counters. docs/metrics.md lists every
//! one; a test keeps the two in step.
//!
//! This registry is the single source of truth: `/api/stats` reads it, and OTLP export
//! ([`crate::otlp`]) bridges it, so a number means the same thing wherever an operator reads
//! it. Observations that OTLP must see as they happen (latencies, spans) go through the
//! `*_done` methods here, which also feed the OTLP hooks once export has started.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pegaflow_gpu_dma::{Direction, PinProgress};
use prometheus::core::Collector;
use prometheus::{
    Counter, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::otlp::OtlpHooks;
use crate::protocol::{ProtoError, ReplyBody};

/// Storage tiers a lookup hit can come from; `remote` is counted once the fabric exists.
pub const TIERS: [&str; 3] = ["memory", "ssd", "remote"];

/// Socket ops, pre-initialised as label values so their series exist before first use.
pub const OPS: [&str; 7] = [
    "hello", "register", "lookup", "save", "load", "release", "stats",
];

/// Request latency buckets: 10 us (a lookup) to 2.5 s (a large load from SSD).
pub const REQUEST_BUCKETS: [f64; 17] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// Copy latency buckets: 50 us (one block) to 5 s (gigabytes at PCIe speed).
pub const TRANSFER_BUCKETS: [f64; 16] = [
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Per-layer copy latency buckets: 50 us (a layer of a few blocks) to 50 ms (a layer of a long
/// prompt queued behind the rest of its job, or a save waiting for the engine to compute it).
pub const LAYER_BUCKETS: [f64; 10] = [
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
];

/// The `direction` label of a copy.
pub fn direction_label(direction: Direction) -> &'static str {
    match direction {
        Direction::Save => "save",
        Direction::Load => "load",
    }
}

/// Every metric the node exports, registered in one registry.
pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub errors_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub lookup_blocks_total: IntCounter,
    /// By `tier`: memory, ssd, remote.
    pub lookup_hit_blocks_total: IntCounterVec,
    pub lookup_miss_blocks_total: IntCounter,
    pub saved_blocks_total: IntCounter,
    pub save_dropped_blocks_total: IntCounter,
    pub loaded_blocks_total: IntCounter,
    /// By `device` and `direction`.
    pub transfer_bytes_total: IntCounterVec,
    /// By `device` and `direction`: one observation per save or load copy job.
    pub transfer_duration_seconds: HistogramVec,
    /// By `direction`: one observation per layer of each copy job.
    pub transfer_layer_duration_seconds: HistogramVec,
    /// By `direction`: jobs answered only once done because the event ring was full.
    pub event_ring_full_total: IntCounterVec,
    pub pool_capacity_bytes: IntGauge,
    pub pool_used_bytes: IntGauge,
    pub pool_leased_bytes: IntGauge,
    pub pool_pinned_bytes: IntGauge,
    pub pool_pages: IntGauge,
    pub pool_evictions_total: IntCounter,
    /// By `actor` (`transfer:<device>`): actors the node restarted after they died.
    pub actor_restarts_total: IntCounterVec,
    /// By `numa_node`: each NUMA node's pool (the `pool_*` gauges are their sums).
    pub numa_pool_capacity_bytes: IntGaugeVec,
    pub numa_pool_used_bytes: IntGaugeVec,
    pub numa_pool_pages: IntGaugeVec,
    pub sessions: IntGauge,
    pub engines: IntGauge,
    pub build_info: IntGaugeVec,
    pub start_time_seconds: IntGauge,
    /// `ssd.size`; 0 when the SSD tier is off.
    pub ssd_capacity_bytes: IntGauge,
    pub ssd_used_bytes: IntGauge,
    pub ssd_pages: IntGauge,
    pub ssd_segments: IntGauge,
    /// 1 while the tier writes, 0 after a write error stopped it.
    pub ssd_healthy: IntGauge,
    pub ssd_lookup_hit_blocks_total: IntCounter,
    pub ssd_reads_total: IntCounter,
    pub ssd_read_bytes_total: IntCounter,
    pub ssd_read_seconds_total: Counter,
    pub ssd_read_errors_total: IntCounter,
    pub ssd_writes_total: IntCounter,
    pub ssd_write_bytes_total: IntCounter,
    pub ssd_write_seconds_total: Counter,
    pub ssd_write_errors_total: IntCounter,
    pub ssd_segments_dropped_total: IntCounter,
    pub ssd_checksum_failures_total: IntCounter,
    pub ssd_spills_dropped_total: IntCounter,
    pub ssd_admission_rejected_total: IntCounter,
    /// KV events (one block stored or removed on one tier; a clear counts 1) sent on the PUB socket.
    pub events_published_total: IntCounter,
    /// KV events dropped because the publisher's queue was full.
    pub events_dropped_total: IntCounter,
    /// Set once OTLP export starts; empty (and free) when `otlp.endpoint` is unset.
    otlp: OnceLock<OtlpHooks>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let register = |c: Box<dyn Collector>| registry.register(c);
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(format!("pegaflow_{name}"), help)?;
            register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(format!("pegaflow_{name}"), help)?;
            register(Box::new(g.clone()))?;
            Ok(g)
        };
        let seconds = |name: &str, help: &str| -> Result<Counter, prometheus::Error> {
            let c = Counter::new(format!("pegaflow_{name}"), help)?;
            register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(format!("pegaflow_{name}"), help), labels)?;
            register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let histograms = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(format!("pegaflow_{name}"), help).buckets(buckets.into());
            let h = HistogramVec::new(opts, labels)?;
            register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(format!("pegaflow_{name}"), help), labels)?;
            register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let build_info = IntGaugeVec::new(
            Opts::new(
                "pegaflow_build_info",
                "Always 1; labels say which node version runs",
            ),
            &["version"],
        )?;
        register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let metrics = Self {
            requests_total: counters("requests_total", "Socket requests handled, by op", &["op"])?,
            errors_total: counters(
                "errors_total",
                "Error replies sent, by error code",
                &["code"],
            )?,
            request_duration_seconds: histograms(
                "request_duration_seconds",
                "Time from a request's arrival to its reply, by op",
                &["op"],
                &REQUEST_BUCKETS,
            )?,
            lookup_blocks_total: counter(
                "lookup_blocks_total",
                "Block keys asked about by lookups",
            )?,
            lookup_hit_blocks_total: counters(
                "lookup_hit_blocks_total",
                "Looked-up blocks of the held prefix, by the tier that holds them",
                &["tier"],
            )?,
            lookup_miss_blocks_total: counter(
                "lookup_miss_blocks_total",
                "Looked-up blocks past the held prefix",
            )?,
            saved_blocks_total: counter("saved_blocks_total", "Blocks newly stored by saves")?,
            save_dropped_blocks_total: counter(
                "save_dropped_blocks_total",
                "Blocks a save could not store because every pool page was leased",
            )?,
            loaded_blocks_total: counter(
                "loaded_blocks_total",
                "Blocks copied back into engines by loads",
            )?,
            transfer_bytes_total: counters(
                "transfer_bytes_total",
                "Bytes copied between engines and the pool, by copy device and direction",
                &["device", "direction"],
            )?,
            event_ring_full_total: counters(
                "event_ring_full_total",
                "Saves and loads that asked to be answered before their copies were done but \
                 found the engine's event ring full, so were answered once done, by direction",
                &["direction"],
            )?,
            transfer_duration_seconds: histograms(
                "transfer_duration_seconds",
                "Time one save's or load's copies take on the copy device, all layers",
                &["device", "direction"],
                &TRANSFER_BUCKETS,
            )?,
            transfer_layer_duration_seconds: histograms(
                "transfer_layer_duration_seconds",
                "Time from a layer's copies being handed to the copy device until they are known to have landed, by direction",
                &["direction"],
                &LAYER_BUCKETS,
            )?,
            pool_capacity_bytes: gauge("pool_capacity_bytes", "Pool arena size")?,
            pool_used_bytes: gauge(
                "pool_used_bytes",
                "Pool bytes holding stored or in-flight blocks",
            )?,
            pool_leased_bytes: gauge(
                "pool_leased_bytes",
                "Pool bytes pinned by lookups, loads and in-flight saves",
            )?,
            pool_pinned_bytes: gauge(
                "pool_pinned_bytes",
                "Pool bytes registered (page-locked) for GPU DMA so far; 0 with the host engine",
            )?,
            pool_pages: gauge("pool_pages", "Blocks stored in the pool")?,
            pool_evictions_total: counter("pool_evictions_total", "Blocks evicted to make room")?,
            actor_restarts_total: counters(
                "actor_restarts_total",
                "Actors restarted after they failed, by actor",
                &["actor"],
            )?,
            numa_pool_capacity_bytes: gauges(
                "numa_pool_capacity_bytes",
                "Size of the pool of one NUMA node",
                &["numa_node"],
            )?,
            numa_pool_used_bytes: gauges(
                "numa_pool_used_bytes",
                "Bytes of one NUMA node's pool holding stored or in-flight blocks",
                &["numa_node"],
            )?,
            numa_pool_pages: gauges(
                "numa_pool_pages",
                "Blocks stored in one NUMA node's pool",
                &["numa_node"],
            )?,
            sessions: gauge("sessions", "Open connector sessions")?,
            engines: gauge("engines", "Engines registered over open sessions")?,
            build_info,
            start_time_seconds: gauge(
                "start_time_seconds",
                "When the node started, in seconds since the Unix epoch",
            )?,
            ssd_capacity_bytes: gauge(
                "ssd_capacity_bytes",
                "SSD tier capacity (ssd.size); 0 when the tier is off",
            )?,
            ssd_used_bytes: gauge("ssd_used_bytes", "Bytes of SSD segment files")?,
            ssd_pages: gauge("ssd_pages", "Blocks held on SSD")?,
            ssd_segments: gauge("ssd_segments", "SSD segment files")?,
            ssd_healthy: gauge(
                "ssd_healthy",
                "1 while the SSD tier writes; 0 after a write error (disk full) stopped spills",
            )?,
            ssd_lookup_hit_blocks_total: counter(
                "ssd_lookup_hit_blocks_total",
                "Looked-up blocks of the held prefix found only on SSD",
            )?,
            ssd_reads_total: counter("ssd_reads_total", "Blocks promoted from SSD into the pool")?,
            ssd_read_bytes_total: counter(
                "ssd_read_bytes_total",
                "Bytes promoted from SSD into the pool",
            )?,
            ssd_read_seconds_total: seconds(
                "ssd_read_seconds_total",
                "Time spent reading and verifying promoted SSD records (summed over threads)",
            )?,
            ssd_read_errors_total: counter(
                "ssd_read_errors_total",
                "SSD reads that failed with an I/O error",
            )?,
            ssd_writes_total: counter("ssd_writes_total", "Blocks written to SSD")?,
            ssd_write_bytes_total: counter(
                "ssd_write_bytes_total",
                "Bytes written to SSD segments, record headers and padding included",
            )?,
            ssd_write_seconds_total: seconds(
                "ssd_write_seconds_total",
                "Time spent in SSD writes and their fdatasync",
            )?,
            ssd_write_errors_total: counter(
                "ssd_write_errors_total",
                "SSD write errors (disk full, I/O errors); each stops spills",
            )?,
            ssd_segments_dropped_total: counter(
                "ssd_segments_dropped_total",
                "Oldest SSD segments dropped to stay under ssd.size",
            )?,
            ssd_checksum_failures_total: counter(
                "ssd_checksum_failures_total",
                "SSD records that failed their checksum on read; each became a miss",
            )?,
            ssd_spills_dropped_total: counter(
                "ssd_spills_dropped_total",
                "Evicted pages not written to SSD because the staging queue was full or the tier failed",
            )?,
            ssd_admission_rejected_total: counter(
                "ssd_admission_rejected_total",
                "Evicted pages the admission policy kept off the SSD",
            )?,
            events_published_total: counter(
                "events_published_total",
                "KV events published (one block stored or removed on one tier; a clear counts 1)",
            )?,
            events_dropped_total: counter(
                "events_dropped_total",
                "KV events dropped because the publisher's queue was full; subscribers see a sequence gap",
            )?,
            otlp: OnceLock::new(),
            registry,
        };
        metrics.start_time_seconds.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
        // Series that exist from the start, so rate() and dashboards see 0, not "no data".
        for op in OPS {
            metrics.requests_total.with_label_values(&[op]);
            metrics.request_duration_seconds.with_label_values(&[op]);
        }
        for tier in TIERS {
            metrics.lookup_hit_blocks_total.with_label_values(&[tier]);
        }
        for direction in [Direction::Save, Direction::Load] {
            let label = [direction_label(direction)];
            metrics
                .transfer_layer_duration_seconds
                .with_label_values(&label);
            metrics.event_ring_full_total.with_label_values(&label);
        }
        Ok(metrics)
    }

    /// The registry, for the OTLP bridge and the stats document.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Installs the OTLP hooks; later calls are ignored (one exporter per node).
    pub fn set_otlp(&self, hooks: OtlpHooks) {
        let _ = self.otlp.set(hooks);
    }

    /// Creates a copy device's series, so they are exported before its first copy.
    pub fn add_device(&self, device: &str) {
        for direction in [Direction::Save, Direction::Load] {
            let labels = [device, direction_label(direction)];
            self.transfer_bytes_total.with_label_values(&labels);
            self.transfer_duration_seconds.with_label_values(&labels);
        }
    }

    /// Counts one answered request: its op, latency, error code, and its OTLP span.
    pub fn request_done(
        &self,
        op: &'static str,
        elapsed: Duration,
        result: &Result<ReplyBody, ProtoError>,
    ) {
        let code = result.as_ref().err().map(|e| e.code);
        self.requests_total.with_label_values(&[op]).inc();
        self.request_duration_seconds
            .with_label_values(&[op])
            .observe(elapsed.as_secs_f64());
        if let Some(code) = code {
            self.errors_total.with_label_values(&[code.as_str()]).inc();
        }
        if let Some(hooks) = self.otlp.get() {
            hooks.request_done(op, elapsed, result);
        }
    }

    /// Counts one lookup of `asked` keys that found `hits` (of which `ssd_hits` on SSD only and
    /// `remote_hits` on peers only).
    pub fn lookup_done(&self, asked: u64, hits: u64, ssd_hits: u64, remote_hits: u64) {
        self.lookup_blocks_total.inc_by(asked);
        self.lookup_hit_blocks_total
            .with_label_values(&["memory"])
            .inc_by(hits - ssd_hits - remote_hits);
        self.lookup_hit_blocks_total
            .with_label_values(&["ssd"])
            .inc_by(ssd_hits);
        self.lookup_hit_blocks_total
            .with_label_values(&["remote"])
            .inc_by(remote_hits);
        self.lookup_miss_blocks_total.inc_by(asked - hits);
    }

    /// Counts one finished copy job of `bytes` on `device`.
    pub fn transfer_done(&self, device: &str, direction: Direction, bytes: u64, took: Duration) {
        let labels = [device, direction_label(direction)];
        self.transfer_bytes_total
            .with_label_values(&labels)
            .inc_by(bytes);
        self.transfer_duration_seconds
            .with_label_values(&labels)
            .observe(took.as_secs_f64());
        if let Some(hooks) = self.otlp.get() {
            hooks.transfer_done(&labels, took);
        }
    }

    /// Counts one layer of a copy job in `direction` that took `took` from submission to landing.
    pub fn layer_done(&self, direction: Direction, took: Duration) {
        let label = direction_label(direction);
        self.transfer_layer_duration_seconds
            .with_label_values(&[label])
            .observe(took.as_secs_f64());
        if let Some(hooks) = self.otlp.get() {
            hooks.layer_done(label, took);
        }
    }

    /// Follows the background pinning of the pool (CUDA engine) into `pool_pinned_bytes`
    /// until it completes or fails; `progress` is the engine's own report.
    pub fn track_pinning(
        self: &std::sync::Arc<Self>,
        progress: impl Fn() -> PinProgress + Send + 'static,
    ) {
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let now = progress();
                metrics.pool_pinned_bytes.set(now.pinned_bytes as i64);
                if now.is_complete() || now.failure.is_some() {
                    return;
                }
            }
        });
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec only fails on invalid metric data, which the
        // typed constructors above rule out; an empty page is the honest fallback.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Names in docs/metrics.md's tables: the first column, in backticks.
    fn documented() -> BTreeSet<String> {
        include_str!("../../docs/metrics.md")
            .lines()
            .filter_map(|line| line.strip_prefix("| `pegaflow_"))
            .filter_map(|rest| rest.split('`').next())
            .map(|name| format!("pegaflow_{name}"))
            .collect()
    }

    #[test]
    fn every_exported_metric_is_documented_and_every_documented_one_exported() {
        let metrics = Metrics::new().expect("metrics");
        metrics.add_device("host");
        // Error codes get a series once sent; NUMA pools once a pool starts.
        metrics.errors_total.with_label_values(&["internal"]);
        metrics
            .actor_restarts_total
            .with_label_values(&["transfer:host"]);
        for gauge in [
            &metrics.numa_pool_capacity_bytes,
            &metrics.numa_pool_used_bytes,
            &metrics.numa_pool_pages,
        ] {
            gauge.with_label_values(&["0"]);
        }
        // The fabric's series, registered when `fabric.enabled`; per-peer ones once measured.
        let fabric = crate::peers::FabricMetrics::new(metrics.registry()).expect("fabric metrics");
        fabric.peer_rtt("peer-a", Duration::from_millis(1));
        fabric.received_from("peer-a", 1);
        fabric.peer_digest_age("peer-a", Duration::from_millis(1));
        let exported: BTreeSet<String> = metrics
            .registry()
            .gather()
            .iter()
            .map(|family| family.name().to_string())
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = exported.difference(&documented).collect();
        let unexported: Vec<_> = documented.difference(&exported).collect();
        assert!(
            undocumented.is_empty(),
            "exported but not in docs/metrics.md: {undocumented:?}"
        );
        assert!(
            unexported.is_empty(),
            "in docs/metrics.md but not exported: {unexported:?}"
        );
    }
}
