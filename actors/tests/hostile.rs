//! What a hostile or buggy local client can do to the node, through the real socket: each test
//! does it, then proves the node still serves another session byte-exact.

mod support;

use std::fs::OpenOptions;
use std::path::PathBuf;

use pegaflow_actors::client::{Client, ClientError};
use pegaflow_actors::keys::chain_keys;
use pegaflow_actors::node::RunningNode;
use pegaflow_actors::protocol::{
    decode_reply, read_frame, BlocksRequest, ErrorCode, HelloReply, Request, SaveReply,
};
use support::{node, node_with, ShmRegion};

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

fn limit_exceeded_naming(result: Result<impl std::fmt::Debug, ClientError>, key: &str) {
    match result {
        Err(ClientError::Node(e)) => {
            assert_eq!(e.code, ErrorCode::LimitExceeded, "{}", e.message);
            assert!(e.message.contains(&format!("`{key}`")), "{}", e.message);
        }
        other => panic!("expected limit_exceeded naming {key}, got {other:?}"),
    }
}

/// Waits until the node has closed the engines of ended connections (a close is processed after
/// the connection ends) and `engines` remain.
async fn wait_for_engines(node: &RunningNode, engines: u64) {
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    while client.stats().await.expect("stats").stats.engines != engines {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Registering the same region over and over (which once exhausted `vm.max_map_count` and left
/// the node a zombie) stops at the per-connection limit; the node-wide limit stops several
/// hogs together; a bystander still registers, saves and loads exact; and what a hog held comes
/// back when it disconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_hogs_hit_their_limits_and_a_bystander_is_served() {
    let (node, _dir) = node_with(64, |config| {
        config.limits.max_regions_per_session = 4;
        config.limits.max_regions = 6;
    })
    .await;
    let hogged = ShmRegion::new("hogged", "vllm_lbnhc", 2, 8);
    let mut hog = Client::connect(node.socket_path()).await.expect("connect");
    for _ in 0..4 {
        hog.register(hogged.register_request())
            .await
            .expect("within the limit");
    }
    limit_exceeded_naming(
        hog.register(hogged.register_request()).await,
        "limits.max_regions_per_session",
    );

    bystander_round_trips(&node, "beside-hog").await;
    wait_for_engines(&node, 4).await;
    // The hog's 4, a bystander's 5th; a second hog takes the 6th and is refused the 7th.
    let mut second = Client::connect(node.socket_path()).await.expect("connect");
    let mut bystander = Client::connect(node.socket_path()).await.expect("connect");
    let kept = ShmRegion::new("kept", "vllm_lbnhc", 2, 8);
    bystander
        .register(kept.register_request())
        .await
        .expect("5th engine");
    second
        .register(hogged.register_request())
        .await
        .expect("6th engine");
    limit_exceeded_naming(
        second.register(hogged.register_request()).await,
        "limits.max_regions",
    );
    limit_exceeded_naming(
        bystander.register(kept.register_request()).await,
        "limits.max_regions",
    );

    drop((hog, second));
    wait_for_engines(&node, 1).await;
    bystander_round_trips(&node, "after-hogs").await;
    node.shutdown().await;
}

/// A connection's declared region bytes are summed against its own limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_bytes_per_connection_are_limited() {
    let region = ShmRegion::new("bytes", "vllm_lbnhc", 2, 8);
    let bytes = region.map.len() as u64;
    let (node, _dir) = node_with(64, |config| {
        config.limits.max_region_bytes_per_session = pegaflow_config::Size(2 * bytes);
    })
    .await;
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    for _ in 0..2 {
        client
            .register(region.register_request())
            .await
            .expect("within the bytes");
    }
    limit_exceeded_naming(
        client.register(region.register_request()).await,
        "limits.max_region_bytes_per_session",
    );
    bystander_round_trips(&node, "beside-bytes").await;
    node.shutdown().await;
}

/// A connection past `limits.max_sessions` is told why, with a nil id, and closed; the
/// connections already open are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused_with_a_reply() {
    let (node, _dir) = node_with(64, |config| config.limits.max_sessions = 2).await;
    let mut first = Client::connect(node.socket_path()).await.expect("connect");
    let _second = Client::connect(node.socket_path()).await.expect("connect");
    let mut third = tokio::net::UnixStream::connect(node.socket_path())
        .await
        .expect("the socket accepts");
    let payload = read_frame(&mut third, 1 << 20)
        .await
        .expect("a reply")
        .expect("one frame before the close");
    let (id, reply) = decode_reply::<HelloReply>(&payload).expect("a reply frame");
    assert_eq!(id, None);
    let error = reply.expect_err("refused");
    assert_eq!(error.code, ErrorCode::LimitExceeded);
    assert!(
        error.message.contains("`limits.max_sessions`"),
        "{}",
        error.message
    );
    assert!(read_frame(&mut third, 1 << 20)
        .await
        .expect("clean end")
        .is_none());
    assert!(
        first.stats().await.is_ok(),
        "an admitted connection is served"
    );
    node.shutdown().await;
}

/// docs/ssd.md: a `persist` save counts keys another save is still writing as `present` without
/// waiting for them, so a client that needs them durable asks again once that save was
/// answered; then every key is reported durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persist_save_after_a_plain_save_was_answered_persists_every_key() {
    let ssd = tempfile::tempdir().expect("ssd dir");
    let (node, _dir) = node_with(64, |config| {
        config.ssd.dir = Some(ssd.path().to_path_buf());
        config.ssd.size = pegaflow_config::Size::mib(64);
    })
    .await;
    let region = ShmRegion::new("persist", "vllm_lbnhc", 2, 8);
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    let engine = client
        .register(region.register_request())
        .await
        .expect("register");
    let keys = keys_for(&engine.namespace, 3, 4);
    let plain = client
        .save(engine.engine, &keys, &[0, 1, 2, 3])
        .await
        .expect("plain save");
    assert_eq!(plain.stored, 4);
    let persist = BlocksRequest {
        engine: engine.engine,
        keys: keys.concat(),
        block_ids: vec![0, 1, 2, 3],
        persist: true,
        after_events: Vec::new(),
        answer_when_queued: false,
    };
    let again: SaveReply = client
        .call(Request::Save(persist))
        .await
        .expect("persist save");
    assert_eq!((again.present, again.persisted), (4, Some(4)));
    node.shutdown().await;
}
