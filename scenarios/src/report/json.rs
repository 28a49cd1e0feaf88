//! The report's data: everything a run measured, serializable as the JSON report and read
//! back by the HTML renderer and the tests. Each report carries the scenario text and the
//! versions that produced it, so a number can always be traced to its exact inputs.

use std::path::Path;

use pegaflow_actors::stats::NodeStats;
use serde::{Deserialize, Serialize};

use crate::error::ScenarioError;

/// One scenario's report: one run per pool size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    /// The scenario file, verbatim.
    pub scenario_toml: String,
    pub version: Version,
    pub generated_unix_s: u64,
    /// Requests replayed per run, when the command line capped them.
    pub request_limit: Option<usize>,
    pub runs: Vec<RunResult>,
    /// Every run's checks held.
    pub passed: bool,
}

/// What made the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Version {
    /// `pegaflow-scenarios` crate version.
    pub harness: String,
    /// `$PEGAFLOW_GIT_COMMIT`, else `git rev-parse HEAD` in the working directory.
    pub git_commit: Option<String>,
    /// The node binary replayed against, and the version it reports.
    pub node_binary: String,
    pub node_version: Option<String>,
}

/// One replay of the workload on one cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub pool_bytes: u64,
    pub page_bytes: u64,
    /// Pages one node's pool holds.
    pub capacity_pages: u64,
    pub nodes: u32,
    pub engines: u32,
    pub routing: String,
    pub requests: u64,
    /// Requests served without the cache because their node was down.
    pub degraded_requests: u64,
    pub blocks: BlockCounts,
    /// Loaded blocks over looked-up blocks: what the cache delivered, so a remote claim a
    /// fetch could not fill is a miss.
    pub block_hit_ratio: f64,
    /// Loaded tokens over prompt tokens (partial trailing blocks count as misses).
    pub token_hit_ratio: f64,
    pub ttft: Ttft,
    pub latency: OpLatency,
    pub timeline: Vec<Bucket>,
    pub tiers: Tiers,
    pub nodes_detail: Vec<NodeSummary>,
    pub faults: Vec<FaultRecord>,
    pub checks: Checks,
    /// Virtual seconds the replay covered, and wall seconds it took.
    pub virtual_s: f64,
    pub wall_s: f64,
}

/// Block counts over the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BlockCounts {
    pub looked_up: u64,
    /// Hits the lookups reported: memory, SSD and remote (peers' digests) together.
    pub hit: u64,
    pub ssd_hit: u64,
    /// Hits only peers held, as their digests claimed at lookup.
    pub remote_hit: u64,
    pub loaded: u64,
    /// Loaded blocks the node fetched from peers through the fabric.
    pub remote_loaded: u64,
    pub corrupt: u64,
    pub stored: u64,
    pub present: u64,
    pub dropped: u64,
    /// Computed blocks never saved (the node was down).
    pub unsaved: u64,
}

/// The TTFT model: lookup + load (measured) + transfer of the hit KV at the modeled
/// bandwidth + prefill of the missed tokens at the modeled speed. Queueing is separate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ttft {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// The same requests with no cache at all.
    pub cold_mean_ms: f64,
    /// `cold_mean_ms / mean_ms`.
    pub speedup: f64,
    pub queue_mean_ms: f64,
    /// `(percentile, ms)` points of the distribution, with and without the cache.
    pub cdf: Vec<[f64; 2]>,
    pub cold_cdf: Vec<[f64; 2]>,
}

/// Measured socket round trips of the real node.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OpLatency {
    pub lookup_p50_us: f64,
    pub lookup_p99_us: f64,
    pub load_p50_us: f64,
    pub load_p99_us: f64,
}

/// One slice of virtual time, by request arrival.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bucket {
    pub start_s: f64,
    pub requests: u64,
    pub looked_up: u64,
    pub hit: u64,
    pub hit_ratio: f64,
    pub ttft_mean_ms: f64,
}

/// Bytes moved per tier: measured on the nodes (their small simulated pages), and modeled
/// for the engine's real model shape.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tiers {
    pub memory_saved_bytes: u64,
    pub memory_loaded_bytes: u64,
    pub ssd_written_bytes: u64,
    pub ssd_read_bytes: u64,
    pub ssd_checksum_failures: u64,
    pub ssd_segments_dropped: u64,
    pub evictions: u64,
    /// Fabric: page bytes the nodes fetched from peers, pages they served to peers, claims
    /// that were false (the peer held nothing) and fetches that failed (link down, deadline).
    pub remote_fetched_bytes: u64,
    pub remote_served_pages: u64,
    pub remote_false_positives: u64,
    pub remote_fetch_failures: u64,
    /// KV bytes the modeled engine would have loaded instead of recomputing, and the part of
    /// them that crossed the network from peers.
    pub modeled_loaded_bytes: u64,
    pub modeled_remote_bytes: u64,
    pub modeled_recomputed_tokens: u64,
}

impl Tiers {
    /// Adds one node lifetime's counters.
    pub fn add(&mut self, life: &NodeStats) {
        self.memory_saved_bytes += life.totals.save_bytes;
        self.memory_loaded_bytes += life.totals.load_bytes;
        self.evictions += life.pool.evictions;
        if let Some(ssd) = &life.ssd {
            self.ssd_written_bytes += ssd.write_bytes;
            self.ssd_read_bytes += ssd.read_bytes;
            self.ssd_checksum_failures += ssd.checksum_failures;
            self.ssd_segments_dropped += ssd.segments_dropped;
        }
        if let Some(fabric) = &life.fabric {
            self.remote_fetched_bytes += fabric.fetched_bytes;
            self.remote_served_pages += fabric.served_pages;
            self.remote_false_positives += fabric.false_positives;
            self.remote_fetch_failures += fabric.fetch_failures;
        }
    }
}

/// One node over the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeSummary {
    pub index: u32,
    pub restarts: u32,
    /// `/api/stats` of each lifetime, the last one taken at the end of the run.
    pub lifetimes: Vec<NodeStats>,
}

/// What one fault did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRecord {
    pub at_ms: u64,
    pub kind: String,
    pub target: String,
    /// What the harness did.
    pub action: String,
    /// What the system did about it, as observed.
    pub effect: String,
    /// `None`: not applicable here (the report says why).
    pub recovered: Option<bool>,
}

impl FaultRecord {
    /// A fault just applied: no effect observed yet, not recovered until shown otherwise.
    pub fn pending(at_ms: u64, kind: &str, target: String, action: String) -> Self {
        Self {
            at_ms,
            kind: kind.into(),
            target,
            action,
            effect: String::new(),
            recovered: Some(false),
        }
    }
}

/// The invariants a chaos run must keep.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Checks {
    pub corrupt_loads: u64,
    /// Pages still pinned or reserved (`pool.leased_pages + pool.writing_pages`), summed over
    /// nodes once the run is over.
    pub leaked_pages: u64,
    /// Blocks a `persist` save acknowledged, and how many of those a fault lost.
    pub acked_blocks: u64,
    pub acked_checked: u64,
    pub acked_lost: u64,
    pub faults_recovered: u64,
    pub faults_failed: u64,
    pub faults_skipped: u64,
    pub passed: bool,
}

impl Checks {
    /// Whether every invariant held.
    pub fn holds(&self) -> bool {
        self.corrupt_loads == 0
            && self.leaked_pages == 0
            && self.acked_lost == 0
            && self.faults_failed == 0
    }
}

impl Report {
    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), ScenarioError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| ScenarioError::Io {
            what: format!("encode {}", path.display()),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(path, text).map_err(ScenarioError::io(format!("write {}", path.display())))
    }
}

/// The git commit: `$PEGAFLOW_GIT_COMMIT`, else `git rev-parse HEAD` where the harness runs.
pub fn git_commit() -> Option<String> {
    if let Ok(commit) = std::env::var("PEGAFLOW_GIT_COMMIT") {
        return Some(commit);
    }
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !commit.is_empty()).then_some(commit)
}
