//! `pegaflow-fabric-bench`: page fetch throughput between two fabric instances on loopback,
//! against a plain TCP copy of the same bytes measured in the same run.
//!
//! ```text
//! cargo run --release -p pegaflow-fabric --bin pegaflow-fabric-bench -- [--page-kib 2048] [--pages 256] [--rounds 5]
//! ```
//! The fabric side is the whole path: handshake-authenticated link, chunked pipelined requests
//! under the in-flight budget, bincode headers, every page streamed from the socket into its
//! place in a touched buffer standing in for the node's pool (a `PageSink`), crc32c verified
//! on every page as it lands. The baseline writes the same pages back to back on a bare socket
//! and reads them into one reused buffer: the most a single TCP stream on this machine can do.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use pegaflow_fabric::{
    BlockKey, Fabric, FabricOptions, LinkClient, LinkOptions, MemorySource, PageSink, SinkError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn options(node: &str, seeds: Vec<String>) -> Result<FabricOptions> {
    let gossip: SocketAddr = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    Ok(FabricOptions {
        cluster_id: "bench".into(),
        node_id: node.into(),
        gossip_listen: gossip,
        gossip_advertise: gossip,
        link_listen: "127.0.0.1:0".parse()?,
        link_advertise: None,
        seeds,
        zone: String::new(),
        host: node.into(),
        secret: "bench".into(),
        gossip_interval: Duration::from_millis(200),
        failure_timeout: Duration::from_secs(5),
        capacity_bytes: 1 << 30,
        expected_keys: 100_000,
        fp_rate: 0.01,
        link: LinkOptions::default(),
    })
}

/// A plain TCP copy of `pages`: one connection, bytes back to back, read into one buffer.
async fn tcp_copy(pages: Arc<Vec<Bytes>>, page_bytes: usize) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let total = pages.len() * page_bytes;
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        for page in pages.iter() {
            stream.write_all(page).await?;
        }
        stream.flush().await?;
        anyhow::Ok(())
    });
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; page_bytes];
    let start = Instant::now();
    let mut got = 0;
    while got < total {
        stream.read_exact(&mut buf).await?;
        got += page_bytes;
    }
    let elapsed = start.elapsed();
    server.await??;
    Ok(elapsed)
}

/// Every page back to back in one touched buffer: the node's pool, as far as the link can tell.
struct Pool {
    bytes: Vec<u8>,
    page_bytes: usize,
}

impl PageSink for Pool {
    fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<(), SinkError> {
        let start = index * self.page_bytes + offset;
        self.bytes
            .get_mut(start..start + bytes.len())
            .ok_or_else(|| SinkError(format!("page {index} lies outside the pool")))?
            .copy_from_slice(bytes);
        Ok(())
    }
}

/// Fetches every key into `pool` and gives it back, failing unless every page landed.
async fn fetch_all(client: &LinkClient, keys: &[BlockKey], pool: Pool) -> Result<Pool> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let page_bytes = pool.page_bytes as u64;
    let mut fetch = client.fetch_into(keys, page_bytes, deadline, pool);
    while let Some(landed) = fetch.next().await {
        landed?;
    }
    if fetch.delivered() != keys.len() {
        bail!("fetched {} of {} pages", fetch.delivered(), keys.len());
    }
    Ok(fetch.into_sink())
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (mut page_kib, mut count, mut rounds) = (2048usize, 256usize, 5usize);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: usize = it.next().context("flag needs a value")?.parse()?;
        match flag.as_str() {
            "--page-kib" => page_kib = value,
            "--pages" => count = value,
            "--rounds" => rounds = value,
            other => bail!("unknown flag {other}"),
        }
    }
    let page_bytes = page_kib * 1024;
    let source = MemorySource::new();
    let mut keys: Vec<BlockKey> = Vec::with_capacity(count);
    let mut pages = Vec::with_capacity(count);
    for i in 0..count {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let page: Bytes = (0..page_bytes)
            .map(|b| (b as u64 * 31 + i as u64) as u8)
            .collect();
        source.insert(key, page.clone());
        keys.push(key);
        pages.push(page);
    }
    let pages = Arc::new(pages);
    let a = Fabric::start(options("a", vec![])?, Arc::new(source)).await?;
    let c = Fabric::start(options("c", vec![])?, Arc::new(MemorySource::new())).await?;
    let (client, _) = c.links().get(a.link_addr()).await?;
    let total = count * page_bytes;
    println!(
        "{count} pages of {page_kib} KiB ({:.0} MiB) per round, {rounds} rounds, loopback",
        total as f64 / (1 << 20) as f64
    );
    println!("| round | fabric fetch (GB/s) | plain TCP copy (GB/s) | ratio |");
    println!("|---|---|---|---|");
    // One untimed pass touches the pool and checks the bytes; timed passes land every page in
    // its place in the pool, as the node does.
    let pool = Pool {
        bytes: vec![0u8; total],
        page_bytes,
    };
    let mut pool = fetch_all(&client, &keys, pool).await?;
    if pool
        .bytes
        .chunks(page_bytes)
        .ne(pages.iter().map(|p| &p[..]))
    {
        bail!("fetched pages differ from the source");
    }
    let (mut best_fabric, mut best_tcp) = (0f64, 0f64);
    for round in 0..rounds {
        let start = Instant::now();
        pool = fetch_all(&client, &keys, pool).await?;
        let fabric = start.elapsed();
        let tcp = tcp_copy(Arc::clone(&pages), page_bytes).await?;
        let (f, t) = (gbps(total, fabric), gbps(total, tcp));
        best_fabric = best_fabric.max(f);
        best_tcp = best_tcp.max(t);
        println!("| {round} | {f:.2} | {t:.2} | {:.2} |", f / t);
    }
    println!(
        "| best | {best_fabric:.2} | {best_tcp:.2} | {:.2} |",
        best_fabric / best_tcp
    );
    Ok(())
}
