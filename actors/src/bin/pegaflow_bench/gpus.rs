//! Two engines on two GPUs' transfer actors: does work for one GPU wait behind the other's?
//!
//! A node is started with two GPUs of host engines declared in `topology.gpus`; two engines,
//! each on its own connection, shared-memory region and GPU, save and load scattered batches
//! (every load checked byte for byte). After untimed rounds that cycle the whole pool, one
//! engine runs alone, then both at once, in the same run: if the two transfer actors serialized, both at once would move no more bytes per
//! second than one alone (ratio 1.0); independent actors move more, up to what the cores and
//! memory bandwidth allow.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pegaflow_actors::client::Client;
use pegaflow_actors::node;
use pegaflow_config::HostGpu;
use serde::Serialize;

use super::{
    fresh_keys, load_and_verify, node_config, register, save_batch, scattered_batches, Args,
    Engine, Shape, ShmRegion,
};

/// Times one engine alone and then both at once are measured, alternating.
const REPEATS: u64 = 5;

/// The two GPUs the benchmark's node declares.
const GPUS: [&str; 2] = ["bench-gpu-0", "bench-gpu-1"];

/// What the two-GPU benchmark measured.
#[derive(Debug, Serialize)]
pub(super) struct GpusReport {
    /// Save-and-load rounds each engine ran per phase.
    rounds: u32,
    /// Bytes one round moves (a batch saved and loaded back).
    round_bytes: u64,
    /// One engine alone, GB/s over its rounds (of the repeat with the median ratio).
    alone_gbps: f64,
    /// Both engines at once, GB/s of both together over the wall time.
    both_gbps: f64,
    /// `both_gbps / alone_gbps` of the median repeat: 1.0 if the actors serialized, up to 2.0
    /// if nothing is shared.
    ratio: f64,
    /// The ratio of each repeat, in the order run.
    ratios: Vec<f64>,
    /// Bytes each GPU's transfer actor copied, from `/api/stats`.
    bytes_by_device: Vec<(String, u64)>,
    verified_loads: u32,
}

impl GpusReport {
    pub(super) fn print(&self) {
        println!(
            "\ntwo engines on two GPUs' transfer actors (host engines, topology.gpus), \
             {} rounds of save + load each, {} per round",
            self.rounds,
            super::human(self.round_bytes)
        );
        println!(
            "  one engine alone            : {:>8.2} GB/s",
            self.alone_gbps
        );
        println!(
            "  both at once (sum)          : {:>8.2} GB/s",
            self.both_gbps
        );
        println!("  ratio both / alone (median) : {:>8.3}", self.ratio);
        let each: Vec<String> = self.ratios.iter().map(|r| format!("{r:.3}")).collect();
        println!("  ratio of each repeat        : {}", each.join(", "));
        for (device, bytes) in &self.bytes_by_device {
            println!("  copied by {device:<18}: {}", super::human(*bytes));
        }
        println!("  loads verified byte-exact   : {}", self.verified_loads);
    }
}

/// One engine of the benchmark: its connection, region and registration.
struct Rank {
    client: Client,
    engine: Engine,
    region: ShmRegion,
}

/// Runs the benchmark on a fresh node of its own.
pub(super) async fn bench(args: &Args, shape: &Shape) -> Result<GpusReport> {
    let mut config = node_config(args, "gpus");
    config.topology.gpus = GPUS
        .iter()
        .map(|uuid| HostGpu {
            uuid: (*uuid).into(),
            numa_node: 0,
        })
        .collect();
    let node = node::start(&config)
        .await
        .context("cannot start the two-GPU node")?;
    let outcome = run(args, shape, &node).await;
    node.shutdown().await;
    outcome
}

async fn run(args: &Args, shape: &Shape, node: &node::RunningNode) -> Result<GpusReport> {
    let mut ranks = Vec::new();
    for (i, gpu) in GPUS.iter().enumerate() {
        let region = ShmRegion::create(
            &format!("pegaflow-bench-{}-gpu{i}", std::process::id()),
            shape.region_bytes(),
        )?;
        region.fill_random(args.seed + i as u64);
        let mut client = Client::connect(node.socket_path())
            .await
            .context("cannot connect to the node's socket")?;
        let engine = register(&mut client, shape, &region, Some(gpu)).await?;
        ranks.push(Rank {
            client,
            engine,
            region,
        });
    }
    let rounds = args.copy_iters.max(1);
    let round_bytes = 2 * shape.batch_bytes();
    // Untimed: the ranks' rounds together cycle the whole pool once, so every timed save
    // reuses touched pages and evicts, as on a running node whose pool is full.
    let warmup = (args.pool_size.0 / shape.batch_bytes().max(1) / 2 + 1) as u32;
    let mut verified = 0;
    for (i, rank) in ranks.iter_mut().enumerate() {
        verified += rounds_of(rank, args, shape, warmup, 1_000 + i as u64)
            .await?
            .1;
    }
    let mut ranks = ranks.into_iter();
    let (mut first, mut second) = (
        ranks.next().context("two ranks")?,
        ranks.next().context("two ranks")?,
    );
    let gbps = |bytes: u64, took: Duration| bytes as f64 / took.as_secs_f64().max(1e-12) / 1e9;
    // Alone and both at once alternate, so a machine whose load drifts affects both alike.
    let mut pairs = Vec::new();
    for repeat in 0..REPEATS {
        let stream = 2_000 + 10 * repeat;
        let (alone, n) = rounds_of(&mut first, args, shape, rounds, stream).await?;
        verified += n;
        let started = Instant::now();
        let (a, b) = tokio::join!(
            rounds_of(&mut first, args, shape, rounds, stream + 1),
            rounds_of(&mut second, args, shape, rounds, stream + 2),
        );
        let both = started.elapsed();
        verified += a?.1 + b?.1;
        pairs.push((
            gbps(u64::from(rounds) * round_bytes, alone),
            gbps(2 * u64::from(rounds) * round_bytes, both),
        ));
    }
    let ratios: Vec<f64> = pairs.iter().map(|(alone, both)| both / alone).collect();
    let median = median_index(&ratios);
    let (alone_gbps, both_gbps) = pairs[median];
    let stats = first.client.stats().await.context("stats failed")?.stats;
    let bytes_by_device = stats
        .transfers
        .iter()
        .filter(|d| GPUS.contains(&d.device.as_str()))
        .map(|d| (d.device.clone(), d.save.bytes + d.load.bytes))
        .collect::<Vec<_>>();
    ensure!(
        bytes_by_device.len() == GPUS.len() && bytes_by_device.iter().all(|(_, b)| *b > 0),
        "each GPU's transfer actor should have copied: {bytes_by_device:?}"
    );
    Ok(GpusReport {
        rounds,
        round_bytes,
        alone_gbps,
        both_gbps,
        ratio: ratios[median],
        ratios,
        bytes_by_device,
        verified_loads: verified,
    })
}

/// `rounds` rounds of saving a batch under fresh keys and loading it back (verified); returns
/// the time they took and how many loads were verified.
async fn rounds_of(
    rank: &mut Rank,
    args: &Args,
    shape: &Shape,
    rounds: u32,
    stream: u64,
) -> Result<(Duration, u32)> {
    let (save_blocks, load_blocks) = scattered_batches(args, shape);
    let started = Instant::now();
    for round in 0..u64::from(rounds) {
        let stream = (stream << 20) + round;
        save_batch(&mut rank.client, &rank.engine, shape, &save_blocks, stream).await?;
        let keys = fresh_keys(&rank.engine, shape, shape.batch_blocks, stream);
        load_and_verify(
            &mut rank.client,
            &rank.engine,
            shape,
            &rank.region,
            &keys,
            &save_blocks,
            &load_blocks,
        )
        .await?;
    }
    Ok((started.elapsed(), rounds))
}

/// The index of the median of `values` (the upper one of an even count).
fn median_index(values: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order[order.len() / 2]
}
