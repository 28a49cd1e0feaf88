//! `--fabric`: what a peer costs, measured between two nodes on loopback.
//!
//! Nodes A and B start in this process (`node::start`), each with its own pool of
//! `--pool-size`, the host copy engine, and the fabric on a free loopback port (gossip every
//! 100 ms, one secret); B joins through A. The benchmark still talks to them only through the
//! socket protocol. Both register the same shared-memory region: A saves from one batch of its
//! blocks and B loads into the other, so the byte-for-byte check of local loads
//! ([`load_and_verify`]) checks fetched pages unchanged. B's pool is filled from the target
//! blocks' own bytes beforehand, and B's fetch counter must match the pages asked for, so a
//! load that passes can only have brought its bytes over the link.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use pegaflow_actors::client::Client;
use pegaflow_actors::keys::BlockKey;
use pegaflow_actors::node::{self, RunningNode};
use pegaflow_actors::peers::FabricStats;
use pegaflow_config::FabricConfig;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{
    connect, cycle_pool, fresh_keys, human, load_and_verify, node_config, save_batch, save_prefix,
    scattered_batches, time_lookup, Args, Bandwidth, Engine, Latency, Shape, ShmRegion,
};

/// Gossip round interval: the value docs/fabric.md found to meet docs/design.md §9's 1 s visibility.
const GOSSIP_MS: u64 = 100;
/// How long B may take to see what A saved before the run is declared broken.
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);
/// How long B's load waits for A's pages: generous, so a slow shared machine measures a slow
/// fetch instead of a partial load.
const FETCH_TIMEOUT_MS: u64 = 60_000;

/// Everything the fabric benchmark measured.
#[derive(Debug, Serialize)]
pub(super) struct FabricReport {
    gossip_interval_ms: u64,
    lookup: RemoteLookupReport,
    fetch: FetchReport,
}

/// Lookup of a prefix on its holder and on a node that only sees it in the holder's digest.
#[derive(Debug, Serialize)]
struct RemoteLookupReport {
    prefix_blocks: u32,
    /// On A, which holds every block.
    local_hit: Latency,
    /// On B, which holds none: every hit is a `remote_hit`.
    remote_hit: Latency,
    /// Remote over local.
    p50_ratio: f64,
    p90_ratio: f64,
    p99_ratio: f64,
    /// From A's reply to the prefix's last save to B's first lookup claiming all of it.
    digest_visible_ms: f64,
}

/// B's loads of blocks only A holds, against a plain TCP copy and B's own pool.
#[derive(Debug, Serialize)]
struct FetchReport {
    batch_blocks: u32,
    batch_bytes: u64,
    /// B's load of blocks fetched from A: link, B's pool, then B's engine region.
    remote_load: Bandwidth,
    /// B's load of the same blocks right after, from its own pool.
    local_load: Bandwidth,
    /// The same bytes over one plain loopback TCP connection into one reused buffer.
    tcp_copy: Bandwidth,
    /// Bytes over (mean remote load − mean local load): the fetch into B's pool, derived.
    fetch_into_pool_gbps: f64,
    /// Mean-over-mean ratios.
    remote_vs_tcp: f64,
    remote_vs_local: f64,
    /// From A's save reply to B's first lookup claiming the whole batch, per timed round.
    digest_visible: Latency,
    verified_loads: u32,
    /// B's fabric counters at the end (every load, the untimed first one included).
    fetched_pages: u64,
    fetched_bytes: u64,
    false_positives: u64,
    fetch_failures: u64,
}

/// One node as the benchmark sees it: a connection with the region registered.
struct Peer {
    client: Client,
    engine: Engine,
}

/// Starts A and B, measures, and shuts both down whatever happened.
pub(super) async fn bench(args: &Args, shape: &Shape, region: &ShmRegion) -> Result<FabricReport> {
    let (a, a_addr) = start_node(args, "a", None).await?;
    let b = match start_node(args, "b", Some(a_addr)).await {
        Ok((b, _)) => b,
        Err(error) => {
            a.shutdown().await;
            return Err(error);
        }
    };
    let outcome = measure(args, shape, region, &a, &b).await;
    b.shutdown().await;
    a.shutdown().await;
    outcome
}

/// Starts node `name` with the fabric on a free loopback port, joining through `seed`; returns
/// it and that port's address.
async fn start_node(
    args: &Args,
    name: &str,
    seed: Option<SocketAddr>,
) -> Result<(RunningNode, SocketAddr)> {
    let listen = free_loopback_addr()?;
    let mut config = node_config(args, name);
    config.fabric = FabricConfig {
        enabled: true,
        cluster_id: "pegaflow-bench".into(),
        node_id: Some(name.into()),
        listen,
        seeds: seed.iter().map(ToString::to_string).collect(),
        secret: Some("pegaflow-bench-secret".into()),
        gossip_interval_ms: GOSSIP_MS,
        fetch_timeout_ms: FETCH_TIMEOUT_MS,
        ..FabricConfig::default()
    };
    let node = node::start(&config)
        .await
        .with_context(|| format!("cannot start node {name} with the fabric on {listen}"))?;
    Ok((node, listen))
}

/// A loopback address whose port is free for both UDP (gossip) and TCP (link) right now; the
/// node binds it moments later.
fn free_loopback_addr() -> Result<SocketAddr> {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("cannot bind a loopback TCP port")?;
        let addr = tcp.local_addr().context("cannot read a bound port")?;
        if std::net::UdpSocket::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no loopback port was free for both TCP and UDP in 100 tries")
}

/// Both measurements, lookups first: the fetch rounds evict the lookup prefix from A's pool.
async fn measure(
    args: &Args,
    shape: &Shape,
    region: &ShmRegion,
    a: &RunningNode,
    b: &RunningNode,
) -> Result<FabricReport> {
    let (client, engine) = connect(a, shape, region).await?;
    let mut a = Peer { client, engine };
    let (client, engine) = connect(b, shape, region).await?;
    let mut b = Peer { client, engine };
    let lookup = lookup_latency(args, shape, &mut a, &mut b).await?;
    let fetch = fetch_throughput(args, shape, region, &mut a, &mut b).await?;
    Ok(FabricReport {
        gossip_interval_ms: GOSSIP_MS,
        lookup,
        fetch,
    })
}

/// The `--prefix-blocks` prefix saved on A, then looked up on A (local hits) and on B (remote
/// hits) alternately, so both see the same load from the rest of the machine.
async fn lookup_latency(
    args: &Args,
    shape: &Shape,
    a: &mut Peer,
    b: &mut Peer,
) -> Result<RemoteLookupReport> {
    let prefix = args.prefix_blocks;
    let keys = save_prefix(args, shape, &mut a.client, &a.engine).await?;
    let visible = wait_visible(&mut b.client, &keys).await?;
    let iters = args.lookup_iters as usize;
    let (mut local, mut remote) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for i in 0..args.lookup_warmup + args.lookup_iters {
        let on_a = time_lookup(&mut a.client, &keys, prefix, 0).await?;
        let on_b = time_lookup(&mut b.client, &keys, prefix, prefix).await?;
        if i >= args.lookup_warmup {
            local.push(on_a);
            remote.push(on_b);
        }
    }
    let (local, remote) = (Latency::from_times(local), Latency::from_times(remote));
    Ok(RemoteLookupReport {
        prefix_blocks: prefix,
        p50_ratio: remote.p50_us / local.p50_us,
        p90_ratio: remote.p90_us / local.p90_us,
        p99_ratio: remote.p99_us / local.p99_us,
        local_hit: local,
        remote_hit: remote,
        digest_visible_ms: visible.as_secs_f64() * 1e3,
    })
}

/// Polls `client`'s node until a lookup claims every key as a remote hit; returns how long
/// that took. Fails after [`VISIBLE_WITHIN`].
async fn wait_visible(client: &mut Client, keys: &[BlockKey]) -> Result<Duration> {
    let start = Instant::now();
    let want = keys.len() as u32;
    loop {
        let reply = client.lookup(keys, false).await.context("lookup failed")?;
        if reply.remote_hits == want {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < VISIBLE_WITHIN,
            "node b claims {} of {want} blocks as remote hits after {VISIBLE_WITHIN:?}; \
             gossip between the nodes is not working",
            reply.remote_hits
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Rounds of: a fresh batch saved on A, B's load of it (fetched), B's load of it again (from
/// its pool), and a plain TCP copy of as many bytes. The first round is untimed: it dials the
/// link and faults in B's mapping of the target blocks.
async fn fetch_throughput(
    args: &Args,
    shape: &Shape,
    region: &ShmRegion,
    a: &mut Peer,
    b: &mut Peer,
) -> Result<FetchReport> {
    let (sources, targets) = scattered_batches(args, shape);
    let mut stream = args.seed << 20;
    // B's pool is cycled with the target blocks' bytes, which differ from the sources', so
    // fetched pages reuse touched, evicted pages as on a busy node.
    cycle_pool(args, &mut b.client, &b.engine, shape, &targets, &mut stream).await?;
    let mut tcp = TcpCopy::start(shape).await?;
    let rounds = args.copy_iters.max(1) + 1;
    let (mut visible, mut remote, mut local, mut plain) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        stream += 1;
        let times = fetch_round(shape, region, a, b, &sources, &targets, stream).await?;
        let tcp_time = tcp.copy().await?;
        if round > 0 {
            visible.push(times.visible);
            remote.push(times.remote);
            local.push(times.local);
            plain.push(tcp_time);
        }
    }
    let stats = fabric_stats(&mut b.client).await?;
    let expected = u64::from(rounds) * u64::from(shape.batch_blocks);
    ensure!(
        stats.fetched_pages == expected,
        "node b fetched {} pages over the link, not the {expected} its loads asked for",
        stats.fetched_pages
    );
    let bytes = shape.batch_bytes();
    let fetch_time = mean(&remote).saturating_sub(mean(&local));
    let (remote, local) = (
        Bandwidth::from_times(bytes, &remote),
        Bandwidth::from_times(bytes, &local),
    );
    let tcp_copy = Bandwidth::from_times(bytes, &plain);
    Ok(FetchReport {
        batch_blocks: shape.batch_blocks,
        batch_bytes: bytes,
        fetch_into_pool_gbps: bytes as f64 / fetch_time.as_secs_f64().max(1e-12) / 1e9,
        remote_vs_tcp: remote.mean_gbps / tcp_copy.mean_gbps,
        remote_vs_local: remote.mean_gbps / local.mean_gbps,
        remote_load: remote,
        local_load: local,
        tcp_copy,
        digest_visible: Latency::from_times(visible),
        verified_loads: 2 * rounds,
        fetched_pages: stats.fetched_pages,
        fetched_bytes: stats.fetched_bytes,
        false_positives: stats.false_positives,
        fetch_failures: stats.fetch_failures,
    })
}

/// What one fetch round measured.
struct RoundTimes {
    visible: Duration,
    remote: Duration,
    local: Duration,
}

/// Saves a fresh batch (`stream`) from `sources` on A, waits until B sees it, then loads it
/// into `targets` on B twice, checking every byte both times.
async fn fetch_round(
    shape: &Shape,
    region: &ShmRegion,
    a: &mut Peer,
    b: &mut Peer,
    sources: &[u32],
    targets: &[u32],
    stream: u64,
) -> Result<RoundTimes> {
    save_batch(&mut a.client, &a.engine, shape, sources, stream).await?;
    let keys = fresh_keys(&a.engine, shape, shape.batch_blocks, stream);
    let visible = wait_visible(&mut b.client, &keys).await?;
    let (client, engine) = (&mut b.client, &b.engine);
    let remote = load_and_verify(client, engine, shape, region, &keys, sources, targets).await?;
    let local = load_and_verify(client, engine, shape, region, &keys, sources, targets).await?;
    Ok(RoundTimes {
        visible,
        remote,
        local,
    })
}

/// The node's fabric counters, from `stats`.
async fn fabric_stats(client: &mut Client) -> Result<FabricStats> {
    let reply = client.stats().await.context("stats failed")?;
    reply
        .stats
        .fabric
        .context("node b's stats have no fabric section although the fabric is on")
}

/// Mean of `times` (zero for none).
fn mean(times: &[Duration]) -> Duration {
    let total: Duration = times.iter().sum();
    total / (times.len().max(1) as u32)
}

/// A plain TCP copy over loopback, the ceiling for the link: one connection for the whole run;
/// per round the client sends one byte and the server answers with a batch's bytes from one
/// buffer of that size (like pool pages, not one cache-hot page repeated), which the client
/// reads into one reused page-sized buffer. Nothing is framed, checksummed or copied further.
struct TcpCopy {
    stream: TcpStream,
    buffer: Vec<u8>,
    bytes: u64,
}

impl TcpCopy {
    /// Starts the server task and connects to it.
    async fn start(shape: &Shape) -> Result<Self> {
        let batch = usize::try_from(shape.batch_bytes()).context("batch does not fit in memory")?;
        let page = usize::try_from(shape.page_bytes).context("page does not fit in memory")?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("cannot bind the TCP baseline's listener")?;
        let addr = listener
            .local_addr()
            .context("cannot read the TCP baseline's port")?;
        tokio::spawn(async move {
            if let Err(error) = serve_copies(listener, vec![0x5a; batch]).await {
                eprintln!("TCP baseline server failed: {error:#}");
            }
        });
        let stream = TcpStream::connect(addr)
            .await
            .context("cannot connect to the TCP baseline's server")?;
        stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
        Ok(Self {
            stream,
            buffer: vec![0; page],
            bytes: shape.batch_bytes(),
        })
    }

    /// One timed copy: the request, then every byte of the answer read.
    async fn copy(&mut self) -> Result<Duration> {
        let start = Instant::now();
        self.stream
            .write_all(&[1])
            .await
            .context("TCP baseline request failed")?;
        let mut left = self.bytes;
        while left > 0 {
            let want = self
                .buffer
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            let got = self
                .stream
                .read(&mut self.buffer[..want])
                .await
                .context("TCP baseline read failed")?;
            ensure!(
                got > 0,
                "TCP baseline server closed with {left} bytes to go"
            );
            left -= got as u64;
        }
        Ok(start.elapsed())
    }
}

/// Serves one client until it disconnects: for every request byte, all of `source`.
async fn serve_copies(listener: TcpListener, source: Vec<u8>) -> Result<()> {
    let (mut stream, _) = listener.accept().await.context("accept failed")?;
    stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    let mut request = [0u8; 1];
    while stream.read(&mut request).await.context("read failed")? == 1 {
        stream.write_all(&source).await.context("write failed")?;
    }
    Ok(())
}

impl FabricReport {
    pub(super) fn print(&self) {
        println!(
            "\nfabric: nodes a and b in this process, loopback, gossip {} ms, host copy engine",
            self.gossip_interval_ms
        );
        let l = &self.lookup;
        println!(
            "  lookup of a {}-block prefix only a holds, microseconds",
            l.prefix_blocks
        );
        Latency::print_header();
        l.local_hit.print_row("local hit on a (the holder)");
        l.remote_hit.print_row("remote hit on b (peer a holds it)");
        println!(
            "  ratio remote / local            : p50 {:.2}, p90 {:.2}, p99 {:.2}",
            l.p50_ratio, l.p90_ratio, l.p99_ratio
        );
        println!(
            "  prefix visible on b after       : {:.0} ms",
            l.digest_visible_ms
        );
        let f = &self.fetch;
        println!(
            "  load on b of {} blocks a saved ({}), GB/s",
            f.batch_blocks,
            human(f.batch_bytes)
        );
        Bandwidth::print_header();
        f.remote_load
            .print_row("b load, fetched from a over the link");
        f.local_load.print_row("b load, same blocks from b's pool");
        f.tcp_copy
            .print_row("plain TCP copy, loopback, 1 connection");
        println!(
            "  fetch into b's pool (remote - local load, mean): {:.2} GB/s",
            f.fetch_into_pool_gbps
        );
        println!("  ratio remote load / TCP copy   : {:.3}", f.remote_vs_tcp);
        println!(
            "  ratio remote load / local load : {:.3}",
            f.remote_vs_local
        );
        println!(
            "  batch visible on b after a save: p50 {:.0} ms, max {:.0} ms",
            f.digest_visible.p50_us / 1e3,
            f.digest_visible.max_us / 1e3
        );
        println!(
            "  loads verified byte-exact      : {}; b fetched {} pages ({}), {} false positives, {} failures",
            f.verified_loads,
            f.fetched_pages,
            human(f.fetched_bytes),
            f.false_positives,
            f.fetch_failures
        );
    }
}
