//! `pegaflow-fabric-bench`: page fetch throughput between two fabric instances on loopback,
//! against a plain TCP copy of the same bytes measured in the same run.
//!
//! ```text
//! cargo run --release -p pegaflow-fabric --bin pegaflow-fabric-bench -- [--page-kib 2048] [--pages 256] [--rounds 5]
//! ```
//! The fabric side is the whole path: handshake-authenticated link, chunked pipelined requests
//! under the in-flight budget, bincode headers, a fresh buffer per page, crc32c verified on
//! every page; pages are consumed as they arrive. The baseline writes the same pages back to back on a bare socket and reads them
//! into one reused buffer: the most a single TCP stream on this machine can do.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use pegaflow_fabric::{BlockKey, Fabric, FabricOptions, LinkOptions, MemorySource};
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
    // One untimed pass checks the bytes; timed passes stream pages and drop each one, as the
    // node does when it copies a fetched page into its pool.
    let (fetched, error) = client
        .fetch(
            &keys,
            page_bytes as u64,
            Instant::now() + Duration::from_secs(60),
        )
        .collect()
        .await;
    if let Some(e) = error {
        bail!("fetch failed: {e}");
    }
    if fetched.len() != count || fetched.iter().zip(pages.iter()).any(|(f, p)| f.data != *p) {
        bail!("fetched pages differ from the source");
    }
    drop(fetched);
    let (mut best_fabric, mut best_tcp) = (0f64, 0f64);
    for round in 0..rounds {
        let start = Instant::now();
        let mut stream = client.fetch(&keys, page_bytes as u64, start + Duration::from_secs(60));
        let mut bytes = 0;
        while let Some(page) = stream.next().await {
            bytes += page?.data.len();
        }
        let fabric = start.elapsed();
        if bytes != total {
            bail!("fetched {bytes} of {total} bytes");
        }
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
