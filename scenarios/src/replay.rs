//! The replay: a discrete-event loop over virtual time. Arrivals, prefill completions (saves)
//! and faults are events ordered by virtual time; each event runs its real socket operations
//! against the real nodes before the next one starts. So the node sees operations in the order
//! a real cluster would issue them, the outcome does not depend on how fast this machine is,
//! and `time_scale = 0` replays an hour of trace as fast as the node answers. With
//! `time_scale > 0` events are also paced in wall time.
//!
//! An engine serves one prefill at a time (a queue per engine): it starts a request, looks up
//! and loads its hits, then "computes" the misses for the modeled time and saves them when that
//! time has passed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pegaflow_actors::keys::BlockKey;
use pegaflow_config::Size;

use crate::cluster::{node_binary, FabricPlan, NodeProc};
use crate::engine::{namespace, Engine, Prefill};
use crate::error::ScenarioError;
use crate::faults;
use crate::progress::Progress;
use crate::report::json::{
    git_commit, BlockCounts, Bucket, Checks, FaultRecord, NodeSummary, OpLatency, Report,
    RunResult, Tiers, Ttft, Version,
};
use crate::router::Router;
use crate::scenario::{FabricSpec, Scenario};
use crate::workload::tokens::block_keys;
use crate::workload::{Request, Workload};

/// How to run a scenario, beyond what its file says.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Replay at most this many requests (CI runs small slices of the same scenarios).
    pub limit: Option<usize>,
    /// The node binary; found by [`node_binary`] when absent.
    pub node_binary: Option<PathBuf>,
    /// No progress bar.
    pub quiet: bool,
}

/// Runs every pool size of the scenario and assembles the report.
pub async fn run(scenario: &Scenario, options: &Options) -> Result<Report, ScenarioError> {
    let binary = match &options.node_binary {
        Some(path) => path.clone(),
        None => node_binary()?,
    };
    let workload = Workload::load(&scenario.workload, &scenario.base_dir, options.limit)?;
    let sizes = scenario.pool_sizes();
    let progress = Progress::new(
        (workload.requests.len() * sizes.len()) as u64,
        options.quiet,
    );
    let mut runs = Vec::new();
    let mut node_version = None;
    for (i, pool) in sizes.iter().enumerate() {
        progress.run(format!("run {}/{} pool {pool}", i + 1, sizes.len()));
        let (result, version) = run_once(scenario, &workload, *pool, &binary, &progress).await?;
        node_version = node_version.or(version);
        runs.push(result);
    }
    progress.finish();
    let passed = runs.iter().all(|r| r.checks.passed);
    Ok(Report {
        scenario: scenario.name.clone(),
        description: scenario.description.clone(),
        scenario_toml: scenario.source.clone(),
        version: Version {
            harness: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: git_commit(),
            node_binary: binary.display().to_string(),
            node_version,
        },
        generated_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        request_limit: options.limit,
        runs,
        passed,
    })
}

/// A temporary directory for one run's sockets, logs and SSD tiers (short, under the system
/// temp dir, since socket paths are limited to 108 bytes); removed when dropped.
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> Result<Self, ScenarioError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pfscn-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(ScenarioError::io(format!("create {}", dir.display())))?;
        Ok(Self(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // `PEGAFLOW_SCENARIO_KEEP=1` keeps node logs and SSD tiers for a post-mortem.
        if std::env::var_os("PEGAFLOW_SCENARIO_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// What happens at a point of virtual time. The order of the variants breaks ties: a fault's
/// end, then a fault, then a finished prefill, then an arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Event {
    FaultEnd(usize),
    Fault(usize),
    Finish(usize),
    Arrive(usize),
}

/// Per engine: its queue and the request it is computing.
struct Slot {
    engine: Engine,
    queue: VecDeque<usize>,
    current: Option<Running>,
    /// Keys of the last request it served (a crashing engine leases them).
    last_keys: Vec<BlockKey>,
}

struct Running {
    keys: Vec<BlockKey>,
    loaded: u32,
}

/// What one request measured.
struct Record {
    arrive_us: u64,
    looked_up: u32,
    hit: u32,
    ttft_s: f64,
    cold_s: f64,
    queue_s: f64,
}

/// The state of one run; faults act on it.
pub(crate) struct Replay<'a> {
    pub(crate) scenario: &'a Scenario,
    /// The fabric's settings when the nodes run one.
    pub(crate) fabric: Option<FabricSpec>,
    workload: &'a Workload,
    pub(crate) nodes: Vec<NodeProc>,
    slots: Vec<Slot>,
    /// Whether each node is down on purpose (killed, not yet restarted).
    pub(crate) down: Vec<bool>,
    router: Router,
    namespace: BlockKey,
    heap: BinaryHeap<Reverse<(u64, Event, u64)>>,
    seq: u64,
    pub(crate) now_us: u64,
    /// Per node, keys a `persist` save acknowledged as durable.
    pub(crate) acked: Vec<HashSet<BlockKey>>,
    /// Keys whose SSD record a fault corrupted on purpose (excused from the acked check).
    pub(crate) corrupted: HashSet<BlockKey>,
    pub(crate) faults: Vec<FaultRecord>,
    pub(crate) checks: Checks,
    /// Kill signals in flight, per node.
    pub(crate) kills: Vec<Option<tokio::task::JoinHandle<()>>>,
    /// Counters snapshotted right before a kill.
    pub(crate) kill_snapshots: Vec<Option<pegaflow_actors::stats::NodeStats>>,
    /// What a link fault saw while it was on, by fault index, until it ends.
    pub(crate) link_faults: HashMap<usize, faults::LinkOutage>,
    pub(crate) progress: &'a Progress,
    blocks: BlockCounts,
    degraded: u64,
    records: Vec<Record>,
    lookup_us: Vec<f64>,
    load_us: Vec<f64>,
}

async fn run_once(
    scenario: &Scenario,
    workload: &Workload,
    pool: Size,
    binary: &Path,
    progress: &Progress,
) -> Result<(RunResult, Option<String>), ScenarioError> {
    let started = Instant::now();
    let dir = RunDir::create()?;
    let spec = &scenario.cluster;
    let mut plan = FabricPlan::new(scenario).await?;
    let mut nodes = Vec::new();
    for index in 0..spec.nodes {
        let mut node = NodeProc::prepare(index, spec, pool, &dir.0, binary, plan.as_mut())?;
        node.start().await?;
        nodes.push(node);
    }
    let node_version = match nodes.first() {
        Some(node) => node.stats().await.ok().map(|s| s.version),
        None => None,
    };
    let region_blocks = workload.max_blocks(scenario.engine.block_size).max(64);
    let mut slots = Vec::new();
    for id in 0..scenario.engines() {
        let node = id / spec.engines_per_node;
        let mut engine = Engine::new(id, node, &scenario.engine, region_blocks)?;
        engine.connect(&nodes[node as usize].socket).await?;
        slots.push(Slot {
            engine,
            queue: VecDeque::new(),
            current: None,
            last_keys: Vec::new(),
        });
    }
    let node_count = nodes.len();
    let mut replay = Replay {
        scenario,
        fabric: scenario.fabric(),
        workload,
        nodes,
        slots,
        down: vec![false; node_count],
        router: Router::new(scenario.routing.policy, scenario.engines() as usize),
        namespace: namespace(&scenario.engine).digest(),
        heap: BinaryHeap::new(),
        seq: 0,
        now_us: 0,
        acked: vec![HashSet::new(); node_count],
        corrupted: HashSet::new(),
        faults: Vec::new(),
        checks: Checks::default(),
        kills: (0..node_count).map(|_| None).collect(),
        kill_snapshots: vec![None; node_count],
        link_faults: HashMap::new(),
        progress,
        blocks: BlockCounts::default(),
        degraded: 0,
        records: Vec::new(),
        lookup_us: Vec::new(),
        load_us: Vec::new(),
    };
    for (i, request) in workload.requests.iter().enumerate() {
        replay.push(request.at_ms * 1000, Event::Arrive(i));
    }
    for (i, fault) in scenario.faults.iter().enumerate() {
        replay.push(fault.at_ms * 1000, Event::Fault(i));
    }
    let wall_start = Instant::now();
    while let Some(Reverse((at_us, event, _))) = replay.heap.pop() {
        replay.now_us = at_us;
        if scenario.run.time_scale > 0.0 {
            let due =
                wall_start + Duration::from_secs_f64(at_us as f64 / 1e6 * scenario.run.time_scale);
            tokio::time::sleep_until(due.into()).await;
        }
        match event {
            Event::Arrive(request) => replay.arrive(request).await,
            Event::Finish(engine) => replay.finish(engine).await,
            Event::Fault(index) => faults::start(&mut replay, index).await,
            Event::FaultEnd(index) => faults::end(&mut replay, index).await,
        }
    }
    let result = replay.conclude(pool, started).await;
    drop(dir);
    Ok((result, node_version))
}

impl Replay<'_> {
    pub(crate) fn push(&mut self, at_us: u64, event: Event) {
        self.seq += 1;
        self.heap.push(Reverse((at_us, event, self.seq)));
    }

    /// Engines of `node`.
    pub(crate) fn engines_of(&self, node: u32) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&e| self.slots[e].engine.node == node)
            .collect()
    }

    pub(crate) fn engine_mut(&mut self, engine: usize) -> &mut Engine {
        &mut self.slots[engine].engine
    }

    pub(crate) fn last_keys(&self, engine: usize) -> Vec<BlockKey> {
        self.slots[engine].last_keys.clone()
    }

    /// Reconnects the engines of a node that is serving again.
    pub(crate) async fn reconnect(&mut self, node: u32) -> u32 {
        let socket = self.nodes[node as usize].socket.clone();
        let mut connected = 0;
        for e in self.engines_of(node) {
            let engine = &mut self.slots[e].engine;
            if engine.is_connected() || engine.connect(&socket).await.is_ok() {
                connected += 1;
            }
        }
        connected
    }

    async fn arrive(&mut self, request: usize) {
        let up: Vec<bool> = self
            .slots
            .iter()
            .map(|s| s.engine.is_connected() || !self.down[s.engine.node as usize])
            .collect();
        let queued: Vec<usize> = self
            .slots
            .iter()
            .map(|s| s.queue.len() + usize::from(s.current.is_some()))
            .collect();
        let engine = self
            .router
            .route(&self.workload.requests[request].hash_ids, &queued, &up);
        self.slots[engine].queue.push_back(request);
        if self.slots[engine].current.is_none() {
            self.start(engine).await;
        }
    }

    /// Starts the next queued request of `engine`: lookup and load now, save when the
    /// modeled prefill is done.
    async fn start(&mut self, engine: usize) {
        let Some(request) = self.slots[engine].queue.pop_front() else {
            return;
        };
        let req: &Request = &self.workload.requests[request];
        let spec = &self.scenario.engine;
        let keys = block_keys(
            &self.namespace,
            req,
            self.workload.hash_block_tokens,
            spec.block_size,
        );
        let node = self.slots[engine].engine.node as usize;
        if !self.slots[engine].engine.is_connected() && !self.down[node] {
            let socket = self.nodes[node].socket.clone();
            let _ = self.slots[engine].engine.connect(&socket).await;
        }
        let prefill = match self.slots[engine].engine.prefill(&keys).await {
            Ok(prefill) => prefill,
            Err(_) => {
                self.slots[engine].engine.disconnect();
                self.degraded += 1;
                Prefill::default()
            }
        };
        if prefill.hits > 0 {
            self.lookup_us.push(prefill.lookup_s * 1e6);
            self.load_us.push(prefill.load_s * 1e6);
        } else if self.slots[engine].engine.is_connected() {
            self.lookup_us.push(prefill.lookup_s * 1e6);
        }
        let remote_loaded = prefill.remote_loaded();
        self.blocks.looked_up += keys.len() as u64;
        self.blocks.hit += u64::from(prefill.hits);
        self.blocks.ssd_hit += u64::from(prefill.ssd_hits);
        self.blocks.remote_hit += u64::from(prefill.remote_hits);
        self.blocks.loaded += u64::from(prefill.loaded);
        self.blocks.remote_loaded += u64::from(remote_loaded);
        self.blocks.corrupt += u64::from(prefill.corrupt);
        let loaded_tokens = u64::from(prefill.loaded * spec.block_size);
        let transfer_s = self.transfer_s(prefill.loaded - remote_loaded, remote_loaded);
        let compute_s =
            (u64::from(req.input_tokens) - loaded_tokens) as f64 / spec.prefill_tokens_per_s;
        let ttft_s = prefill.lookup_s + prefill.load_s + transfer_s + compute_s;
        self.records.push(Record {
            arrive_us: req.at_ms * 1000,
            looked_up: keys.len() as u32,
            hit: prefill.loaded,
            ttft_s,
            cold_s: f64::from(req.input_tokens) / spec.prefill_tokens_per_s,
            queue_s: self.now_us.saturating_sub(req.at_ms * 1000) as f64 / 1e6,
        });
        let done_us = self.now_us + (ttft_s * 1e6).ceil() as u64;
        self.slots[engine].current = Some(Running {
            keys,
            loaded: prefill.loaded,
        });
        self.push(done_us, Event::Finish(engine));
    }

    /// Modeled seconds to bring the KV of loaded blocks to the GPU: host to GPU at the engine's
    /// load bandwidth, and for blocks from peers, over the network first (streamed, so at the
    /// slower of the two bandwidths).
    fn transfer_s(&self, local_blocks: u32, remote_blocks: u32) -> f64 {
        let spec = &self.scenario.engine;
        let bytes = |blocks: u32| {
            (u64::from(blocks) * u64::from(spec.block_size) * spec.model_kv_bytes_per_token) as f64
        };
        let link_gbps = self
            .fabric
            .as_ref()
            .map_or(spec.load_gbps, |f| f.link_gbps.min(spec.load_gbps));
        bytes(local_blocks) / (spec.load_gbps * 1e9) + bytes(remote_blocks) / (link_gbps * 1e9)
    }

    /// The prefill of `engine`'s current request is done: save what was computed, then start
    /// the next queued request.
    async fn finish(&mut self, engine: usize) {
        let Some(running) = self.slots[engine].current.take() else {
            return;
        };
        let computed = running.keys.len() as u64 - u64::from(running.loaded);
        let node = self.slots[engine].engine.node as usize;
        if computed > 0 {
            match self.slots[engine]
                .engine
                .save(&running.keys, running.loaded)
                .await
            {
                Ok(reply) => {
                    self.blocks.stored += u64::from(reply.stored);
                    self.blocks.present += u64::from(reply.present);
                    self.blocks.dropped += u64::from(reply.dropped);
                    if reply.persisted.is_some_and(|n| u64::from(n) == computed) {
                        self.acked[node]
                            .extend(running.keys[running.loaded as usize..].iter().copied());
                    }
                }
                Err(_) => {
                    self.slots[engine].engine.disconnect();
                    self.blocks.unsaved += computed;
                }
            }
        }
        self.slots[engine].last_keys = running.keys;
        let ratio = ratio(self.blocks.hit, self.blocks.looked_up);
        self.progress.request(ratio);
        self.start(engine).await;
    }

    /// Loads and checks every acknowledged block of `node` (except those a fault corrupted on
    /// purpose) through one of its engines: `(checked, lost, corrupt)`.
    pub(crate) async fn verify_acked(&mut self, node: u32) -> (u64, u64, u64) {
        let Some(&engine) = self
            .engines_of(node)
            .iter()
            .find(|&&e| self.slots[e].engine.is_connected())
        else {
            return (0, 0, 0);
        };
        let keys: Vec<BlockKey> = self.acked[node as usize]
            .iter()
            .filter(|k| !self.corrupted.contains(*k))
            .copied()
            .collect();
        let chunk = self.slots[engine].engine.blocks().min(64) as usize;
        let (mut lost, mut corrupt) = (0u64, 0u64);
        let mut rest: &[BlockKey] = &keys;
        while !rest.is_empty() {
            let take = rest.len().min(chunk);
            match self.slots[engine]
                .engine
                .load_and_check(&rest[..take])
                .await
            {
                Ok(good) => {
                    corrupt += good.iter().filter(|ok| !**ok).count() as u64;
                    if good.len() < take {
                        lost += 1;
                        rest = &rest[good.len() + 1..];
                    } else {
                        rest = &rest[take..];
                    }
                }
                Err(_) => {
                    lost += rest.len() as u64;
                    break;
                }
            }
        }
        self.checks.acked_checked += keys.len() as u64;
        self.checks.acked_lost += lost;
        self.checks.corrupt_loads += corrupt;
        (keys.len() as u64, lost, corrupt)
    }

    /// After the last event: the leak check, final counters, every node stopped.
    async fn conclude(mut self, pool: Size, started: Instant) -> RunResult {
        for slot in &mut self.slots {
            slot.engine.disconnect();
        }
        let mut leaked = 0;
        for node in &self.nodes {
            if node.is_running() {
                leaked += held_pages(node).await;
            }
        }
        for node in &mut self.nodes {
            if node.is_running() {
                let _ = node.stop().await;
            }
        }
        self.checks.leaked_pages = leaked;
        self.checks.corrupt_loads += self.blocks.corrupt;
        self.checks.acked_blocks = self.acked.iter().map(|a| a.len() as u64).sum();
        for fault in &self.faults {
            match fault.recovered {
                Some(true) => self.checks.faults_recovered += 1,
                Some(false) => self.checks.faults_failed += 1,
                None => self.checks.faults_skipped += 1,
            }
        }
        self.checks.passed = self.checks.holds();
        let spec = &self.scenario.engine;
        let mut tiers = Tiers::default();
        for life in self.nodes.iter().flat_map(|n| &n.past) {
            tiers.add(life);
        }
        let input_tokens: u64 = self
            .workload
            .requests
            .iter()
            .map(|r| u64::from(r.input_tokens))
            .sum();
        let loaded_tokens = self.blocks.loaded * u64::from(spec.block_size);
        tiers.modeled_loaded_bytes = loaded_tokens * spec.model_kv_bytes_per_token;
        tiers.modeled_remote_bytes =
            self.blocks.remote_loaded * u64::from(spec.block_size) * spec.model_kv_bytes_per_token;
        tiers.modeled_recomputed_tokens = input_tokens - loaded_tokens.min(input_tokens);
        let virtual_s = self.now_us as f64 / 1e6;
        RunResult {
            pool_bytes: pool.bytes(),
            page_bytes: spec.page_bytes(),
            capacity_pages: pool.bytes() / spec.page_bytes(),
            nodes: self.scenario.cluster.nodes,
            engines: self.scenario.engines(),
            routing: format!("{:?}", self.scenario.routing.policy),
            requests: self.records.len() as u64,
            degraded_requests: self.degraded,
            block_hit_ratio: ratio(self.blocks.loaded, self.blocks.looked_up),
            token_hit_ratio: ratio(loaded_tokens, input_tokens),
            ttft: ttft(&self.records),
            latency: OpLatency {
                lookup_p50_us: percentile(&mut self.lookup_us, 0.5),
                lookup_p99_us: percentile(&mut self.lookup_us, 0.99),
                load_p50_us: percentile(&mut self.load_us, 0.5),
                load_p99_us: percentile(&mut self.load_us, 0.99),
            },
            timeline: timeline(&self.records, self.scenario.run.bucket_s),
            blocks: self.blocks,
            tiers,
            nodes_detail: self
                .nodes
                .iter()
                .map(|n| NodeSummary {
                    index: n.index,
                    restarts: n.restarts,
                    lifetimes: n.past.clone(),
                })
                .collect(),
            faults: self.faults,
            checks: self.checks,
            virtual_s,
            wall_s: started.elapsed().as_secs_f64(),
        }
    }
}

/// Pages `node` still pins or reserves once the run is over (`pool.leased_pages +
/// pool.writing_pages`), polled for up to 3 s so releases in flight can land.
async fn held_pages(node: &NodeProc) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let held = node
            .stats()
            .await
            .map(|s| s.pool.leased_pages + s.pool.writing_pages)
            .unwrap_or(0);
        if held == 0 || Instant::now() > deadline {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `part / whole`, 0 when nothing was counted.
pub(crate) fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The `q` quantile (nearest rank) of `values`, 0 when empty.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn ttft(records: &[Record]) -> Ttft {
    let mut warm: Vec<f64> = records.iter().map(|r| r.ttft_s * 1e3).collect();
    let mut cold: Vec<f64> = records.iter().map(|r| r.cold_s * 1e3).collect();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let queue: Vec<f64> = records.iter().map(|r| r.queue_s * 1e3).collect();
    let (warm_mean, cold_mean) = (mean(&warm), mean(&cold));
    let cdf = |v: &mut Vec<f64>| -> Vec<[f64; 2]> {
        (0..=100)
            .map(|p| [f64::from(p), percentile(v, f64::from(p.max(1)) / 100.0)])
            .collect()
    };
    Ttft {
        mean_ms: warm_mean,
        p50_ms: percentile(&mut warm, 0.5),
        p90_ms: percentile(&mut warm, 0.9),
        p99_ms: percentile(&mut warm, 0.99),
        cold_mean_ms: cold_mean,
        speedup: if warm_mean > 0.0 {
            cold_mean / warm_mean
        } else {
            0.0
        },
        queue_mean_ms: mean(&queue),
        cdf: cdf(&mut warm),
        cold_cdf: cdf(&mut cold),
    }
}

fn timeline(records: &[Record], bucket_s: f64) -> Vec<Bucket> {
    let width_us = (bucket_s * 1e6).max(1.0) as u64;
    let last = records
        .iter()
        .map(|r| r.arrive_us / width_us)
        .max()
        .unwrap_or(0) as usize;
    let mut buckets: Vec<Bucket> = (0..=last)
        .map(|i| Bucket {
            start_s: i as f64 * bucket_s,
            ..Bucket::default()
        })
        .collect();
    let mut ttft_sum = vec![0.0; buckets.len()];
    for record in records {
        let i = (record.arrive_us / width_us) as usize;
        let bucket = &mut buckets[i];
        bucket.requests += 1;
        bucket.looked_up += u64::from(record.looked_up);
        bucket.hit += u64::from(record.hit);
        ttft_sum[i] += record.ttft_s * 1e3;
    }
    for (bucket, sum) in buckets.iter_mut().zip(ttft_sum) {
        bucket.hit_ratio = ratio(bucket.hit, bucket.looked_up);
        if bucket.requests > 0 {
            bucket.ttft_mean_ms = sum / bucket.requests as f64;
        }
    }
    buckets
}
