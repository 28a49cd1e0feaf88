//! The router's Prometheus metrics (`/metrics`), named like the node's: the `pegaflow_router_`
//! prefix, units in the name, `_total` on counters. docs/pd.md lists every one; series whose
//! label values are known at start exist from start at 0, so a rate is never missing.

use prometheus::{
    Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::backend::Role;
use crate::pd::{Endpoint, Fallback, Outcome};
use crate::prefix::PrefixOutcome;

/// Latency buckets from 1 ms (a handoff of blocks already saved) to 60 s (a long prefill).
const BUCKETS: [f64; 15] = [
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Block-count buckets, 0 (nothing cached) to 16384 (a 256K-token prompt of 16-token blocks).
const BLOCK_BUCKETS: [f64; 9] = [0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];

/// Every metric the router exports, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// By `endpoint` and `outcome` (see [`Outcome`]); a stream counts when it ends.
    pub requests_total: IntCounterVec,
    /// The prefill phase, retries included, until a prefill engine answered or all failed.
    pub prefill_seconds: Histogram,
    /// From the prefill engine's answer until the node confirmed its blocks stored.
    pub handoff_seconds: Histogram,
    /// By `reason` (see [`Fallback`]): requests decoded without a confirmed handoff.
    pub fallbacks_total: IntCounterVec,
    /// By `role`: attempts on another backend after one failed.
    pub retries_total: IntCounterVec,
    /// By `role` and `backend`: requests the router has in flight there.
    pub backend_in_flight: IntGaugeVec,
    /// By `role` and `backend`: attempts that failed (refused, reset, 5xx, timeout).
    pub backend_failures_total: IntCounterVec,
    /// By `outcome` (see [`PrefixOutcome`]): prefix-aware choices of a prefill engine.
    pub prefix_choices_total: IntCounterVec,
    /// Blocks of the prompt the node of the prefill engine chosen by prefix or load holds.
    pub prefix_cached_blocks: Histogram,
}

impl Metrics {
    /// Registers every metric. Per-backend series are made by [`crate::backend::Backends`].
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "pegaflow_router_requests_total",
                "Client requests by endpoint and outcome",
            ),
            &["endpoint", "outcome"],
        )?;
        let prefill_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "pegaflow_router_prefill_seconds",
                "Prefill phase duration, retries included",
            )
            .buckets(BUCKETS.to_vec()),
        )?;
        let handoff_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "pegaflow_router_handoff_seconds",
                "From the prefill answer until the node confirmed its blocks stored",
            )
            .buckets(BUCKETS.to_vec()),
        )?;
        let fallbacks_total = IntCounterVec::new(
            Opts::new(
                "pegaflow_router_fallbacks_total",
                "Requests decoded without a confirmed handoff, by reason",
            ),
            &["reason"],
        )?;
        let retries_total = IntCounterVec::new(
            Opts::new(
                "pegaflow_router_retries_total",
                "Attempts on another backend after one failed, by role",
            ),
            &["role"],
        )?;
        let backend_in_flight = IntGaugeVec::new(
            Opts::new(
                "pegaflow_router_backend_in_flight",
                "Requests in flight per backend",
            ),
            &["role", "backend"],
        )?;
        let backend_failures_total = IntCounterVec::new(
            Opts::new(
                "pegaflow_router_backend_failures_total",
                "Failed attempts per backend",
            ),
            &["role", "backend"],
        )?;
        let prefix_choices_total = IntCounterVec::new(
            Opts::new(
                "pegaflow_router_prefix_choices_total",
                "Prefix-aware choices of a prefill engine, by outcome",
            ),
            &["outcome"],
        )?;
        let prefix_cached_blocks = Histogram::with_opts(
            HistogramOpts::new(
                "pegaflow_router_prefix_cached_blocks",
                "Prompt blocks held by the node of the prefill engine chosen",
            )
            .buckets(BLOCK_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(prefill_seconds.clone()))?;
        registry.register(Box::new(handoff_seconds.clone()))?;
        registry.register(Box::new(fallbacks_total.clone()))?;
        registry.register(Box::new(retries_total.clone()))?;
        registry.register(Box::new(backend_in_flight.clone()))?;
        registry.register(Box::new(backend_failures_total.clone()))?;
        registry.register(Box::new(prefix_choices_total.clone()))?;
        registry.register(Box::new(prefix_cached_blocks.clone()))?;
        let metrics = Self {
            registry,
            requests_total,
            prefill_seconds,
            handoff_seconds,
            fallbacks_total,
            retries_total,
            backend_in_flight,
            backend_failures_total,
            prefix_choices_total,
            prefix_cached_blocks,
        };
        metrics.touch_known_series();
        Ok(metrics)
    }

    /// Creates every series whose labels are known now, at 0.
    fn touch_known_series(&self) {
        for endpoint in Endpoint::ALL {
            for outcome in Outcome::ALL {
                self.requests_total
                    .with_label_values(&[endpoint.label(), outcome.label()]);
            }
        }
        for reason in Fallback::ALL {
            self.fallbacks_total.with_label_values(&[reason.label()]);
        }
        for role in [Role::Prefill, Role::Decode] {
            self.retries_total.with_label_values(&[role.label()]);
        }
        for outcome in PrefixOutcome::ALL {
            self.prefix_choices_total
                .with_label_values(&[outcome.label()]);
        }
    }

    /// The Prometheus text page.
    pub fn render(&self) -> String {
        // Encoding only fails on invalid metric data, which the typed constructors above rule
        // out; an empty page is the honest fallback.
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
