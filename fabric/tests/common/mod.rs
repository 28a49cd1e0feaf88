//! Helpers shared by the integration tests: fabrics on loopback ports.

#![allow(dead_code, reason = "each test binary uses a subset of the helpers")]

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use pegaflow_fabric::{BlockKey, Fabric, FabricOptions, LinkOptions, MemorySource};

pub const GOSSIP: Duration = Duration::from_millis(100);
pub const FAILURE: Duration = Duration::from_millis(1500);

/// A loopback UDP port nobody holds right now (gossip needs its address before it binds).
pub fn free_udp_addr() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    socket.local_addr().expect("udp addr")
}

pub fn options(node: &str, secret: &str, seeds: &[SocketAddr]) -> FabricOptions {
    let gossip = free_udp_addr();
    FabricOptions {
        cluster_id: "test".into(),
        node_id: node.into(),
        gossip_listen: gossip,
        gossip_advertise: gossip,
        link_listen: "127.0.0.1:0".parse().expect("addr"),
        link_advertise: None,
        seeds: seeds.iter().map(|s| s.to_string()).collect(),
        zone: "z1".into(),
        host: node.into(),
        secret: secret.into(),
        gossip_interval: GOSSIP,
        failure_timeout: FAILURE,
        capacity_bytes: 1 << 30,
        expected_keys: 10_000,
        fp_rate: 0.01,
        link: LinkOptions::default(),
    }
}

pub struct Node {
    pub fabric: Fabric,
    pub source: MemorySource,
    pub gossip: SocketAddr,
}

pub async fn start(node: &str, seeds: &[SocketAddr]) -> Node {
    start_with(options(node, "secret", seeds)).await
}

pub async fn start_with(options: FabricOptions) -> Node {
    let source = MemorySource::new();
    let gossip = options.gossip_advertise;
    let fabric = Fabric::start(options, Arc::new(source.clone()))
        .await
        .expect("fabric starts");
    Node {
        fabric,
        source,
        gossip,
    }
}

pub fn key(i: u64) -> BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[8..16].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
    k
}

/// Deterministic page bytes for key `i`.
pub fn page(i: u64, len: usize) -> bytes::Bytes {
    let mut x = i.wrapping_add(1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Polls `check` every 20 ms until it holds or `within` passes; returns the time it took.
pub async fn wait_for(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    while start.elapsed() < within {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until `node` sees some peer claim `keys[0]`, within twice the failure window.
pub async fn wait_for_a_holder(node: &Node, keys: &[BlockKey]) {
    let seen = wait_for(FAILURE * 2, || {
        !node.fabric.cluster().candidates(keys).is_empty()
    })
    .await;
    assert!(seen.is_some(), "no peer's digest claims the keys");
}
