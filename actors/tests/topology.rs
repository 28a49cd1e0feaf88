//! The node on a host of 2 NUMA nodes x 2 GPUs, declared in `topology` for host engines: the
//! same per-GPU transfer actors and per-node pools a GPU host gets, driven through the socket.

mod support;

use pegaflow_actors::client::{Client, ClientError};
use pegaflow_actors::keys::chain_keys;
use pegaflow_actors::node::{start, RunningNode};
use pegaflow_actors::protocol::ErrorCode;
use pegaflow_config::{HostGpu, NodeConfig, Size};
use support::ShmRegion;

/// GPU `i` of the fake host sits on NUMA node `i / 2`.
const GPUS: [&str; 4] = ["rank-0", "rank-1", "rank-2", "rank-3"];

fn two_by_two() -> (NodeConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = NodeConfig::default();
    config.socket.path = dir.path().join("node.sock");
    config.http.addr = "127.0.0.1:0".parse().expect("addr");
    config.pool.size = Size::mib(64);
    config.pool.max_page_size = Size::mib(16);
    config.topology.numa_nodes = vec![0, 1];
    config.topology.gpus = GPUS
        .iter()
        .enumerate()
        .map(|(i, uuid)| HostGpu {
            uuid: (*uuid).into(),
            numa_node: i as u32 / 2,
        })
        .collect();
    (config, dir)
}

/// Rank `rank` of a TP=4 engine: registers a source and a target region on its GPU, saves 6
/// blocks from the source and loads them into the target; returns both regions.
async fn rank_round_trip(node: &RunningNode, rank: u32) -> (ShmRegion, ShmRegion) {
    let tag = format!("tp4-rank{rank}");
    let mut source = ShmRegion::new(&format!("{tag}-src"), "vllm_lbnhc", 4, 16);
    let mut target = ShmRegion::new(&format!("{tag}-dst"), "vllm_lbnhc", 4, 16);
    for region in [&mut source, &mut target] {
        region.namespace.model = "tp4-model".into();
        region.namespace.tp_rank = rank;
        region.namespace.tp_size = 4;
    }
    target.map.fill(0);
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    let register = |region: &ShmRegion| {
        let mut req = region.register_request();
        req.region.gpu = Some(GPUS[rank as usize].into());
        req
    };
    let src = client.register(register(&source)).await.expect("register");
    let dst = client.register(register(&target)).await.expect("register");
    let namespace: [u8; 32] = src.namespace.clone().try_into().expect("32 bytes");
    let tokens: Vec<u32> = (0..16 * 6).collect();
    let keys = chain_keys(&namespace, &tokens, 16);
    let saved = client
        .save(src.engine, &keys, &[9, 3, 0, 12, 5, 7])
        .await
        .expect("save");
    assert_eq!(saved.stored, 6, "rank {rank}");
    let loaded = client
        .load(dst.engine, &keys, &[0, 1, 2, 3, 4, 5])
        .await
        .expect("load");
    assert_eq!(loaded.loaded, 6, "rank {rank}");
    (source, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_ranks_on_four_gpus_round_trip_at_once_each_on_its_own_transfer_actor() {
    let (config, _dir) = two_by_two();
    let node = std::sync::Arc::new(start(&config).await.expect("node starts"));
    let ranks = (0..4u32).map(|rank| {
        let node = node.clone();
        tokio::spawn(async move { (rank, rank_round_trip(&node, rank).await) })
    });
    let ranks: Vec<_> = futures_join(ranks.collect()).await;
    for (rank, (source, target)) in &ranks {
        for (dst, src) in [(0, 9), (1, 3), (2, 0), (3, 12), (4, 5), (5, 7)] {
            assert_eq!(
                target.block(dst),
                source.block(src),
                "rank {rank} block {dst}"
            );
        }
    }
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    let stats = client.stats().await.expect("stats").stats;
    let page = ranks[0].1 .0.block(0).len() as u64;
    for gpu in GPUS {
        let device = stats
            .transfers
            .iter()
            .find(|d| d.device == gpu)
            .unwrap_or_else(|| panic!("no transfer stats for {gpu}: {:?}", stats.transfers));
        assert_eq!(
            (device.save.bytes, device.load.bytes),
            (6 * page, 6 * page),
            "{gpu}"
        );
    }
    let host = stats.transfers.iter().find(|d| d.device == "host");
    assert_eq!(host.map(|d| d.save.bytes + d.load.bytes), Some(0));
    // Each rank's 6 blocks went to its GPU's NUMA node: ranks 0 and 1 to node 0, 2 and 3 to 1.
    let pages: Vec<_> = stats
        .pools
        .iter()
        .map(|p| (p.numa_node, p.pool.pages))
        .collect();
    assert_eq!(pages, [(0, 12), (1, 12)]);
    assert_eq!(stats.pool.pages, 24);
    let topology = stats.topology.expect("topology in stats");
    assert_eq!(topology.numa_nodes, [0, 1]);
    let placed: Vec<_> = topology
        .gpus
        .iter()
        .map(|g| (g.uuid.as_str(), g.numa_node))
        .collect();
    assert_eq!(
        placed,
        [("rank-0", 0), ("rank-1", 0), ("rank-2", 1), ("rank-3", 1)]
    );
    drop(ranks);
    if let Ok(node) = std::sync::Arc::try_unwrap(node) {
        node.shutdown().await;
    }
}

/// Waits for every task, in order.
async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn a_region_naming_an_unknown_gpu_or_a_gpu_region_naming_none_is_refused() {
    let (config, _dir) = two_by_two();
    let node = start(&config).await.expect("node starts");
    let region = ShmRegion::new("unknown-gpu", "vllm_lbnhc", 2, 4);
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    let refused = |result: Result<_, ClientError>| match result {
        Err(ClientError::Node(error)) => error,
        other => panic!("expected an error reply, got {other:?}"),
    };
    let mut req = region.register_request();
    req.region.gpu = Some("rank-9".into());
    let error = refused(client.register(req).await);
    assert_eq!(error.code, ErrorCode::BadField);
    assert!(
        error.message.contains("field `region.gpu`"),
        "{}",
        error.message
    );
    assert!(error.message.contains("rank-9"), "{}", error.message);

    let mut req = region.register_request();
    req.region.shm = None;
    req.region.cuda_ipc = Some(vec![0; 64]);
    let error = refused(client.register(req).await);
    assert!(
        error.message.contains("field `region.gpu`"),
        "{}",
        error.message
    );

    let mut req = region.register_request();
    req.region.shm = None;
    req.region.cuda_ipc = Some(vec![0; 64]);
    req.region.gpu = Some("rank-0".into());
    let error = refused(client.register(req).await);
    assert!(error.message.contains("host engines"), "{}", error.message);

    // A shared-memory region naming no GPU goes to the host engines' actor, as before.
    client
        .register(region.register_request())
        .await
        .expect("register without a GPU");
    node.shutdown().await;
}

/// Pages of each NUMA node's pool, in node order.
async fn pool_pages(client: &mut Client) -> Vec<(u32, u64)> {
    let stats = client.stats().await.expect("stats").stats;
    stats
        .pools
        .iter()
        .map(|p| (p.numa_node, p.pool.pages))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_land_near_and_a_block_only_the_far_pool_holds_is_a_hit_that_loads_exact() {
    let (config, _dir) = two_by_two();
    let node = start(&config).await.expect("node starts");
    let source = ShmRegion::new("far-src", "vllm_lbnhc", 3, 8);
    let mut target = ShmRegion::new("far-dst", "vllm_lbnhc", 3, 8);
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    // The same model on GPU rank-1 (node 0) and GPU rank-2 (node 1).
    let on = |region: &ShmRegion, gpu: &str| {
        let mut req = region.register_request();
        req.namespace.model = "shared-model".into();
        req.region.gpu = Some(gpu.into());
        req
    };
    let near = client
        .register(on(&source, "rank-1"))
        .await
        .expect("register");
    let far = client
        .register(on(&target, "rank-2"))
        .await
        .expect("register");
    assert_eq!(near.namespace, far.namespace);
    let namespace: [u8; 32] = near.namespace.clone().try_into().expect("32 bytes");
    let keys = chain_keys(&namespace, &(0..16 * 4).collect::<Vec<u32>>(), 16);
    assert_eq!(pool_pages(&mut client).await, [(0, 0), (1, 0)]);
    let saved = client
        .save(near.engine, &keys[..3], &[5, 2, 7])
        .await
        .expect("save");
    assert_eq!(saved.stored, 3);
    assert_eq!(
        pool_pages(&mut client).await,
        [(0, 3), (1, 0)],
        "saved near"
    );

    // The GPU on node 1 saves the 3 blocks again and a fourth: only the fourth is new, in its
    // own pool; the 3 stay once, in node 0's.
    let again = client
        .save(far.engine, &keys, &[0, 1, 2, 3])
        .await
        .expect("save");
    assert_eq!((again.stored, again.present), (1, 3));
    assert_eq!(
        pool_pages(&mut client).await,
        [(0, 3), (1, 1)],
        "stored once"
    );

    // Blocks 0-2 are only in the far pool for node 1's GPU, block 3 in its own: all 4 hit and
    // load exact, across both pools.
    assert_eq!(client.lookup(&keys, false).await.expect("lookup").hits, 4);
    let lookup = client.lookup(&keys, true).await.expect("lookup");
    let lease = lookup.lease.expect("leased");
    assert_eq!(client.release(lease).await.expect("release").released, 4);
    let saved_from_far = target.block(3);
    target.map.fill(0);
    let loaded = client
        .load(far.engine, &keys, &[4, 5, 6, 7])
        .await
        .expect("load");
    assert_eq!(loaded.loaded, 4);
    for (dst, src) in [(4, 5), (5, 2), (6, 7)] {
        assert_eq!(target.block(dst), source.block(src), "block {dst}");
    }
    assert_eq!(target.block(7), saved_from_far, "block 7");
    node.shutdown().await;
}

/// How often the node restarted `device`'s transfer actor, from `/metrics`.
async fn restarts(node: &RunningNode, device: &str) -> u64 {
    let (_, text) = support::get(node.http_addr(), "/metrics").await;
    let series = format!("pegaflow_actor_restarts_total{{actor=\"transfer:{device}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |count| count.trim().parse().expect("a count"))
}

/// Waits until `device`'s actor has been restarted `times` times and runs again.
async fn restarted(node: &RunningNode, device: &str, times: u64) {
    let transfers = &node.context().transfers;
    let handle = transfers
        .all()
        .find(|h| h.device == device)
        .expect("device");
    while restarts(node, device).await < times || handle.actor().is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_transfer_actor_fails_only_its_job_and_comes_back_with_its_regions() {
    let (config, _dir) = two_by_two();
    let node = start(&config).await.expect("node starts");
    let mut regions = Vec::new();
    let mut engines = Vec::new();
    for (rank, gpu) in [(1u32, "rank-1"), (2, "rank-2")] {
        let mut region = ShmRegion::new(&format!("fault-{gpu}"), "vllm_lbnhc", 2, 8);
        region.namespace.tp_rank = rank;
        region.namespace.tp_size = 4;
        let mut client = Client::connect(node.socket_path()).await.expect("connect");
        let mut req = region.register_request();
        req.region.gpu = Some(gpu.into());
        let engine = client.register(req).await.expect("register");
        let namespace: [u8; 32] = engine.namespace.clone().try_into().expect("32 bytes");
        let keys = chain_keys(&namespace, &(0..16 * 4).collect::<Vec<u32>>(), 16);
        regions.push(region);
        engines.push((client, engine.engine, keys));
    }
    assert_eq!(
        support::get(node.http_addr(), "/healthz").await,
        (200, "ok\n".into())
    );

    let transfers = &node.context().transfers;
    assert!(transfers.fail_next_copy("rank-1"));
    let [(one, one_engine, one_keys), (two, two_engine, two_keys)] = &mut engines[..] else {
        unreachable!("two engines")
    };
    match one.save(*one_engine, &one_keys[..2], &[0, 1]).await {
        Err(ClientError::Node(error)) => {
            assert_eq!(error.code, ErrorCode::Internal, "{}", error.message);
            assert!(error.message.contains("transfer"), "{}", error.message);
        }
        other => panic!("the save on the failed actor must fail, got {other:?}"),
    }
    // The other GPU's work goes on.
    let saved = two
        .save(*two_engine, two_keys, &[0, 1, 2, 3])
        .await
        .expect("save");
    assert_eq!(saved.stored, 4);
    restarted(&node, "rank-1", 1).await;
    // The restarted actor still has the engine's region: the same engine saves and loads.
    let saved = one
        .save(*one_engine, &one_keys[..2], &[0, 1])
        .await
        .expect("save");
    assert_eq!(saved.stored, 2);
    let expected = regions[0].block(1);
    regions[0].map.fill(0);
    let loaded = one
        .load(*one_engine, &one_keys[..2], &[6, 7])
        .await
        .expect("load");
    assert_eq!(loaded.loaded, 2);
    assert_eq!(regions[0].block(7), expected);
    assert_eq!(support::get(node.http_addr(), "/healthz").await.0, 200);

    // Restarting too often makes /healthz unhealthy, naming the actor.
    for times in 2..=3 {
        assert!(transfers.fail_next_copy("rank-1"));
        assert!(one
            .save(*one_engine, &one_keys[2..], &[2, 3])
            .await
            .is_err());
        restarted(&node, "rank-1", times).await;
    }
    let (status, body) = support::get(node.http_addr(), "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("transfer actor rank-1 restarted 3 times"),
        "{body}"
    );
    assert!(!body.contains("rank-2"), "{body}");
    node.shutdown().await;
}

#[test]
fn print_topology_shows_the_declared_gpus_on_their_nodes() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pegaflow-node"))
        .arg("--print-topology")
        .env("PEGAFLOW_TOPOLOGY__NUMA_NODES", "[0, 1]")
        .env(
            "PEGAFLOW_TOPOLOGY__GPUS",
            r#"[{ uuid = "rank-0", numa_node = 0 }, { uuid = "rank-1", numa_node = 1 }]"#,
        )
        .output()
        .expect("run pegaflow-node");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    assert!(text.starts_with("numa nodes: 0, 1\n"), "{text}");
    assert!(
        text.contains("gpu rank-0: numa node 0, host engines (topology.gpus)\n")
            && text.contains("gpu rank-1: numa node 1, host engines (topology.gpus)\n"),
        "{text}"
    );
}
