//! What a hostile or buggy local client can do to the node, through the real socket: each test
//! does it, then proves the node still serves another session byte-exact.

mod support;

use std::fs::OpenOptions;
use std::path::PathBuf;

use pegaflow_actors::client::{Client, ClientError};
use pegaflow_actors::keys::chain_keys;
use pegaflow_actors::node::RunningNode;
use pegaflow_actors::protocol::ErrorCode;
use support::{node, ShmRegion};

/// Keys of `blocks` blocks of a prompt unique to `tag`, chained from `namespace`.
fn keys_for(namespace: &[u8], tag: u32, blocks: u32) -> Vec<[u8; 32]> {
    let namespace: [u8; 32] = namespace.try_into().expect("32-byte namespace");
    let tokens: Vec<u32> = (0..16 * blocks).map(|t| t + tag * 1_000_000).collect();
    chain_keys(&namespace, &tokens, 16)
}

/// A fresh session registers its own region, saves blocks 0..3 and loads them into blocks 4..7:
/// every byte must match. Proves the node still serves after whatever a test did before.
async fn bystander_round_trips(node: &RunningNode, tag: &str) {
    let mut region = ShmRegion::new(tag, "vllm_lbnhc", 2, 8);
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    let engine = client
        .register(region.register_request())
        .await
        .expect("bystander registers");
    let keys = keys_for(&engine.namespace, 7, 3);
    let saved = client
        .save(engine.engine, &keys, &[0, 1, 2])
        .await
        .expect("bystander saves");
    assert_eq!(saved.stored + saved.present, 3);
    for block in 4..7 {
        for at in region.block_ranges(block).collect::<Vec<_>>() {
            region.map[at].fill(0);
        }
    }
    let loaded = client
        .load(engine.engine, &keys, &[4, 5, 6])
        .await
        .expect("bystander loads");
    assert_eq!(loaded.loaded, 3);
    for (to, from) in [(4, 0), (5, 1), (6, 2)] {
        assert_eq!(region.block(to), region.block(from), "block {to}");
    }
}

fn region_unavailable_naming(result: Result<impl std::fmt::Debug, ClientError>, name: &str) {
    match result {
        Err(ClientError::Node(e)) => {
            assert_eq!(e.code, ErrorCode::RegionUnavailable, "{}", e.message);
            assert!(e.message.contains(name), "{}", e.message);
            assert!(e.message.contains("shrunk"), "{}", e.message);
        }
        other => panic!("expected region_unavailable, got {other:?}"),
    }
}

/// Shrinking a registered region used to kill the node with SIGBUS on the next copy (and this
/// test process with it, the node running in-process). Now the save and the load fail with an
/// error naming the region, nothing stays leased or half-written, and other sessions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_shrunk_under_the_node_fails_its_copies_and_the_node_serves_on() {
    let (node, _dir) = node(64).await;
    let region = ShmRegion::new("shrunk", "vllm_lbnhc", 2, 8);
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    let engine = client
        .register(region.register_request())
        .await
        .expect("register");
    let held = keys_for(&engine.namespace, 1, 2);
    client
        .save(engine.engine, &held, &[0, 1])
        .await
        .expect("save before the shrink");

    OpenOptions::new()
        .write(true)
        .open(PathBuf::from("/dev/shm").join(&region.name))
        .expect("open the region's file")
        .set_len(0)
        .expect("shrink it");
    // The test's own mapping of the file is now unusable: `region.map` is not touched again.

    let fresh = keys_for(&engine.namespace, 2, 2);
    region_unavailable_naming(
        client.save(engine.engine, &fresh, &[2, 3]).await,
        &region.name,
    );
    region_unavailable_naming(
        client.load(engine.engine, &held, &[4, 5]).await,
        &region.name,
    );

    // The same connection still answers, the failed save published nothing, and every page
    // the failed copies held is back.
    assert_eq!(client.lookup(&fresh, false).await.expect("lookup").hits, 0);
    assert_eq!(client.lookup(&held, false).await.expect("lookup").hits, 2);
    let pool = client.stats().await.expect("stats").stats.pool;
    assert_eq!((pool.leased_pages, pool.writing_pages), (0, 0), "{pool:?}");

    bystander_round_trips(&node, "after-shrink").await;
    node.shutdown().await;
}
