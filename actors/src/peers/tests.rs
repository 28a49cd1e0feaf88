//! Fetching into the pool from holders that go wrong inside a page: the link writes each page
//! straight into its reserved extent, so these check that only pages that landed whole and
//! verified are committed, and that the reservation's other extents are freed.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use pegaflow_config::FabricConfig;
use pegaflow_fabric::frame::{read_frame, write_frame, Message};
use pegaflow_fabric::handshake::{self, Credentials};
use pegaflow_fabric::{Fabric, FabricOptions, LinkOptions, MemorySource};
use pegaflow_gpu_dma::Arena;
use prometheus::Registry;
use ractor::{Actor, ActorRef};
use tokio::io::AsyncWriteExt;

use super::{FabricMetrics, FetchSummary, Peers};
use crate::context::ask;
use crate::keys::BlockKey;
use crate::metrics::Metrics;
use crate::pool::{PoolActor, PoolMsg, PoolState, TransferLease};

/// Several staging pieces per page, so a page can end half written.
const PAGE: usize = 256 << 10;
const PAGES: u64 = 16;
const SECRET: &str = "secret";

fn key(i: u8) -> BlockKey {
    [i; 32]
}

fn page(i: u8) -> Vec<u8> {
    (0..PAGE).map(|b| (b as u64 * 7 + i as u64) as u8).collect()
}

/// A loopback port free for both gossip (UDP) and the link (TCP), as `fabric.listen` needs.
fn free_port() -> SocketAddr {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let addr = udp.local_addr().expect("udp addr");
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// A node's pool and its fabric membership, fetching from `seed`.
struct Node {
    peers: Arc<Peers>,
    pool: ActorRef<PoolMsg>,
    arena: Arc<Arena>,
}

async fn node(seed: SocketAddr) -> Node {
    let arena = Arc::new(Arena::new(PAGES * PAGE as u64, "peers-test").expect("arena"));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let state = PoolState::new(arena.len(), 4096, metrics, None);
    let (pool, _) = Actor::spawn(None, PoolActor, state)
        .await
        .expect("pool actor");
    let config = FabricConfig {
        enabled: true,
        cluster_id: "test".into(),
        node_id: Some("b".into()),
        listen: free_port(),
        seeds: vec![seed.to_string()],
        secret: Some(SECRET.into()),
        gossip_interval_ms: 100,
        failure_timeout_ms: 3000,
        fetch_timeout_ms: 5000,
        ..FabricConfig::default()
    };
    let metrics = FabricMetrics::new(&Registry::new()).expect("fabric metrics");
    let peers = Peers::start(&config, pool.clone(), arena.clone(), metrics)
        .await
        .expect("fabric starts");
    Node { peers, pool, arena }
}

/// A holder publishing `keys` over gossip, and its gossip address; its link is served from
/// `source`, or is the fake peer at `link` when given.
async fn holder(
    source: MemorySource,
    keys: &[BlockKey],
    link: Option<SocketAddr>,
) -> (Fabric, SocketAddr) {
    let gossip = free_port();
    let options = FabricOptions {
        cluster_id: "test".into(),
        node_id: "a".into(),
        gossip_listen: gossip,
        gossip_advertise: gossip,
        link_listen: "127.0.0.1:0".parse().expect("addr"),
        link_advertise: link,
        seeds: Vec::new(),
        zone: String::new(),
        host: "a".into(),
        secret: SECRET.into(),
        gossip_interval: Duration::from_millis(100),
        failure_timeout: Duration::from_secs(3),
        capacity_bytes: 1 << 30,
        expected_keys: 10_000,
        fp_rate: 0.01,
        link: LinkOptions::default(),
    };
    let fabric = Fabric::start(options, Arc::new(source))
        .await
        .expect("holder starts");
    fabric.cluster().publish_keys(keys, &[]);
    fabric.cluster().flush().await;
    (fabric, gossip)
}

/// Waits until `node` sees the holder claim all of `keys`.
async fn claimed(node: &Node, keys: &[BlockKey]) {
    let wait = async {
        while node.peers.remote_hits(keys) < keys.len() as u32 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the holder's digest reaches the node");
}

/// A node that saw the holder (its link served from `source`, or the fake peer at `link`)
/// claim `keys`, and what fetching them into its pool gave; the holder comes back too, to keep
/// it alive.
async fn fetch_from_holder(
    source: MemorySource,
    keys: &[BlockKey],
    link: Option<SocketAddr>,
) -> (Node, FetchSummary, Fabric) {
    let (holder, seed) = holder(source, keys, link).await;
    let node = node(seed).await;
    claimed(&node, keys).await;
    let summary = node
        .peers
        .fetch_into_pool(keys, PAGE as u64)
        .await
        .expect("fetch");
    (node, summary, holder)
}

/// Checks the pool holds exactly `want` pages, the first keys' with their bytes and the
/// crc32c of those bytes, and that no reservation is left.
async fn assert_pool_holds(node: &Node, keys: &[BlockKey], want: usize) {
    let stats = ask(&node.pool, "pool", |reply| PoolMsg::Stats { reply })
        .await
        .expect("stats");
    assert_eq!(stats.pages, want as u64, "pages committed");
    assert_eq!(
        stats.writing_pages, 0,
        "the rest of the reservation is freed"
    );
    let grant = ask(&node.pool, "pool", |reply| PoolMsg::LeaseForPeer {
        keys: keys.to_vec(),
        reply,
    })
    .await
    .expect("lease");
    let _pin = TransferLease::new(node.pool.clone(), grant.lease);
    assert_eq!(
        grant.pages.len(),
        want,
        "committed pages are the leading keys"
    );
    for (i, entry) in grant.pages.iter().enumerate() {
        let bytes = node
            .arena
            .read(entry.extent.offset, entry.bytes)
            .expect("in the arena");
        assert_eq!(bytes, &page(i as u8)[..], "page {i} landed byte-exact");
        assert_eq!(entry.crc32c, crc32c::crc32c(bytes), "page {i} checksum");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_page_read_in_place_is_not_committed() {
    let keys: Vec<_> = (0..4).map(key).collect();
    let source = MemorySource::new();
    for (i, k) in keys.iter().enumerate() {
        source.insert(*k, page(i as u8).into());
    }
    // Page 2's bytes are written into its extent before its checksum is known to fail.
    source.insert_with_crc(keys[2], page(2).into(), crc32c::crc32c(&page(2)) ^ 1);
    let (node, summary, _holder) = fetch_from_holder(source.clone(), &keys, None).await;
    assert_eq!(summary.stored, 2, "the pages before the corrupt one");
    assert_eq!(summary.failures, 1);
    assert_pool_holds(&node, &keys, 2).await;
    assert_eq!(source.active_leases(), 0);
}

/// A fake holder's link: it authenticates, sends page 0 whole, then half of page 1, and hangs
/// up, as a peer that dies inside a page.
async fn dying_link() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let creds = Credentials::new("test", "a", SECRET);
        if handshake::server(&mut stream, &creds, Duration::from_secs(2))
            .await
            .is_err()
        {
            return;
        }
        let Ok(Some((Message::Fetch { request, .. }, _))) = read_frame(&mut stream, 1 << 20).await
        else {
            return;
        };
        let mut wire = Vec::new();
        for index in 0..2u8 {
            let data = page(index);
            let header = Message::Page {
                request,
                index: index as u32,
                crc32c: crc32c::crc32c(&data),
            };
            write_frame(&mut wire, &header, &data, 1 << 20)
                .await
                .expect("encode");
        }
        let cut = wire.len() - PAGE / 2;
        let _ = stream.write_all(&wire[..cut]).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_dying_mid_page_leaves_that_extent_uncommitted() {
    let keys: Vec<_> = (0..4).map(key).collect();
    let link = dying_link().await;
    let (node, summary, _holder) = fetch_from_holder(MemorySource::new(), &keys, Some(link)).await;
    assert_eq!(summary.stored, 1, "only the page that arrived whole");
    assert_eq!(summary.failures, 1);
    assert_pool_holds(&node, &keys, 1).await;
}
