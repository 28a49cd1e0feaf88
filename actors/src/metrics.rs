//! Prometheus metrics of the node (`/metrics`). Names follow Prometheus conventions: the
//! `pegaflow_` prefix, units in the name, `_total` on counters.

use prometheus::{
    Counter, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric the node exports, registered in one registry.
pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub errors_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub lookup_blocks_total: IntCounter,
    pub lookup_hit_blocks_total: IntCounter,
    pub lookup_miss_blocks_total: IntCounter,
    pub saved_blocks_total: IntCounter,
    pub loaded_blocks_total: IntCounter,
    pub save_bytes_total: IntCounter,
    pub load_bytes_total: IntCounter,
    pub pool_capacity_bytes: IntGauge,
    pub pool_used_bytes: IntGauge,
    pub pool_leased_bytes: IntGauge,
    pub pool_pages: IntGauge,
    pub pool_evictions_total: IntCounter,
    pub sessions: IntGauge,
    pub engines: IntGauge,
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
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(format!("pegaflow_{name}"), help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(format!("pegaflow_{name}"), help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let seconds = |name: &str, help: &str| -> Result<Counter, prometheus::Error> {
            let c = Counter::new(format!("pegaflow_{name}"), help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let requests_total = IntCounterVec::new(
            Opts::new("pegaflow_requests_total", "Socket requests handled, by op"),
            &["op"],
        )?;
        registry.register(Box::new(requests_total.clone()))?;
        let errors_total = IntCounterVec::new(
            Opts::new("pegaflow_errors_total", "Error replies sent, by error code"),
            &["code"],
        )?;
        registry.register(Box::new(errors_total.clone()))?;
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "pegaflow_request_duration_seconds",
                "Time from a request's arrival to its reply, by op",
            )
            .buckets(vec![
                1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["op"],
        )?;
        registry.register(Box::new(request_duration_seconds.clone()))?;
        Ok(Self {
            requests_total,
            errors_total,
            request_duration_seconds,
            lookup_blocks_total: counter(
                "lookup_blocks_total",
                "Block keys asked about by lookups",
            )?,
            lookup_hit_blocks_total: counter(
                "lookup_hit_blocks_total",
                "Looked-up blocks found in the pool (leading prefix)",
            )?,
            lookup_miss_blocks_total: counter(
                "lookup_miss_blocks_total",
                "Looked-up blocks past the held prefix",
            )?,
            saved_blocks_total: counter("saved_blocks_total", "Blocks newly stored by saves")?,
            loaded_blocks_total: counter(
                "loaded_blocks_total",
                "Blocks copied back into engines by loads",
            )?,
            save_bytes_total: counter(
                "save_bytes_total",
                "Bytes copied from engines into the pool",
            )?,
            load_bytes_total: counter(
                "load_bytes_total",
                "Bytes copied from the pool into engines",
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
            pool_pages: gauge("pool_pages", "Blocks stored in the pool")?,
            pool_evictions_total: counter("pool_evictions_total", "Blocks evicted to make room")?,
            sessions: gauge("sessions", "Open connector sessions")?,
            engines: gauge("engines", "Engines registered over open sessions")?,
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
            registry,
        })
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
