//! The fabric between real `pegaflow-node` processes on loopback: a block saved on one node is
//! found and loaded byte-exact through another, a holder killed mid-fetch costs nothing but
//! its pages, a node with the wrong secret is refused, and `/api/holders` names each node with
//! the prefix of a prompt it holds.

mod support;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pegaflow_actors::client::Client;
use pegaflow_actors::keys::{chain_keys, BlockKey};
use pegaflow_actors::stats::NodeStats;
use rand::RngCore;
use serde_json::{json, Value};
use support::{post, ShmRegion};

const SECRET: &str = "fabric-test-secret";
const GOSSIP_MS: u64 = 100;
/// The failure-detection window the nodes are configured with.
const FAILURE_TIMEOUT: Duration = Duration::from_millis(3000);

/// One `pegaflow-node` process with the fabric on; killed on drop.
struct FabricNode {
    name: &'static str,
    child: Child,
    socket: PathBuf,
    listen: String,
    http: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl FabricNode {
    /// Starts node `name` seeded with `seeds`, authenticating with `secret`.
    fn start(name: &'static str, seeds: &[&FabricNode], secret: &str) -> FabricNode {
        Self::start_in_zone(name, "", seeds, secret)
    }

    /// As [`FabricNode::start`], in `zone` (peers of the same zone are tried first).
    fn start_in_zone(
        name: &'static str,
        zone: &str,
        seeds: &[&FabricNode],
        secret: &str,
    ) -> FabricNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("node.sock");
        let listen = format!("127.0.0.1:{}", free_port());
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let seeds: Vec<String> = seeds.iter().map(|n| format!("\"{}\"", n.listen)).collect();
        let config = format!(
            "[socket]\npath = \"{socket}\"\n[http]\naddr = \"{http}\"\n\
             [pool]\nsize = \"64MiB\"\n[dma]\nengine = \"host\"\n\
             [fabric]\nenabled = true\nnode_id = \"{name}\"\nlisten = \"{listen}\"\n\
             seeds = [{seeds}]\nzone = \"{zone}\"\nsecret = \"{secret}\"\ngossip_interval_ms = {GOSSIP_MS}\n\
             failure_timeout_ms = {timeout}\nfetch_timeout_ms = 5000\n",
            socket = socket.display(),
            seeds = seeds.join(", "),
            timeout = FAILURE_TIMEOUT.as_millis(),
        );
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = dir.path().join("node.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pegaflow-node"))
            .arg("--config")
            .arg(&config_path)
            .env_remove("PEGAFLOW_CONFIG")
            .env("PEGAFLOW_LOG__LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn pegaflow-node");
        let node = FabricNode {
            name,
            child,
            socket,
            listen,
            http,
            log,
            _dir: dir,
        };
        node.wait_serving();
        node
    }

    fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "node {} did not start: {}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn client(&self) -> Client {
        Client::connect(&self.socket).await.expect("connect")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Freezes the process (SIGSTOP): its sockets stay open but nothing answers, like a host
    /// that hangs mid-transfer.
    fn freeze(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FabricNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port free on both UDP (gossip) and TCP (link) right now.
fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn random_keys(n: usize) -> Vec<BlockKey> {
    (0..n)
        .map(|_| {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            key
        })
        .collect()
}

/// An engine registered on `node` over a fresh region.
async fn engine(node: &FabricNode, tag: &str, blocks: u32) -> (Client, u32, ShmRegion) {
    // Tests run in parallel in one process: every region needs its own /dev/shm name.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    let region = ShmRegion::new(
        &format!("{}-{tag}-{unique}", node.name),
        "vllm_lbnhc",
        4,
        blocks,
    );
    let mut client = node.client().await;
    let engine = client
        .register(region.register_request())
        .await
        .expect("register")
        .engine;
    (client, engine, region)
}

async fn stats(client: &mut Client) -> NodeStats {
    *client.stats().await.expect("stats").stats
}

/// Polls `node` until a lookup of `keys` reports `want` remote hits, or panics after `within`.
async fn wait_remote_hits(node: &FabricNode, keys: &[BlockKey], want: u32, within: Duration) {
    let mut client = node.client().await;
    let deadline = Instant::now() + within;
    loop {
        let reply = client.lookup(keys, false).await.expect("lookup");
        if reply.remote_hits == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} sees {} remote hits, not {want}, after {within:?}",
            node.name,
            reply.remote_hits
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_no_pages_held(stats: &NodeStats, node: &str) {
    assert_eq!(
        (stats.pool.leased_pages, stats.pool.writing_pages),
        (0, 0),
        "node {node} still holds pages: {:?}",
        stats.pool
    );
}

/// Saves `keys` from blocks `0..` of a fresh region on `node`, whose bytes are `like`'s when
/// given (the same keys always name the same bytes).
async fn save_blocks(node: &FabricNode, keys: &[BlockKey], like: Option<&ShmRegion>) -> ShmRegion {
    let (mut client, engine, mut region) = engine(node, "saver", 64).await;
    if let Some(like) = like {
        region.map.copy_from_slice(&like.map);
    }
    let blocks: Vec<u32> = (0..keys.len() as u32).collect();
    let saved = client.save(engine, keys, &blocks).await.expect("save");
    assert_eq!(saved.stored as usize, keys.len());
    region
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_saved_on_a_is_found_on_every_node_and_loaded_byte_exact_on_c() {
    let a = FabricNode::start("a", &[], SECRET);
    let b = FabricNode::start("b", &[&a], SECRET);
    let c = FabricNode::start("c", &[&a], SECRET);
    let keys = random_keys(8);
    let saved = save_blocks(&a, &keys, None).await;

    // The digest reaches every other node within the failure-detection window.
    let published = Instant::now();
    wait_remote_hits(&b, &keys, 8, FAILURE_TIMEOUT).await;
    wait_remote_hits(&c, &keys, 8, FAILURE_TIMEOUT).await;
    eprintln!("digest on b and c after {:?}", published.elapsed());

    let (mut client, engine_c, region_c) = engine(&c, "loader", 64).await;
    let into: Vec<u32> = (20..28).collect();
    let loaded = client.load(engine_c, &keys, &into).await.expect("load");
    assert_eq!(loaded.loaded, 8);
    for (i, &block) in into.iter().enumerate() {
        assert!(
            region_c.block(block) == saved.block(i as u32),
            "block {i} differs"
        );
    }

    // The fetched pages are now C's own: a hit in memory, not remote.
    let reply = client.lookup(&keys, false).await.expect("lookup");
    assert_eq!((reply.hits, reply.remote_hits), (8, 0));
    let c_stats = stats(&mut client).await;
    let fabric = c_stats.fabric.as_ref().expect("fabric stats");
    assert_eq!(fabric.fetched_pages, 8);
    let remote_hits = c_stats.totals.hit_blocks_by_tier.get("remote").copied();
    assert!(
        remote_hits >= Some(8),
        "remote hits counted: {remote_hits:?}"
    );
    let peers: Vec<&str> = fabric.peers.iter().map(|p| p.node_id.as_str()).collect();
    assert_eq!(peers, ["a", "b"]);
    // Every fetched byte came from A, none from B, and C served nothing.
    let traffic: Vec<(u64, u64)> = fabric
        .peers
        .iter()
        .map(|p| (p.bytes_received, p.bytes_sent))
        .collect();
    assert_eq!(traffic, [(fabric.fetched_bytes, 0), (0, 0)]);
    assert_eq!(fabric.fetched_bytes, 8 * saved.block(0).len() as u64);
    assert_digests_fresh(&c_stats, "c");
    assert_no_pages_held(&c_stats, "c");
    let a_stats = stats(&mut a.client().await).await;
    let a_fabric = a_stats.fabric.as_ref().expect("fabric");
    assert_eq!(a_fabric.served_pages, 8);
    let sent_to_c: Vec<(&str, u64)> = a_fabric
        .peers
        .iter()
        .map(|p| (p.node_id.as_str(), p.bytes_sent))
        .collect();
    assert_eq!(sent_to_c, [("b", 0), ("c", fabric.fetched_bytes)]);
    assert_no_pages_held(&a_stats, "a");
}

/// Every live peer's digest carries a stamp this node read, restamped every gossip round, so
/// its age stays within the failure-detection window while the peer lives.
fn assert_digests_fresh(stats: &NodeStats, node: &str) {
    let fabric = stats.fabric.as_ref().expect("fabric stats");
    for peer in &fabric.peers {
        let age = peer.digest_age_s.unwrap_or(f64::INFINITY);
        assert!(
            age < FAILURE_TIMEOUT.as_secs_f64(),
            "node {node}: digest of {} is {age} s old",
            peer.node_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_holder_mid_fetch_fails_over_and_leaks_nothing() {
    // C tries A first (same zone), B second; both hold the prefix, A one more block.
    let mut a = FabricNode::start_in_zone("a", "near", &[], SECRET);
    let b = FabricNode::start_in_zone("b", "far", &[&a], SECRET);
    let c = FabricNode::start_in_zone("c", "near", &[&a, &b], SECRET);
    let keys = random_keys(48);
    let only_a = random_keys(1);
    let saved = save_blocks(&a, &keys, None).await;
    save_blocks(&b, &keys, Some(&saved)).await;
    {
        let (mut client, engine, _region) = engine(&a, "extra", 4).await;
        client.save(engine, &only_a, &[0]).await.expect("save");
    }
    wait_remote_hits(&c, &keys, 48, FAILURE_TIMEOUT).await;
    wait_remote_hits(&c, &only_a, 1, FAILURE_TIMEOUT).await;

    // A hangs, C's load starts talking to it, and A dies while C waits on it.
    a.freeze();
    let (mut client, engine_c, region_c) = engine(&c, "loader", 64).await;
    let into: Vec<u32> = (0..48).collect();
    let load = tokio::spawn(async move {
        let started = Instant::now();
        let reply = client.load(engine_c, &keys, &into).await.expect("load");
        (reply, started.elapsed(), client)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!load.is_finished(), "the load waits on the frozen holder");
    a.kill();
    let (reply, took, mut client) = load.await.expect("load task");
    assert!(took < Duration::from_secs(6), "load took {took:?}");
    assert_eq!(
        reply.loaded, 48,
        "b holds every block, so the load fails over to it"
    );
    for block in 0..reply.loaded {
        assert!(
            region_c.block(block) == saved.block(block),
            "block {block} differs"
        );
    }
    let c_stats = stats(&mut client).await;
    let fabric = c_stats.fabric.as_ref().expect("fabric");
    assert!(
        fabric.fetch_failures >= 1,
        "a was tried and failed: {fabric:?}"
    );
    assert_eq!(fabric.fetched_pages, 48);
    assert_no_pages_held(&c_stats, "c");

    // A leaves C's membership and ranking within the failure window (plus gossip slack).
    let deadline = Instant::now() + FAILURE_TIMEOUT * 3;
    loop {
        let peers = stats(&mut client).await.fabric.expect("fabric").peers;
        if peers.iter().all(|p| p.node_id != "a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a is still a member of c: {peers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = client.lookup(&only_a, false).await.expect("lookup");
    assert_eq!(reply.hits, 0, "a dead holder is not a candidate");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_secret_is_refused_and_stores_nothing() {
    let a = FabricNode::start("a", &[], SECRET);
    let intruder = FabricNode::start("w", &[&a], "not-the-secret");
    let keys = random_keys(4);
    save_blocks(&a, &keys, None).await;
    // Gossip carries no secret, so the intruder sees the digest; the link refuses it.
    wait_remote_hits(&intruder, &keys, 4, FAILURE_TIMEOUT).await;

    let (mut client, engine, _region) = engine(&intruder, "loader", 8).await;
    let reply = client
        .load(engine, &keys, &[0, 1, 2, 3])
        .await
        .expect("load");
    assert_eq!(reply.loaded, 0);
    let w_stats = stats(&mut client).await;
    assert_eq!(w_stats.pool.pages, 0, "nothing stored");
    assert_no_pages_held(&w_stats, "w");
    let a_stats = stats(&mut a.client().await).await;
    assert_eq!(a_stats.fabric.expect("fabric").served_pages, 0);
    let log = a.log_text();
    assert!(
        log.contains("link handshake refused"),
        "a logs the refusal: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_names_this_node_and_each_peer_with_the_prefix_it_holds() {
    let a = FabricNode::start("a", &[], SECRET);
    let b = FabricNode::start("b", &[&a], SECRET);
    let (mut client, engine, region) = engine(&a, "holders", 8).await;
    let namespace = region.namespace.digest();
    let tokens: Vec<u32> = (0..16 * 4 + 5).collect();
    let keys = chain_keys(&namespace, &tokens, 16);
    client
        .save(engine, &keys[..3], &[0, 1, 2])
        .await
        .expect("save");
    wait_remote_hits(&b, &keys[..3], 3, FAILURE_TIMEOUT).await;
    let ask = json!({"namespace": hex::encode(namespace), "block_size": 16, "tokens": tokens})
        .to_string();

    for (node, expected) in [
        (
            &b,
            json!([{"node": "b", "hits": 0}, {"node": "a", "hits": 3}]),
        ),
        (&a, json!([{"node": "a", "hits": 3}])),
    ] {
        let (status, body) = post(node.http, "/api/holders", &ask).await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(answer["holders"], expected, "asked {}", node.name);
    }
}
