//! `pegaflow-fabric-sim`: many fabric instances in one process on loopback, measuring how fast
//! a newly published block becomes visible on every node, and the digest's false-positive rate.
//!
//! ```text
//! cargo run --release -p pegaflow-fabric --bin pegaflow-fabric-sim -- [--nodes 16,64] [--gossip-ms 100,500] [--trials 20] [--fill 20000] [--capacity 100000]
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pegaflow_fabric::digest::DEFAULT_FP_RATE;
use pegaflow_fabric::{
    BlockKey, DigestShape, Fabric, FabricOptions, LinkOptions, LocalDigest, MemorySource,
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

struct Args {
    nodes: Vec<usize>,
    gossip_ms: Vec<u64>,
    trials: usize,
    fill: u64,
    capacity: u64,
}

fn parse_list<T: std::str::FromStr>(text: &str) -> Result<Vec<T>> {
    text.split(',')
        .map(|v| v.trim().parse().ok().context("bad list value"))
        .collect()
}

fn args() -> Result<Args> {
    let mut args = Args {
        nodes: vec![16, 64],
        gossip_ms: vec![100, 500],
        trials: 20,
        fill: 20_000,
        capacity: 100_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--nodes" => args.nodes = parse_list(&value)?,
            "--gossip-ms" => args.gossip_ms = parse_list(&value)?,
            "--trials" => args.trials = value.parse()?,
            "--fill" => args.fill = value.parse()?,
            "--capacity" => args.capacity = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn key(node: usize, i: u64) -> BlockKey {
    let mut h = Sha256::new();
    h.update((node as u64).to_le_bytes());
    h.update(i.to_le_bytes());
    h.finalize().into()
}

fn free_udp() -> Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at]
}

/// Polls every node until `check(node)` holds for all, returning each node's first-seen time.
async fn visible_on_all(
    fabrics: &[Fabric],
    skip: Option<usize>,
    limit: Duration,
    check: impl Fn(&Fabric) -> bool,
) -> Option<Vec<Duration>> {
    let start = Instant::now();
    let mut seen: Vec<Option<Duration>> = vec![None; fabrics.len()];
    if let Some(skip) = skip {
        seen[skip] = Some(Duration::ZERO);
    }
    while start.elapsed() < limit {
        for (i, f) in fabrics.iter().enumerate() {
            if seen[i].is_none() && check(f) {
                seen[i] = Some(start.elapsed());
            }
        }
        if seen.iter().all(Option::is_some) {
            let mut out: Vec<Duration> = seen
                .into_iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != skip)
                .filter_map(|(_, d)| d)
                .collect();
            out.sort();
            return Some(out);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

async fn cluster_run(
    nodes: usize,
    gossip_ms: u64,
    trials: usize,
    fill: u64,
    capacity: u64,
) -> Result<()> {
    let interval = Duration::from_millis(gossip_ms);
    let mut fabrics = Vec::with_capacity(nodes);
    let mut seeds = Vec::new();
    for n in 0..nodes {
        let gossip = free_udp()?;
        if n < 3 {
            seeds.push(gossip.to_string());
        }
        let options = FabricOptions {
            cluster_id: "sim".into(),
            node_id: format!("n{n:03}"),
            gossip_listen: gossip,
            gossip_advertise: gossip,
            link_listen: "127.0.0.1:0".parse()?,
            link_advertise: None,
            seeds: seeds.clone(),
            zone: format!("z{}", n % 4),
            host: format!("h{n}"),
            secret: "sim".into(),
            gossip_interval: interval,
            failure_timeout: interval * 10,
            capacity_bytes: 1 << 30,
            expected_keys: capacity,
            fp_rate: DEFAULT_FP_RATE,
            link: LinkOptions::default(),
        };
        fabrics.push(Fabric::start(options, Arc::new(MemorySource::new())).await?);
    }
    let start = Instant::now();
    let limit = Duration::from_secs(120);
    let joined = visible_on_all(&fabrics, None, limit, |f| {
        f.cluster().members().len() == nodes - 1
    })
    .await;
    joined.context("membership did not converge")?;
    let join_time = start.elapsed();

    // Every node publishes `fill` keys: the digests' bulk that gossip must carry once.
    let start = Instant::now();
    for (n, f) in fabrics.iter().enumerate() {
        let keys: Vec<_> = (0..fill).map(|i| key(n, i)).collect();
        f.cluster().publish_keys(&keys, &[]);
        f.cluster().flush().await;
    }
    let probe: Vec<BlockKey> = (0..nodes).map(|n| key(n, fill.saturating_sub(1))).collect();
    let filled = visible_on_all(&fabrics, None, limit, |f| {
        probe
            .iter()
            .filter(|k| !f.cluster().candidates(std::slice::from_ref(*k)).is_empty())
            .count()
            >= nodes - 1
    })
    .await;
    let fill_time = filled.map(|_| start.elapsed());

    let mut all = Vec::new();
    let mut worst_per_trial = Vec::new();
    for t in 0..trials {
        let publisher = (t * 7919) % nodes;
        let k = key(publisher, 1_000_000 + t as u64);
        let target = fabrics[publisher].cluster().me().node_id.clone();
        fabrics[publisher].cluster().publish_keys(&[k], &[]);
        fabrics[publisher].cluster().flush().await;
        let times = visible_on_all(&fabrics, Some(publisher), limit, |f| {
            f.cluster()
                .candidates(&[k])
                .iter()
                .any(|c| c.member.node_id == target)
        })
        .await
        .context("a published key never reached every node")?;
        worst_per_trial.push(*times.last().unwrap_or(&Duration::ZERO));
        all.extend(times);
    }
    all.sort();
    worst_per_trial.sort();
    let shape = DigestShape::for_capacity(capacity, DEFAULT_FP_RATE);
    println!(
        "| {nodes} | {gossip_ms} | {:.2} s | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        join_time.as_secs_f64(),
        fill_time.map_or("not converged in 120 s".to_owned(), |d| format!(
            "{:.2} s ({} KiB/node)",
            d.as_secs_f64(),
            shape.gossip_bytes() / 1024
        )),
        percentile(&all, 0.5).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        percentile(&worst_per_trial, 0.5).as_secs_f64() * 1e3,
        worst_per_trial
            .last()
            .map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    Ok(())
}

fn fp_rate(capacity: u64, fill: u64, probes: u64) -> (DigestShape, f64) {
    let shape = DigestShape::for_capacity(capacity, DEFAULT_FP_RATE);
    let mut digest = LocalDigest::new(shape);
    for i in 0..fill {
        digest.insert(&key(0, i));
    }
    let hits = (0..probes).filter(|i| digest.contains(&key(1, *i))).count();
    (shape, hits as f64 / probes as f64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = args()?;
    println!(
        "## Digest false-positive rate (target {:.1} %)\n",
        DEFAULT_FP_RATE * 100.0
    );
    println!("| capacity (keys) | keys inserted | shards | hashes | gossip state | expected | measured (1M probes) |");
    println!("|---|---|---|---|---|---|---|");
    for capacity in [100_000u64, 1_000_000] {
        for fill in [capacity / 2, capacity] {
            let (shape, rate) = fp_rate(capacity, fill, 1_000_000);
            println!(
                "| {capacity} | {fill} | {} | {} | {} KiB | {:.3} % | {:.3} % |",
                shape.shards,
                shape.hashes,
                shape.gossip_bytes() / 1024,
                shape.expected_fp_rate(fill) * 100.0,
                rate * 100.0
            );
        }
    }
    println!(
        "\n## Gossip convergence (loopback, one process, {} trials)\n",
        args.trials
    );
    println!("| nodes | gossip interval (ms) | membership converged | {} keys/node digests converged | new key visible p50 (ms) | p99 (ms) | all nodes, median trial (ms) | all nodes, worst trial (ms) |", args.fill);
    println!("|---|---|---|---|---|---|---|---|");
    for &gossip_ms in &args.gossip_ms {
        for &nodes in &args.nodes {
            cluster_run(nodes, gossip_ms, args.trials, args.fill, args.capacity).await?;
        }
    }
    Ok(())
}
