//! `pegaflow-bench`: measures a real node against baselines taken in the same run.
//!
//! Absolute numbers depend on the machine, so every result is printed next to a baseline
//! measured by this same process on the same memory: the host copy engine's save and load
//! bandwidth against a plain single-threaded `memcpy` (one contiguous copy, and the same bytes
//! as scattered per-segment copies), and lookup latency against the docs/design.md §9 target.
//!
//! The node is started in-process (`node::start`) but the benchmark only talks to it through
//! the Unix-socket protocol with [`Client`], exactly as a connector would, so every number
//! includes framing, msgpack, the session and pool actors and the copy engine. The engine's KV
//! region is a POSIX shared-memory file filled with random bytes, and every load is checked
//! byte for byte against what was saved: a fast copy of wrong bytes is worth nothing.
//!
//! With `--gpus` it then starts a node with two GPUs of host engines (module [`gpus`]) and
//! measures two engines on the two transfer actors, each alone and both at once.
//!
//! With `--fabric` it then starts two nodes with the fabric on (module [`fabric`]) and measures
//! what a peer adds: lookup latency of a prefix only a peer holds, and loads that fetch pages
//! over the link, against a plain TCP copy of the same bytes and a load from the node's own pool.
//!
//! See docs/benchmarks.md for what each line means and results from a reference machine.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use pegaflow_actors::client::Client;
use pegaflow_actors::keys::{chain_keys, join_keys, BlockKey, NamespaceFields};
use pegaflow_actors::node::{self, RunningNode};
use pegaflow_actors::protocol::{LookupReply, LookupRequest, RegionSpec, RegisterRequest, Request};
use pegaflow_config::{DmaEngine, NodeConfig, Size};
use serde::Serialize;

mod fabric;
mod gpus;

/// docs/design.md §9: lookup of a 640-block prefix over the socket, p99.
const LOOKUP_P99_TARGET_US: f64 = 100.0;

/// Benchmark of a PegaFlow node over its socket protocol, with same-run baselines.
#[derive(Debug, Parser)]
#[command(name = "pegaflow-bench", version)]
struct Args {
    /// Model layers (one 64 KiB segment per layer and block with the defaults).
    #[arg(long, default_value_t = 32)]
    layers: u32,
    /// KV heads per layer.
    #[arg(long, default_value_t = 8)]
    kv_heads: u32,
    /// Head dimension.
    #[arg(long, default_value_t = 128)]
    head_dim: u32,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// Blocks per save or load request in the copy benchmark (and per fetch with `--fabric`).
    #[arg(long, default_value_t = 128)]
    blocks: u32,
    /// Timed save and load requests (each direction), after warm-up; with `--fabric`, also the
    /// timed fetch rounds.
    #[arg(long, default_value_t = 10)]
    copy_iters: u32,
    /// Blocks in the prefix the lookup benchmark asks for.
    #[arg(long, default_value_t = 640)]
    prefix_blocks: u32,
    /// Timed lookups, for the hit and for the miss case each.
    #[arg(long, default_value_t = 2000)]
    lookup_iters: u32,
    /// Untimed lookups before timing starts.
    #[arg(long, default_value_t = 200)]
    lookup_warmup: u32,
    /// Requests in flight in the pipelined lookup measurement.
    #[arg(long, default_value_t = 32)]
    pipeline_depth: u32,
    /// Pool size of each node, e.g. `2GiB`; must hold the lookup prefix.
    #[arg(long, default_value = "2GiB")]
    pool_size: Size,
    /// Seed of the region's random bytes and of the block shuffles.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Also write every number to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Then also run the two-node fabric benchmark on loopback (remote-hit lookup latency and
    /// fetch throughput); off by default because it needs two more pools of `--pool-size`.
    #[arg(long)]
    fabric: bool,
    /// Then also run the two-GPU benchmark: two engines on two transfer actors (GPUs of host
    /// engines), each alone and both at once; needs a third pool of `--pool-size`.
    #[arg(long)]
    gpus: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = run(&args) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}

/// Node logs at `warn` unless `RUST_LOG` says otherwise, so they do not drown the tables.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Starts the node, runs both benchmarks, and shuts the node down whatever happened; then the
/// fabric benchmark on two fresh nodes when asked, so the pools never coexist.
async fn run(args: &Args) -> Result<()> {
    let shape = Shape::from_args(args)?;
    let region = ShmRegion::create(
        &format!("pegaflow-bench-{}", std::process::id()),
        shape.region_bytes(),
    )?;
    region.fill_random(args.seed);
    let node = node::start(&node_config(args, "node"))
        .await
        .context("cannot start the node")?;
    let outcome = bench(args, &shape, &region, &node).await;
    node.shutdown().await;
    let mut report = outcome?;
    if args.fabric {
        report.fabric = Some(fabric::bench(args, &shape, &region).await?);
    }
    if args.gpus {
        report.gpus = Some(gpus::bench(args, &shape).await?);
    }
    report.print();
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// A config for this run's node `name`: private socket, ephemeral HTTP port, host copy engine.
fn node_config(args: &Args, name: &str) -> NodeConfig {
    let mut config = NodeConfig::default();
    config.socket.path =
        std::env::temp_dir().join(format!("pegaflow-bench-{}-{name}.sock", std::process::id()));
    config.http.addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    config.pool.size = args.pool_size;
    config.dma.engine = DmaEngine::Host;
    config
}

/// Both benchmarks over one connection with one registered engine.
async fn bench(
    args: &Args,
    shape: &Shape,
    region: &ShmRegion,
    node: &RunningNode,
) -> Result<Report> {
    let (mut client, engine) = connect(node, shape, region).await?;
    let machine = Machine::collect(args, shape, node.http_addr());
    machine.print();
    // The copy benchmark goes first: its warm-up cycles the whole pool, and the lookup prefix
    // saved afterwards must not be evicted by later saves.
    let copy = copy_bench(args, shape, region, &mut client, &engine).await?;
    let lookup = lookup_bench(args, shape, &mut client, &engine).await?;
    Ok(Report {
        machine,
        copy,
        lookup,
        fabric: None,
        gpus: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Layout and registration
// ---------------------------------------------------------------------------------------------

/// The engine's KV layout: vLLM packed (`vllm_lbnhc`), one segment per layer, layer tensors
/// one after another in the region, each `region_blocks` blocks long.
#[derive(Clone, Debug, Serialize)]
struct Shape {
    layers: u32,
    kv_heads: u32,
    head_dim: u32,
    block_size: u32,
    dtype: &'static str,
    segment_bytes: u64,
    page_bytes: u64,
    /// Blocks per layer in the region: two batches, so saves and loads use disjoint blocks.
    region_blocks: u32,
    batch_blocks: u32,
}

impl Shape {
    /// The shape the flags describe (bf16).
    fn from_args(args: &Args) -> Result<Self> {
        ensure!(
            args.layers > 0 && args.kv_heads > 0 && args.head_dim > 0 && args.block_size > 0,
            "--layers, --kv-heads, --head-dim and --block-size must be > 0"
        );
        ensure!(args.blocks > 0, "--blocks must be > 0");
        let segment_bytes = u64::from(args.block_size)
            * u64::from(args.kv_heads)
            * 2
            * u64::from(args.head_dim)
            * 2;
        let region_blocks = args
            .blocks
            .checked_mul(2)
            .context("--blocks is too large")?;
        Ok(Self {
            layers: args.layers,
            kv_heads: args.kv_heads,
            head_dim: args.head_dim,
            block_size: args.block_size,
            dtype: "bf16",
            segment_bytes,
            page_bytes: segment_bytes * u64::from(args.layers),
            region_blocks,
            batch_blocks: args.blocks,
        })
    }

    /// Bytes of the whole region.
    fn region_bytes(&self) -> u64 {
        self.page_bytes * u64::from(self.region_blocks)
    }

    /// Bytes moved by one save or load of a batch.
    fn batch_bytes(&self) -> u64 {
        self.page_bytes * u64::from(self.batch_blocks)
    }

    /// Region offset of `block` in `layer`.
    fn segment_offset(&self, layer: u32, block: u32) -> usize {
        let layer_bytes = self.segment_bytes * u64::from(self.region_blocks);
        (u64::from(layer) * layer_bytes + u64::from(block) * self.segment_bytes) as usize
    }

    /// The namespace fields an engine of this shape registers with.
    fn namespace(&self) -> NamespaceFields {
        NamespaceFields {
            model: "pegaflow-bench/llama-3.1-8b-shape".into(),
            dtype: self.dtype.into(),
            layout: "vllm_lbnhc".into(),
            block_size: self.block_size,
            num_layers: self.layers,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            tp_rank: 0,
            tp_size: 1,
            pp_stage: 0,
        }
    }

    /// The `register` request describing `region`, on `gpu` (a `topology.gpus` entry) if given.
    fn register_request(&self, region: &ShmRegion, gpu: Option<&str>) -> RegisterRequest {
        let layer_bytes = self.segment_bytes * u64::from(self.region_blocks);
        RegisterRequest {
            namespace: self.namespace(),
            region: RegionSpec {
                shm: Some(region.name.clone()),
                gpu: gpu.map(str::to_owned),
                bytes: region.len as u64,
                ..RegionSpec::default()
            },
            num_blocks: self.region_blocks,
            segment_bytes: self.segment_bytes,
            layers: (0..u64::from(self.layers))
                .map(|layer| vec![(layer * layer_bytes, self.segment_bytes)])
                .collect(),
            engine_events: Vec::new(),
            load_progress: None,
        }
    }
}

/// A registered engine: its handle and the namespace its keys chain from.
struct Engine {
    id: u32,
    namespace: BlockKey,
}

/// A connection to `node` with `region` registered on it.
async fn connect(
    node: &RunningNode,
    shape: &Shape,
    region: &ShmRegion,
) -> Result<(Client, Engine)> {
    let mut client = Client::connect(node.socket_path())
        .await
        .context("cannot connect to the node's socket")?;
    let engine = register(&mut client, shape, region, None).await?;
    Ok((client, engine))
}

/// Registers the region (on `gpu` if given) and checks the node agrees on the page size and
/// namespace.
async fn register(
    client: &mut Client,
    shape: &Shape,
    region: &ShmRegion,
    gpu: Option<&str>,
) -> Result<Engine> {
    let reply = client
        .register(shape.register_request(region, gpu))
        .await
        .context("register failed")?;
    ensure!(
        reply.page_bytes == shape.page_bytes,
        "node says page_bytes {} but the layout has {}",
        reply.page_bytes,
        shape.page_bytes
    );
    let namespace: BlockKey = reply
        .namespace
        .as_slice()
        .try_into()
        .context("register replied with a namespace that is not 32 bytes")?;
    ensure!(
        namespace == shape.namespace().digest(),
        "node's namespace differs from keys::NamespaceFields::digest"
    );
    Ok(Engine {
        id: reply.engine,
        namespace,
    })
}

/// Keys of `blocks` full blocks of random tokens, distinct for each `stream`.
fn fresh_keys(engine: &Engine, shape: &Shape, blocks: u32, stream: u64) -> Vec<BlockKey> {
    let mut rng = SplitMix64::new(stream ^ 0x6b65_7973);
    let tokens: Vec<u32> = (0..blocks * shape.block_size)
        .map(|_| rng.next() as u32)
        .collect();
    chain_keys(&engine.namespace, &tokens, shape.block_size as usize)
}

// ---------------------------------------------------------------------------------------------
// Copy benchmark
// ---------------------------------------------------------------------------------------------

/// Bandwidth of one way of moving a batch: best and mean over the timed iterations.
#[derive(Clone, Debug, Serialize)]
struct Bandwidth {
    best_gbps: f64,
    mean_gbps: f64,
    iterations: usize,
    /// Each iteration's time, in milliseconds, in the order run.
    times_ms: Vec<f64>,
}

impl Bandwidth {
    /// From per-iteration times of moving `bytes`; mean is total bytes over total time.
    fn from_times(bytes: u64, times: &[Duration]) -> Self {
        let gbps = |d: Duration| bytes as f64 / d.as_secs_f64().max(1e-12) / 1e9;
        let best = times.iter().copied().min().unwrap_or_default();
        let total: Duration = times.iter().sum();
        let mean = total / (times.len().max(1) as u32);
        Self {
            best_gbps: gbps(best),
            mean_gbps: gbps(mean),
            iterations: times.len(),
            times_ms: times.iter().map(|t| t.as_secs_f64() * 1e3).collect(),
        }
    }

    /// The column titles of [`Bandwidth::print_row`].
    fn print_header() {
        println!("  {:<40} {:>9} {:>9} {:>6}", "", "best", "mean", "iters");
    }

    /// One table row: best and mean GB/s.
    fn print_row(&self, name: &str) {
        println!(
            "  {name:<40} {:>9.2} {:>9.2} {:>6}",
            self.best_gbps, self.mean_gbps, self.iterations
        );
    }
}

/// Everything the copy benchmark measured.
#[derive(Debug, Serialize)]
struct CopyReport {
    batch_blocks: u32,
    batch_bytes: u64,
    /// The first save on a fresh pool, whose pages are touched for the first time.
    cold_save_gbps: f64,
    save: Bandwidth,
    load: Bandwidth,
    memcpy_contiguous: Bandwidth,
    memcpy_scattered_save: Bandwidth,
    memcpy_scattered_load: Bandwidth,
    crc32c: Bandwidth,
    /// Mean-over-mean ratios.
    save_vs_memcpy: f64,
    load_vs_memcpy: f64,
    save_vs_scattered_memcpy: f64,
    load_vs_scattered_memcpy: f64,
    verified_loads: u32,
}

/// Saves and loads of scattered blocks through the node, with memcpy baselines.
async fn copy_bench(
    args: &Args,
    shape: &Shape,
    region: &ShmRegion,
    client: &mut Client,
    engine: &Engine,
) -> Result<CopyReport> {
    let (save_blocks, load_blocks) = scattered_batches(args, shape);
    let bytes = shape.batch_bytes();
    let mut stream = args.seed << 20;
    let cold = cycle_pool(args, client, engine, shape, &save_blocks, &mut stream).await?;
    let mut save_times = Vec::new();
    for _ in 0..args.copy_iters {
        stream += 1;
        save_times.push(save_batch(client, engine, shape, &save_blocks, stream).await?);
    }
    let saved_keys = fresh_keys(engine, shape, shape.batch_blocks, stream);
    // One untimed load first: it faults in the node's own mapping of the target blocks.
    let mut load_times = Vec::new();
    for round in 0..=args.copy_iters.max(1) {
        let time = load_and_verify(
            client,
            engine,
            shape,
            region,
            &saved_keys,
            &save_blocks,
            &load_blocks,
        )
        .await?;
        if round > 0 {
            load_times.push(time);
        }
    }
    let baselines = Baselines::measure(shape, region, &save_blocks, args.copy_iters.max(1))?;
    let save = Bandwidth::from_times(bytes, &save_times);
    let load = Bandwidth::from_times(bytes, &load_times);
    Ok(CopyReport {
        batch_blocks: shape.batch_blocks,
        batch_bytes: bytes,
        cold_save_gbps: bytes as f64 / cold.as_secs_f64().max(1e-12) / 1e9,
        save_vs_memcpy: save.mean_gbps / baselines.contiguous.mean_gbps,
        load_vs_memcpy: load.mean_gbps / baselines.contiguous.mean_gbps,
        save_vs_scattered_memcpy: save.mean_gbps / baselines.scattered_save.mean_gbps,
        load_vs_scattered_memcpy: load.mean_gbps / baselines.scattered_load.mean_gbps,
        save,
        load,
        memcpy_contiguous: baselines.contiguous,
        memcpy_scattered_save: baselines.scattered_save,
        memcpy_scattered_load: baselines.scattered_load,
        crc32c: baselines.crc32c,
        verified_loads: load_times.len() as u32,
    })
}

/// A random permutation of the region's blocks split in two batches: the blocks saves read and
/// the blocks loads write, so every copy list is scattered and loads never overwrite sources.
fn scattered_batches(args: &Args, shape: &Shape) -> (Vec<u32>, Vec<u32>) {
    let mut rng = SplitMix64::new(args.seed ^ 0xb10c);
    let mut order: Vec<u32> = (0..shape.region_blocks).collect();
    rng.shuffle(&mut order);
    let loads = order.split_off(shape.batch_blocks as usize);
    (order, loads)
}

/// Cycles the whole pool once with saves of `blocks` under fresh keys (streams after `stream`),
/// so later requests reuse touched pages and evict, as on a running node whose pool is full.
/// Returns the first save's time: the cold, first-touch number.
async fn cycle_pool(
    args: &Args,
    client: &mut Client,
    engine: &Engine,
    shape: &Shape,
    blocks: &[u32],
    stream: &mut u64,
) -> Result<Duration> {
    let rounds = args.pool_size.0 / shape.batch_bytes() + 1;
    let mut cold = Duration::ZERO;
    for i in 0..rounds {
        *stream += 1;
        let time = save_batch(client, engine, shape, blocks, *stream).await?;
        if i == 0 {
            cold = time;
        }
    }
    Ok(cold)
}

/// One timed save of `blocks` under fresh keys; every block must be newly stored.
async fn save_batch(
    client: &mut Client,
    engine: &Engine,
    shape: &Shape,
    blocks: &[u32],
    stream: u64,
) -> Result<Duration> {
    let keys = fresh_keys(engine, shape, blocks.len() as u32, stream);
    let start = Instant::now();
    let reply = client
        .save(engine.id, &keys, blocks)
        .await
        .context("save failed")?;
    let time = start.elapsed();
    ensure!(
        reply.stored as usize == blocks.len(),
        "save stored {} of {} fresh blocks (present {}, dropped {}); is --pool-size too small?",
        reply.stored,
        blocks.len(),
        reply.present,
        reply.dropped
    );
    Ok(time)
}

/// Poisons `targets`, loads `keys` into them (timed), and checks every byte against `sources`,
/// the blocks the keys were saved from.
async fn load_and_verify(
    client: &mut Client,
    engine: &Engine,
    shape: &Shape,
    region: &ShmRegion,
    keys: &[BlockKey],
    sources: &[u32],
    targets: &[u32],
) -> Result<Duration> {
    let seg = shape.segment_bytes as usize;
    for layer in 0..shape.layers {
        for &block in targets {
            region
                .bytes_mut(shape.segment_offset(layer, block), seg)
                .fill(0xa5);
        }
    }
    let start = Instant::now();
    let reply = client
        .load(engine.id, keys, targets)
        .await
        .context("load failed")?;
    let time = start.elapsed();
    ensure!(
        reply.loaded as usize == targets.len(),
        "load copied {} of {} blocks that were just saved",
        reply.loaded,
        targets.len()
    );
    for layer in 0..shape.layers {
        for (&source, &target) in sources.iter().zip(targets) {
            let want = region.bytes(shape.segment_offset(layer, source), seg);
            let got = region.bytes(shape.segment_offset(layer, target), seg);
            if want != got {
                bail!("WRONG BYTES: layer {layer}, block {source} saved and loaded into block {target} differs; the benchmark is void");
            }
        }
    }
    Ok(time)
}

/// Single-threaded memcpy of the same bytes the node moves, between touched buffers.
struct Baselines {
    contiguous: Bandwidth,
    scattered_save: Bandwidth,
    scattered_load: Bandwidth,
    /// crc32c over the batch: the node checksums every saved page after copying it.
    crc32c: Bandwidth,
}

impl Baselines {
    /// Times `iters` rounds of each baseline copy between the region and a page buffer.
    fn measure(shape: &Shape, region: &ShmRegion, blocks: &[u32], iters: u32) -> Result<Self> {
        let bytes = shape.batch_bytes();
        let len = usize::try_from(bytes).context("batch does not fit in memory")?;
        let mut buffer = PageBuffer::new(len)?;
        let pages = buffer.as_mut_slice();
        let (mut contiguous, mut save, mut load, mut crc) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // One untimed round of each warms the TLB and page tables like the node's warm-up.
        for round in 0..=iters {
            let times = [
                time(|| copy_contiguous(region, pages)),
                time(|| copy_scattered(shape, region, pages, blocks, true)),
                time(|| copy_scattered(shape, region, pages, blocks, false)),
                time(|| checksum_pages(shape, pages)),
            ];
            if round > 0 {
                contiguous.push(times[0]);
                save.push(times[1]);
                load.push(times[2]);
                crc.push(times[3]);
            }
        }
        std::hint::black_box(&*pages);
        Ok(Self {
            contiguous: Bandwidth::from_times(bytes, &contiguous),
            scattered_save: Bandwidth::from_times(bytes, &save),
            scattered_load: Bandwidth::from_times(bytes, &load),
            crc32c: Bandwidth::from_times(bytes, &crc),
        })
    }
}

/// Runs `f` once and returns how long it took.
fn time(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

/// One `memcpy` of `pages.len()` bytes from the start of the region.
fn copy_contiguous(region: &ShmRegion, pages: &mut [u8]) {
    let src = region.bytes(0, pages.len());
    // SAFETY: both spans are `pages.len()` bytes of distinct live mappings.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), pages.as_mut_ptr(), pages.len()) };
}

/// crc32c of each page, as the node does after a save's copies.
fn checksum_pages(shape: &Shape, pages: &[u8]) {
    for page in pages.chunks(shape.page_bytes as usize) {
        std::hint::black_box(crc32c::crc32c(page));
    }
}

/// The node's copy pattern done by hand: per layer, one segment per block, between the
/// region's scattered blocks and consecutive pages (`save` = region to pages).
fn copy_scattered(shape: &Shape, region: &ShmRegion, pages: &mut [u8], blocks: &[u32], save: bool) {
    let seg = shape.segment_bytes as usize;
    let page = shape.page_bytes as usize;
    for layer in 0..shape.layers {
        for (i, &block) in blocks.iter().enumerate() {
            let in_page = i * page + layer as usize * seg;
            let region_ptr = region.ptr_at(shape.segment_offset(layer, block));
            let page_ptr = pages[in_page..in_page + seg].as_mut_ptr();
            let (src, dst) = if save {
                (region_ptr, page_ptr)
            } else {
                (page_ptr, region_ptr)
            };
            // SAFETY: both spans are `seg` in-bounds bytes of two distinct live mappings.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, seg) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lookup benchmark
// ---------------------------------------------------------------------------------------------

/// Latency distribution of one kind of request, in microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
struct Latency {
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    mean_us: f64,
    max_us: f64,
    iterations: usize,
}

impl Latency {
    /// Percentiles (nearest rank) of `times`.
    fn from_times(mut times: Vec<Duration>) -> Self {
        times.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let rank = |q: f64| {
            let index = (q * times.len() as f64).ceil() as usize;
            times
                .get(index.saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        let total: Duration = times.iter().sum();
        Self {
            p50_us: us(rank(0.50)),
            p90_us: us(rank(0.90)),
            p99_us: us(rank(0.99)),
            mean_us: us(total) / times.len().max(1) as f64,
            max_us: us(times.last().copied().unwrap_or_default()),
            iterations: times.len(),
        }
    }

    /// The column titles of [`Latency::print_row`].
    fn print_header() {
        println!(
            "  {:<40} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
            "", "p50", "p90", "p99", "mean", "max", "iters"
        );
    }

    /// One table row, in microseconds.
    fn print_row(&self, name: &str) {
        println!(
            "  {name:<40} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6}",
            self.p50_us, self.p90_us, self.p99_us, self.mean_us, self.max_us, self.iterations
        );
    }
}

/// Everything the lookup benchmark measured.
#[derive(Debug, Serialize)]
struct LookupReport {
    prefix_blocks: u32,
    hit: Latency,
    miss: Latency,
    p99_target_us: f64,
    hit_meets_target: bool,
    pipeline_depth: u32,
    pipelined_lookups_per_s: f64,
}

/// Lookups of a held prefix and of an unknown one, one at a time and pipelined.
async fn lookup_bench(
    args: &Args,
    shape: &Shape,
    client: &mut Client,
    engine: &Engine,
) -> Result<LookupReport> {
    let prefix = args.prefix_blocks;
    let held = save_prefix(args, shape, client, engine).await?;
    let unknown = fresh_keys(engine, shape, prefix, args.seed ^ 0xdead);
    let (warmup, iters) = (args.lookup_warmup, args.lookup_iters);
    let hit = time_lookups(client, &held, prefix, warmup, iters).await?;
    let miss = time_lookups(client, &unknown, 0, warmup, iters).await?;
    let rate = pipelined_lookups(client, &held, args.pipeline_depth, args.lookup_iters).await?;
    Ok(LookupReport {
        prefix_blocks: prefix,
        hit_meets_target: hit.p99_us <= LOOKUP_P99_TARGET_US,
        hit,
        miss,
        p99_target_us: LOOKUP_P99_TARGET_US,
        pipeline_depth: args.pipeline_depth,
        pipelined_lookups_per_s: rate,
    })
}

/// Saves the `--prefix-blocks` lookup prefix in batches, reusing the region's blocks (the bytes
/// do not matter here), and returns its keys.
async fn save_prefix(
    args: &Args,
    shape: &Shape,
    client: &mut Client,
    engine: &Engine,
) -> Result<Vec<BlockKey>> {
    let prefix = args.prefix_blocks;
    ensure!(
        u64::from(prefix) * shape.page_bytes <= args.pool_size.0,
        "--pool-size {} cannot hold the {prefix}-block lookup prefix of {} bytes",
        args.pool_size,
        u64::from(prefix) * shape.page_bytes
    );
    let keys = fresh_keys(engine, shape, prefix, args.seed ^ 0x1e1d);
    for chunk in keys.chunks(shape.batch_blocks as usize) {
        let blocks: Vec<u32> = (0..chunk.len() as u32)
            .map(|i| i % shape.region_blocks)
            .collect();
        let reply = client
            .save(engine.id, chunk, &blocks)
            .await
            .context("saving the lookup prefix failed")?;
        ensure!(
            reply.stored as usize == chunk.len(),
            "the pool kept only {} of {} prefix blocks",
            reply.stored,
            chunk.len()
        );
    }
    Ok(keys)
}

/// Times `iters` lookups of `keys` one at a time (after `warmup`), checking each answers `hits`.
async fn time_lookups(
    client: &mut Client,
    keys: &[BlockKey],
    hits: u32,
    warmup: u32,
    iters: u32,
) -> Result<Latency> {
    let mut times = Vec::with_capacity(iters as usize);
    for i in 0..warmup + iters {
        let elapsed = time_lookup(client, keys, hits, 0).await?;
        if i >= warmup {
            times.push(elapsed);
        }
    }
    Ok(Latency::from_times(times))
}

/// Times one lookup of `keys`, checking it answers `hits` of which `remote_hits` only peers
/// hold.
async fn time_lookup(
    client: &mut Client,
    keys: &[BlockKey],
    hits: u32,
    remote_hits: u32,
) -> Result<Duration> {
    let start = Instant::now();
    let reply = client.lookup(keys, false).await.context("lookup failed")?;
    let elapsed = start.elapsed();
    ensure!(
        (reply.hits, reply.remote_hits) == (hits, remote_hits),
        "lookup answered {} hits ({} remote), expected {hits} ({remote_hits} remote)",
        reply.hits,
        reply.remote_hits
    );
    Ok(elapsed)
}

/// Lookups per second with `depth` requests in flight on one connection.
async fn pipelined_lookups(
    client: &mut Client,
    keys: &[BlockKey],
    depth: u32,
    total: u32,
) -> Result<f64> {
    let request = Request::Lookup(LookupRequest {
        keys: join_keys(keys),
        lease: false,
    });
    let expected = keys.len() as u32;
    let depth = depth.clamp(1, total.max(1));
    let start = Instant::now();
    let mut sent = 0;
    while sent < depth {
        client
            .send(&request)
            .await
            .context("pipelined lookup send failed")?;
        sent += 1;
    }
    for _ in 0..total {
        let (_, reply) = client
            .recv::<LookupReply>()
            .await
            .context("pipelined lookup recv failed")?;
        let reply = reply.map_err(|e| anyhow::anyhow!("pipelined lookup refused: {e}"))?;
        ensure!(
            reply.hits == expected,
            "pipelined lookup answered {} hits, expected {expected}",
            reply.hits
        );
        if sent < total {
            client
                .send(&request)
                .await
                .context("pipelined lookup send failed")?;
            sent += 1;
        }
    }
    Ok(f64::from(total) / start.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// Facts about the machine and the run, printed as the header.
#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    pool_bytes: u64,
    pool: String,
    dma: &'static str,
    http: String,
    shape: Shape,
}

impl Machine {
    /// Collects what the header names.
    fn collect(args: &Args, shape: &Shape, http: SocketAddr) -> Self {
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pool_bytes: args.pool_size.0,
            pool: args.pool_size.to_string(),
            dma: "host",
            http: http.to_string(),
            shape: shape.clone(),
        }
    }

    fn print(&self) {
        let s = &self.shape;
        println!("pegaflow-bench {}", env!("CARGO_PKG_VERSION"));
        println!(
            "machine : {} cores (available_parallelism), pool {} ({} bytes), copy engine {}",
            self.cores, self.pool, self.pool_bytes, self.dma
        );
        println!(
            "layout  : vllm_lbnhc {}, {} layers x {} kv heads x head_dim {} x block_size {}",
            s.dtype, s.layers, s.kv_heads, s.head_dim, s.block_size
        );
        println!(
            "          segment {} per layer, page {} per block, region {} blocks ({})",
            human(s.segment_bytes),
            human(s.page_bytes),
            s.region_blocks,
            human(s.region_bytes())
        );
    }
}

/// The whole run, as written by `--json`.
#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    copy: CopyReport,
    lookup: LookupReport,
    /// Present with `--fabric`.
    #[serde(skip_serializing_if = "Option::is_none")]
    fabric: Option<fabric::FabricReport>,
    /// Present with `--gpus`.
    #[serde(skip_serializing_if = "Option::is_none")]
    gpus: Option<gpus::GpusReport>,
}

impl Report {
    fn print(&self) {
        let c = &self.copy;
        println!(
            "\ncopy: {} scattered blocks per request ({}), GB/s = 1e9 B/s",
            c.batch_blocks,
            human(c.batch_bytes)
        );
        Bandwidth::print_header();
        c.save.print_row("node save (socket round trip)");
        c.load.print_row("node load (socket round trip)");
        c.memcpy_contiguous.print_row("memcpy contiguous, 1 thread");
        c.memcpy_scattered_save
            .print_row("memcpy scattered save, 1 thread");
        c.memcpy_scattered_load
            .print_row("memcpy scattered load, 1 thread");
        c.crc32c.print_row("crc32c of the pages, 1 thread");
        println!(
            "  cold save (first touch of pool pages): {:.2} GB/s",
            c.cold_save_gbps
        );
        println!("  ratio save / memcpy contiguous : {:.3}", c.save_vs_memcpy);
        println!("  ratio load / memcpy contiguous : {:.3}", c.load_vs_memcpy);
        println!(
            "  ratio save / memcpy scattered  : {:.3}",
            c.save_vs_scattered_memcpy
        );
        println!(
            "  ratio load / memcpy scattered  : {:.3}",
            c.load_vs_scattered_memcpy
        );
        println!("  loads verified byte-exact      : {}", c.verified_loads);
        let l = &self.lookup;
        println!(
            "\nlookup: {}-block prefix over the socket, microseconds",
            l.prefix_blocks
        );
        Latency::print_header();
        l.hit.print_row("hit (all blocks held)");
        l.miss.print_row("miss (first block unknown)");
        println!(
            "  target hit p99 <= {:.0} us: {} (informational)",
            l.p99_target_us,
            if l.hit_meets_target { "PASS" } else { "MISS" }
        );
        println!(
            "  pipelined hits, depth {}: {:.0} lookups/s",
            l.pipeline_depth, l.pipelined_lookups_per_s
        );
        if let Some(fabric) = &self.fabric {
            fabric.print();
        }
        if let Some(gpus) = &self.gpus {
            gpus.print();
        }
    }
}

/// Writes the report as pretty JSON.
fn write_json(path: &Path, report: &Report) -> Result<()> {
    let text = serde_json::to_string_pretty(report).context("cannot encode the report")?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Bytes with a binary unit, for the header.
fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

// ---------------------------------------------------------------------------------------------
// The engine's region and randomness
// ---------------------------------------------------------------------------------------------

/// A POSIX shared-memory file under /dev/shm, mapped here; unmapped and removed on drop, so an
/// error or Ctrl-C leaves nothing behind.
struct ShmRegion {
    name: String,
    path: PathBuf,
    ptr: NonNull<u8>,
    len: usize,
    _file: File,
}

impl ShmRegion {
    /// Creates `/dev/shm/<name>` of `bytes` bytes and maps it shared.
    fn create(name: &str, bytes: u64) -> Result<Self> {
        let path = Path::new("/dev/shm").join(name);
        let len = usize::try_from(bytes).context("region size does not fit in memory")?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let cleanup = RemoveOnDrop(&path);
        file.set_len(bytes)
            .with_context(|| format!("cannot size {} to {bytes} bytes", path.display()))?;
        // SAFETY: a fresh shared mapping of a file we own; nothing else maps it yet.
        let raw = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &file,
                0,
            )
        }
        .with_context(|| format!("cannot map {}", path.display()))?;
        let ptr = NonNull::new(raw.cast::<u8>()).context("mmap returned null")?;
        std::mem::forget(cleanup);
        Ok(Self {
            name: name.to_owned(),
            path,
            ptr,
            len,
            _file: file,
        })
    }

    /// Fills the region with pseudo-random bytes (which also touches every page).
    fn fill_random(&self, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        for chunk in self.bytes_mut(0, self.len).chunks_mut(8) {
            let word = rng.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    /// Pointer to byte `offset`; panics when out of bounds (a bug in this file).
    fn ptr_at(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.len, "offset {offset} outside the region");
        // SAFETY: in bounds of the mapping, checked above.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// `len` bytes at `offset`.
    fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len, "span outside the region");
        // SAFETY: in bounds; the node writes the region only during a load this benchmark
        // awaits, never while a slice is alive.
        unsafe { std::slice::from_raw_parts(self.ptr_at(offset), len) }
    }

    /// `len` writable bytes at `offset`.
    #[expect(
        clippy::mut_from_ref,
        reason = "shared memory: the node is the other writer, and it only copies during awaited requests"
    )]
    fn bytes_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len, "span outside the region");
        // SAFETY: in bounds; callers hold no other slice of this span while writing.
        unsafe { std::slice::from_raw_parts_mut(self.ptr_at(offset), len) }
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`, unmapped once.
        if let Err(error) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            eprintln!("cannot unmap {}: {error}", self.path.display());
        }
        drop(RemoveOnDrop(&self.path));
    }
}

/// A page-aligned anonymous buffer standing in for pool pages in the memcpy baselines.
///
/// Page-aligned like the arena: a `Vec`'s heap block starts 16 bytes into a page, and on AMD
/// Zen `rep movsb` between mutually misaligned buffers runs at a fraction of the aligned speed,
/// which would make the baseline unfairly slow.
struct PageBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

impl PageBuffer {
    /// Maps `len` bytes and touches every page, so no copy pays for page faults.
    fn new(len: usize) -> Result<Self> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .with_context(|| format!("cannot map a {len}-byte baseline buffer"))?;
        let ptr = NonNull::new(raw.cast::<u8>()).context("mmap returned null")?;
        let mut buffer = Self { ptr, len };
        buffer.as_mut_slice().fill(0x5a);
        Ok(buffer)
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the whole mapping, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        if let Err(error) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            eprintln!("cannot unmap the baseline buffer: {error}");
        }
    }
}

/// Removes a file when dropped, reporting but not failing on errors.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(self.0) {
            eprintln!("cannot remove {}: {error}", self.0.display());
        }
    }
}

/// SplitMix64: a tiny, fast, seedable generator (`rand` is only a dev-dependency).
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fisher-Yates shuffle.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}
