//! The node through its public interface: the real socket, the real binary.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

use pegaflow_actors::client::{Client, ClientError};
use pegaflow_actors::keys::chain_keys;
use pegaflow_actors::node::{start, StartError};
use pegaflow_actors::protocol::bin::Bin;
use pegaflow_actors::protocol::{BlocksRequest, ErrorCode, RegionSpec, Request, SaveReply};
use pegaflow_actors::socket_file::SocketFileError;
use support::{node, ShmRegion};

fn raw_call(stream: &mut UnixStream, payload: &[u8]) -> rmpv::Value {
    stream
        .write_all(&(payload.len() as u32).to_le_bytes())
        .expect("write prefix");
    stream.write_all(payload).expect("write payload");
    read_reply(stream)
}

fn read_reply(stream: &mut UnixStream) -> rmpv::Value {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).expect("reply prefix");
    let mut reply = vec![0u8; u32::from_le_bytes(prefix) as usize];
    stream.read_exact(&mut reply).expect("reply payload");
    rmpv::decode::read_value(&mut reply.as_slice()).expect("reply is msgpack")
}

fn field<'a>(reply: &'a rmpv::Value, name: &str) -> &'a rmpv::Value {
    reply
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("reply has no `{name}`: {reply}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_layouts_round_trip_byte_exact_between_regions() {
    let (node, _dir) = node(64).await;
    for layout in ["vllm_lbnhc", "kv_split"] {
        let source = ShmRegion::new(&format!("src-{layout}"), layout, 3, 8);
        let mut target = ShmRegion::new(&format!("dst-{layout}"), layout, 3, 8);
        target.map.fill(0);
        let mut client = Client::connect(node.socket_path()).await.expect("connect");
        let src = client
            .register(source.register_request())
            .await
            .expect("register");
        let dst = client
            .register(target.register_request())
            .await
            .expect("register");
        assert_eq!(src.namespace, source.namespace.digest().to_vec());
        let tokens: Vec<u32> = (0..16 * 5).collect();
        let ns: [u8; 32] = src.namespace.clone().try_into().expect("32 bytes");
        let keys = chain_keys(&ns, &tokens, 16);
        let saved = client
            .save(src.engine, &keys, &[7, 1, 4, 0, 2])
            .await
            .expect("save");
        assert_eq!((saved.stored, saved.present, saved.dropped), (5, 0, 0));
        assert_eq!(client.lookup(&keys, false).await.expect("lookup").hits, 5);
        let loaded = client
            .load(dst.engine, &keys, &[0, 1, 2, 3, 4])
            .await
            .expect("load");
        assert_eq!(loaded.loaded, 5);
        for (dst_block, src_block) in [(0, 7), (1, 1), (2, 4), (3, 0), (4, 2)] {
            assert_eq!(
                target.block(dst_block),
                source.block(src_block),
                "{layout} block {dst_block}"
            );
        }
        assert!(
            target.block(5).iter().all(|&b| b == 0),
            "untouched blocks stay untouched"
        );
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_errors_name_the_field_and_keep_the_connection() {
    let (node, _dir) = node(16).await;
    let region = ShmRegion::new("errors", "vllm_lbnhc", 2, 4);
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    let mut mismatched = region.register_request();
    mismatched.namespace.num_layers = 3;
    match client.register(mismatched).await {
        Err(ClientError::Node(e)) => {
            assert_eq!(e.code, ErrorCode::LayoutMismatch);
            assert!(e.message.contains("num_layers 3"), "{}", e.message);
        }
        other => panic!("expected layout_mismatch, got {other:?}"),
    }
    let mut missing = region.register_request();
    missing.region.shm = Some("pegaflow-test-no-such-region".into());
    match client.register(missing).await {
        Err(ClientError::Node(e)) => assert_eq!(e.code, ErrorCode::RegionUnavailable),
        other => panic!("expected region_unavailable, got {other:?}"),
    }
    let mut both = region.register_request();
    both.region.cuda_ipc = Some(vec![0; 64]);
    let mut short_handle = region.register_request();
    short_handle.region = RegionSpec {
        cuda_ipc: Some(vec![0; 66]),
        bytes: both.region.bytes,
        ..RegionSpec::default()
    };
    for (bad, field) in [
        (both, "`region`"),
        (short_handle, "`region.cuda_ipc`: 66 bytes"),
    ] {
        match client.register(bad).await {
            Err(ClientError::Node(e)) => {
                assert_eq!(e.code, ErrorCode::BadField);
                assert!(e.message.contains(field), "{}", e.message);
            }
            other => panic!("expected bad_field, got {other:?}"),
        }
    }
    // A GPU region on a host serving no GPU: it must name its GPU, and no GPU named is served.
    for (gpu, why) in [
        (None, "must name the UUID of the GPU"),
        (
            Some("GPU-00112233-4455-6677-8899-aabbccddeeff"),
            "(GPUs: none)",
        ),
    ] {
        let mut gpu_on_host = region.register_request();
        gpu_on_host.region = RegionSpec {
            cuda_ipc: Some(vec![0; 64]),
            gpu: gpu.map(str::to_owned),
            bytes: gpu_on_host.region.bytes,
            ..RegionSpec::default()
        };
        match client.register(gpu_on_host).await {
            Err(ClientError::Node(e)) => {
                assert_eq!(e.code, ErrorCode::BadField, "{}", e.message);
                assert!(e.message.contains("field `region.gpu`"), "{}", e.message);
                assert!(e.message.contains(why), "{}", e.message);
            }
            other => panic!("expected bad_field naming region.gpu, got {other:?}"),
        }
    }
    let engine = client
        .register(region.register_request())
        .await
        .expect("register")
        .engine;
    match client.save(engine, &[[1; 32]], &[4]).await {
        Err(ClientError::Node(e)) => {
            assert_eq!(e.code, ErrorCode::OutOfRange);
            assert!(e.message.contains("block_ids[0]"), "{}", e.message);
        }
        other => panic!("expected out_of_range, got {other:?}"),
    }
    match client.load(engine + 5, &[[1; 32]], &[0]).await {
        Err(ClientError::Node(e)) => assert_eq!(e.code, ErrorCode::NotRegistered),
        other => panic!("expected not_registered, got {other:?}"),
    }
    match client.release(999).await {
        Err(ClientError::Node(e)) => assert_eq!(e.code, ErrorCode::UnknownLease),
        other => panic!("expected unknown_lease, got {other:?}"),
    }
    let mut events_on_shm = region.register_request();
    events_on_shm.engine_events = vec![Bin(vec![0; 64])];
    match client.register(events_on_shm).await {
        Err(ClientError::Node(e)) => {
            assert_eq!(e.code, ErrorCode::BadField);
            assert!(e.message.contains("`engine_events`"), "{}", e.message);
        }
        other => panic!("expected bad_field for events on a shared-memory region, got {other:?}"),
    }
    // The region has 2 layers and no engine events.
    let save = |after_events, persist, answer_when_queued| {
        Request::Save(BlocksRequest {
            engine,
            keys: vec![1; 32],
            block_ids: vec![3],
            persist,
            after_events,
            answer_when_queued,
        })
    };
    for (request, code, field) in [
        (
            save(vec![0], false, false),
            ErrorCode::BadField,
            "1 slots for 2 layers",
        ),
        (
            save(vec![0, 0], false, false),
            ErrorCode::OutOfRange,
            "`after_events[0]`",
        ),
        (
            save(vec![], true, true),
            ErrorCode::BadField,
            "`answer_when_queued`",
        ),
    ] {
        match client.call::<SaveReply>(request).await {
            Err(ClientError::Node(e)) => {
                assert_eq!(e.code, code);
                assert!(e.message.contains(field), "{}", e.message);
            }
            other => panic!("expected {code:?} naming {field}, got {other:?}"),
        }
    }
    // Without layer events a save asked to answer when queued answers once it is done.
    let done = client
        .call::<SaveReply>(save(vec![], false, true))
        .await
        .expect("still serving");
    assert_eq!((done.stored, done.event_slots.len()), (1, 0));
    let held = client.lookup(&[[1; 32]], false).await.expect("lookup");
    assert_eq!(held.hits, 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_only_its_connection() {
    let (node, _dir) = node(16).await;
    let path = node.socket_path().to_path_buf();
    let mut bystander = Client::connect(&path).await.expect("connect");
    let reply = tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&path).expect("connect");
        stream.write_all(&u32::MAX.to_le_bytes()).expect("prefix");
        let reply = read_reply(&mut stream);
        let mut rest = Vec::new();
        let closed = stream
            .read_to_end(&mut rest)
            .map(|n| n == 0)
            .unwrap_or(true);
        (reply, closed)
    })
    .await
    .expect("join");
    assert_eq!(field(&reply.0, "code").as_str(), Some("frame_too_large"));
    assert!(reply.1, "the connection is closed after frame_too_large");
    assert_eq!(
        bystander
            .lookup(&[[2; 32]], false)
            .await
            .expect("bystander works")
            .hits,
        0
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_frames_get_error_replies_on_a_live_connection() {
    let (node, _dir) = node(16).await;
    let path = node.socket_path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&path).expect("connect");
        let mut stats = Vec::new();
        let value = rmpv::Value::Map(vec![
            ("v".into(), 1.into()),
            ("id".into(), 3.into()),
            ("op".into(), "stats".into()),
        ]);
        rmpv::encode::write_value(&mut stats, &value).expect("encode");
        let truncated = raw_call(&mut stream, &stats[..stats.len() - 3]);
        assert_eq!(field(&truncated, "code").as_str(), Some("bad_frame"));
        assert!(field(&truncated, "id").is_nil());
        let garbage = raw_call(&mut stream, b"\xc1\xc1");
        assert_eq!(field(&garbage, "code").as_str(), Some("bad_frame"));
        let ok = raw_call(&mut stream, &stats);
        assert_eq!(field(&ok, "ok").as_bool(), Some(true));
        assert_eq!(field(&ok, "id").as_u64(), Some(3));
    })
    .await
    .expect("raw client");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_is_never_taken_over_but_a_stale_one_is() {
    let (node, dir) = node(16).await;
    let mut config = pegaflow_config::NodeConfig::default();
    config.socket.path = node.socket_path().to_path_buf();
    config.http.addr = "127.0.0.1:0".parse().expect("addr");
    config.pool.size = pegaflow_config::Size::mib(16);
    config.pool.max_page_size = pegaflow_config::Size::mib(16);
    match start(&config).await {
        Err(StartError::Socket(SocketFileError::InUse(path))) => {
            assert_eq!(path, config.socket.path)
        }
        Err(other) => panic!("expected SocketInUse, got {other}"),
        Ok(_) => panic!("a second node took over a live socket"),
    }
    node.shutdown().await;
    let stale = std::os::unix::net::UnixListener::bind(&config.socket.path).expect("stale socket");
    drop(stale);
    let second = start(&config).await.expect("stale socket file is replaced");
    Client::connect(&config.socket.path)
        .await
        .expect("second node serves");
    second.shutdown().await;
    drop(dir);
}

#[test]
fn bad_config_values_exit_2_with_one_line_naming_the_key() {
    let output = Command::new(env!("CARGO_BIN_EXE_pegaflow-node"))
        .args(["--pool-size", "12XB"])
        .env_remove("PEGAFLOW_CONFIG")
        .output()
        .expect("run pegaflow-node");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("pool.size") && stderr.contains("12XB"),
        "{stderr}"
    );
}

#[test]
fn print_config_shows_each_value_and_its_source() {
    let output = Command::new(env!("CARGO_BIN_EXE_pegaflow-node"))
        .args(["--print-config", "--pool-size", "2GiB"])
        .env("PEGAFLOW_HTTP__ADDR", "127.0.0.1:9999")
        .env_remove("PEGAFLOW_CONFIG")
        .output()
        .expect("run pegaflow-node");
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{key} =")))
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
            .to_string()
    };
    assert!(line("pool.size").contains("2GiB") && line("pool.size").contains("flag --pool-size"));
    assert!(line("http.addr").contains("env PEGAFLOW_HTTP__ADDR"));
    assert!(line("socket.path").contains("default"));
}
