//! The scenario file: one TOML document saying what cluster to start, what workload to replay
//! on it, which faults to inject when, and what to report. Parsed strictly (unknown keys are
//! errors) so a typo never silently changes what a checked-in scenario measures, and kept
//! verbatim so every report can embed the exact text that produced it.

use std::path::{Path, PathBuf};

use pegaflow_config::Size;
use serde::{Deserialize, Serialize};

use crate::error::ScenarioError;

/// A parsed scenario plus where it came from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub cluster: ClusterSpec,
    /// Fabric timings; only with `cluster.fabric = true`.
    #[serde(default)]
    pub fabric: Option<FabricSpec>,
    #[serde(default)]
    pub engine: EngineSpec,
    #[serde(default)]
    pub routing: RoutingSpec,
    pub workload: WorkloadSpec,
    #[serde(default)]
    pub run: RunSpec,
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    #[serde(default)]
    pub report: ReportSpec,
    /// The file's text, embedded in reports.
    #[serde(skip)]
    pub source: String,
    /// The directory relative paths (trace files) resolve against.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// Cluster shape: node processes on loopback, their tiers, and engines per node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub nodes: u32,
    pub engines_per_node: u32,
    /// Pinned pool per node.
    pub pool: Size,
    /// SSD tier per node; `0B` turns it off.
    #[serde(default)]
    pub ssd: Size,
    /// `ssd.admission` of the nodes (`always`, `second_hit`, `never`).
    #[serde(default)]
    pub ssd_admission: Option<String>,
    /// Put each node's SSD directory on its own tmpfs of `ssd` bytes (needs root), so a
    /// `fill_disk` fault hits a real ENOSPC instead of the tier's size budget.
    #[serde(default)]
    pub ssd_tmpfs: bool,
    /// The nodes form one fabric cluster on loopback (gossip, digests, peer fetches), so a
    /// block saved on one node is a remote hit on the others.
    #[serde(default)]
    pub fabric: bool,
}

/// How the nodes' fabric runs (`fabric.*` of each node's config), and the modeled network.
/// Gossip runs in wall time while the replay runs in virtual time: `run.time_scale` decides
/// how much virtual time a digest needs to reach the peers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FabricSpec {
    /// `fabric.gossip_interval_ms`: how quickly saved blocks become remote hits elsewhere.
    pub gossip_interval_ms: u64,
    /// `fabric.failure_timeout_ms`: silence before a peer counts as dead.
    pub failure_timeout_ms: u64,
    /// `fabric.fetch_timeout_ms`: how long a load waits for peers before recomputing.
    pub fetch_timeout_ms: u64,
    /// Network bandwidth of the modeled cluster, for the TTFT of blocks loaded from peers.
    pub link_gbps: f64,
}

impl Default for FabricSpec {
    fn default() -> Self {
        Self {
            gossip_interval_ms: 100,
            failure_timeout_ms: 1500,
            fetch_timeout_ms: 1000,
            link_gbps: 25.0,
        }
    }
}

/// The simulated engine: model shape of the KV region it registers, and its speed model.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSpec {
    /// Tokens per KV block; must divide the workload's `hash_block_tokens`.
    pub block_size: u32,
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// Prefill speed of the modeled engine, for the compute time of missed tokens.
    pub prefill_tokens_per_s: f64,
    /// KV bytes per token of the modeled model (Llama-3.1-8B bf16: 131072), for load time.
    pub model_kv_bytes_per_token: u64,
    /// Host-to-GPU bandwidth of the modeled engine, for load time.
    pub load_gbps: f64,
    /// Saves ask the node to persist to SSD before acknowledging (`save` with `persist`).
    pub persist: bool,
}

impl Default for EngineSpec {
    fn default() -> Self {
        Self {
            block_size: 32,
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 16,
            prefill_tokens_per_s: 20_000.0,
            model_kv_bytes_per_token: 131_072,
            load_gbps: 25.0,
            persist: false,
        }
    }
}

impl EngineSpec {
    /// Bytes of one block of one layer (`vllm_lbnhc`, bf16: K and V per head).
    pub fn segment_bytes(&self) -> u64 {
        u64::from(self.block_size) * u64::from(self.num_kv_heads) * 2 * u64::from(self.head_dim) * 2
    }

    /// Bytes of one pool page (every layer of one block).
    pub fn page_bytes(&self) -> u64 {
        self.segment_bytes() * u64::from(self.num_layers)
    }
}

/// How requests are spread over engines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingPolicy {
    #[default]
    RoundRobin,
    PrefixAware,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSpec {
    #[serde(default)]
    pub policy: RoutingPolicy,
}

/// What to replay.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkloadSpec {
    /// A Mooncake-format JSONL trace; `path` is relative to the scenario file.
    Trace {
        path: PathBuf,
        /// Replay only the first `requests` lines (after `skip`).
        #[serde(default)]
        requests: Option<usize>,
        #[serde(default)]
        skip: usize,
        #[serde(default = "default_hash_block")]
        hash_block_tokens: u32,
    },
    /// A seeded generator.
    Synthetic(SyntheticSpec),
}

fn default_hash_block() -> u32 {
    512
}

/// Synthetic generators; every one emits Mooncake-format requests.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    pub generator: Generator,
    pub seed: u64,
    pub requests: usize,
    /// Mean gap between arrivals (exponential), virtual ms.
    #[serde(default = "default_gap")]
    pub mean_gap_ms: f64,
    #[serde(default = "default_hash_block")]
    pub hash_block_tokens: u32,
    /// Shared system prompt length (all generators may start with one; 0 = none).
    #[serde(default)]
    pub system_prompt_tokens: u32,
    /// Unique user text per request or turn.
    #[serde(default = "default_user")]
    pub user_tokens: u32,
    /// Output tokens per request or turn (appended to the context of the next turn).
    #[serde(default = "default_output")]
    pub output_tokens: u32,
    /// `multi_turn` and `agent_loop`: concurrent conversations and turns per conversation.
    #[serde(default = "default_conversations")]
    pub conversations: usize,
    #[serde(default = "default_turns")]
    pub turns: usize,
    /// `zipf`: number of documents and their length, and the exponent.
    #[serde(default = "default_documents")]
    pub documents: usize,
    #[serde(default = "default_document_tokens")]
    pub document_tokens: u32,
    #[serde(default = "default_zipf")]
    pub zipf_s: f64,
}

fn default_gap() -> f64 {
    100.0
}
fn default_user() -> u32 {
    512
}
fn default_output() -> u32 {
    256
}
fn default_conversations() -> usize {
    16
}
fn default_turns() -> usize {
    8
}
fn default_documents() -> usize {
    200
}
fn default_document_tokens() -> u32 {
    4096
}
fn default_zipf() -> f64 {
    1.0
}

/// Which synthetic generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Generator {
    /// Every request: the shared system prompt, then unique user text.
    SharedPrompt,
    /// Conversations whose turns each extend the previous turn's context.
    MultiTurn,
    /// Few long-lived loops appending a short tool result per step.
    AgentLoop,
    /// Documents picked by Zipf popularity, each followed by a unique question.
    Zipf,
}

/// How the replay runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    /// Wall seconds per virtual second: 0 replays as fast as the node answers (the order of
    /// events is still the virtual one); 1 is real time; 0.01 runs a hundred times faster.
    pub time_scale: f64,
    /// Width of the report's time-series buckets, virtual seconds.
    pub bucket_s: f64,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            time_scale: 0.0,
            bucket_s: 60.0,
        }
    }
}

/// One fault on the schedule. Decoded through a table (`at_ms` first, the rest as the
/// fault) because serde cannot refuse unknown keys of a flattened enum.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct FaultSpec {
    /// Virtual time of the fault, ms from the workload's start.
    pub at_ms: u64,
    #[serde(flatten)]
    pub kind: FaultKind,
}

impl TryFrom<toml::Table> for FaultSpec {
    type Error = String;

    fn try_from(mut table: toml::Table) -> Result<Self, String> {
        let at_ms = table
            .remove("at_ms")
            .ok_or("missing field `at_ms`")?
            .as_integer()
            .and_then(|ms| u64::try_from(ms).ok())
            .ok_or("`at_ms` must be a non-negative integer")?;
        let kind = FaultKind::deserialize(toml::Value::Table(table)).map_err(|e| e.to_string())?;
        Ok(Self { at_ms, kind })
    }
}

/// What a fault does.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultKind {
    /// SIGKILL the node while requests are in flight, restart it `restart_after_ms` later.
    KillNode { node: u32, restart_after_ms: u64 },
    /// SIGTERM (graceful drain) and start again at once.
    RestartNode { node: u32 },
    /// The engine process dies (connection dropped with a lookup lease held) and comes back.
    RestartEngine { engine: u32 },
    /// Flip one byte in the data of `pages` records of the node's SSD segment files.
    CorruptSsd { node: u32, pages: u32 },
    /// Fill the node's SSD filesystem (needs `ssd_tmpfs`), free it `recover_after_ms` later
    /// and restart the node, as the operations guide says.
    FillDisk { node: u32, recover_after_ms: u64 },
    /// Cut every peer's links into the node (connections closed and refused, gossip to it
    /// discarded) for `duration_ms`; peers' fetches must fall through.
    DropLink { node: u32, duration_ms: u64 },
    /// Add `delay_ms` to each direction of every peer's links into the node for `duration_ms`.
    DelayLink {
        node: u32,
        delay_ms: u64,
        duration_ms: u64,
    },
}

impl FaultKind {
    /// The node whose fabric port the fault cuts or slows, for link faults.
    pub fn link_node(&self) -> Option<u32> {
        match self {
            FaultKind::DropLink { node, .. } | FaultKind::DelayLink { node, .. } => Some(*node),
            _ => None,
        }
    }
}

/// What to report beyond the default.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    /// Replay the workload once per pool size and chart hit ratio against capacity.
    #[serde(default)]
    pub capacity_sweep: Vec<Size>,
    /// Fail the run unless every check holds (corrupt loads, leaked pages, faults recovered,
    /// acknowledged blocks lost).
    #[serde(default)]
    pub assert_checks: bool,
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::parse(&text, &base).map_err(|error| match error {
            ScenarioError::Parse(why) => ScenarioError::Parse(format!("{}: {why}", path.display())),
            other => other,
        })
    }

    /// Parses and validates scenario text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, ScenarioError> {
        let mut scenario: Scenario =
            toml::from_str(text).map_err(|e| ScenarioError::Parse(e.to_string()))?;
        scenario.source = text.to_string();
        scenario.base_dir = base_dir.to_path_buf();
        scenario.validate()?;
        Ok(scenario)
    }

    /// Total engines in the cluster.
    pub fn engines(&self) -> u32 {
        self.cluster.nodes * self.cluster.engines_per_node
    }

    /// The fabric's settings when the cluster runs one.
    pub fn fabric(&self) -> Option<FabricSpec> {
        self.cluster
            .fabric
            .then(|| self.fabric.clone().unwrap_or_default())
    }

    /// Pool sizes to replay: the sweep, or the cluster's one pool.
    pub fn pool_sizes(&self) -> Vec<Size> {
        if self.report.capacity_sweep.is_empty() {
            vec![self.cluster.pool]
        } else {
            self.report.capacity_sweep.clone()
        }
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        let invalid = |field: &str, why: String| {
            Err(ScenarioError::Invalid {
                field: field.to_string(),
                why,
            })
        };
        self.validate_fabric()?;
        if self.cluster.nodes == 0 || self.cluster.engines_per_node == 0 {
            return invalid(
                "cluster",
                "nodes and engines_per_node must be at least 1".into(),
            );
        }
        let page = self.engine.page_bytes();
        if page == 0 || !page.is_multiple_of(4096) {
            return invalid(
                "engine",
                format!("one page is {page} bytes; choose a shape whose page is a multiple of 4 KiB, so the pool holds exactly pool / page pages"),
            );
        }
        for size in self.pool_sizes() {
            if size.bytes() < page {
                return invalid(
                    "cluster.pool",
                    format!("{size} holds not one {page}-byte page"),
                );
            }
        }
        let hash_block = match &self.workload {
            WorkloadSpec::Trace {
                hash_block_tokens, ..
            } => *hash_block_tokens,
            WorkloadSpec::Synthetic(s) => s.hash_block_tokens,
        };
        if self.engine.block_size == 0 || hash_block % self.engine.block_size != 0 {
            return invalid(
                "engine.block_size",
                format!(
                    "{} does not divide the workload's hash_block_tokens {hash_block}",
                    self.engine.block_size
                ),
            );
        }
        if !(self.engine.prefill_tokens_per_s > 0.0 && self.engine.load_gbps > 0.0) {
            return invalid(
                "engine",
                "prefill_tokens_per_s and load_gbps must be positive".into(),
            );
        }
        if !(self.run.time_scale >= 0.0 && self.run.bucket_s > 0.0) {
            return invalid("run", "time_scale must be >= 0 and bucket_s > 0".into());
        }
        for (i, fault) in self.faults.iter().enumerate() {
            let field = format!("faults[{i}]");
            let node_ok = |node: u32| node < self.cluster.nodes;
            match &fault.kind {
                FaultKind::KillNode { node, .. }
                | FaultKind::RestartNode { node }
                | FaultKind::CorruptSsd { node, .. }
                | FaultKind::FillDisk { node, .. }
                | FaultKind::DropLink { node, .. }
                | FaultKind::DelayLink { node, .. }
                    if !node_ok(*node) =>
                {
                    return invalid(&field, format!("node {node} does not exist"));
                }
                FaultKind::RestartEngine { engine } if *engine >= self.engines() => {
                    return invalid(&field, format!("engine {engine} does not exist"));
                }
                FaultKind::CorruptSsd { .. } if self.cluster.ssd.bytes() == 0 => {
                    return invalid(&field, "corrupt_ssd needs cluster.ssd > 0".into());
                }
                FaultKind::DropLink { .. } | FaultKind::DelayLink { .. }
                    if !self.cluster.fabric || self.cluster.nodes < 2 =>
                {
                    return invalid(
                        &field,
                        "link faults need cluster.fabric = true and at least 2 nodes (a peer to fetch through the link)".into(),
                    );
                }
                FaultKind::FillDisk { .. } if !self.cluster.ssd_tmpfs => {
                    return invalid(
                        &field,
                        "fill_disk needs cluster.ssd_tmpfs = true (a filesystem the harness may fill)".into(),
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn validate_fabric(&self) -> Result<(), ScenarioError> {
        let invalid = |field: &str, why: &str| {
            Err(ScenarioError::Invalid {
                field: field.to_string(),
                why: why.to_string(),
            })
        };
        let Some(fabric) = &self.fabric else {
            return Ok(());
        };
        if !self.cluster.fabric {
            return invalid(
                "fabric",
                "set cluster.fabric = true to run the fabric these settings are for",
            );
        }
        if fabric.gossip_interval_ms == 0
            || fabric.failure_timeout_ms == 0
            || fabric.fetch_timeout_ms == 0
        {
            return invalid(
                "fabric",
                "gossip_interval_ms, failure_timeout_ms and fetch_timeout_ms must be > 0",
            );
        }
        if !fabric.link_gbps.is_finite() || fabric.link_gbps <= 0.0 {
            return invalid("fabric.link_gbps", "must be a positive number");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
[cluster]
nodes = 1
engines_per_node = 1
pool = "64MiB"
[workload]
kind = "synthetic"
generator = "shared_prompt"
seed = 1
requests = 10
"#;

    #[test]
    fn minimal_scenario_parses_with_defaults() {
        let s = Scenario::parse(MINIMAL, Path::new(".")).expect("parses");
        assert_eq!(s.engine.page_bytes(), 4096);
        assert_eq!(s.routing.policy, RoutingPolicy::RoundRobin);
        assert_eq!(s.pool_sizes(), vec![Size::mib(64)]);
        assert_eq!(s.source, MINIMAL);
    }

    #[test]
    fn fabric_settings_default_and_need_the_fabric() {
        let on = MINIMAL.replace("nodes = 1", "nodes = 2\nfabric = true");
        let s = Scenario::parse(&on, Path::new(".")).expect("parses");
        assert_eq!(s.fabric().map(|f| f.gossip_interval_ms), Some(100));
        let plain = Scenario::parse(MINIMAL, Path::new(".")).expect("parses");
        assert!(plain.fabric().is_none());

        let text = format!("{MINIMAL}\n[fabric]\ngossip_interval_ms = 50\n");
        let err = Scenario::parse(&text, Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("`fabric`"), "{err}");
        let text = format!("{on}\n[fabric]\nfetch_timeout_ms = 0\n");
        let err = Scenario::parse(&text, Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("fetch_timeout_ms"), "{err}");
    }

    #[test]
    fn link_faults_need_a_fabric_peer() {
        let fault = "\n[[faults]]\nat_ms = 1\nkind = \"drop_link\"\nnode = 0\nduration_ms = 5\n";
        let err = Scenario::parse(&format!("{MINIMAL}{fault}"), Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("faults[0]"), "{err}");
        assert!(err.to_string().contains("cluster.fabric"), "{err}");
        let on = MINIMAL.replace("nodes = 1", "nodes = 2\nfabric = true");
        let s = Scenario::parse(&format!("{on}{fault}"), Path::new(".")).expect("parses");
        assert_eq!(s.faults[0].kind.link_node(), Some(0));
        let far = fault.replace("node = 0", "node = 2");
        let err = Scenario::parse(&format!("{on}{far}"), Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("node 2 does not exist"), "{err}");
    }

    #[test]
    fn typos_and_bad_shapes_are_named() {
        let text = MINIMAL.replace("nodes = 1", "nodez = 1");
        let err = Scenario::parse(&text, Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("nodez"), "{err}");
        let text = format!("{MINIMAL}\n[engine]\nblock_size = 48\n");
        let err = Scenario::parse(&text, Path::new(".")).unwrap_err();
        assert!(err.to_string().contains("engine"), "{err}");
    }
}
