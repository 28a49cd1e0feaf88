//! Fakes for the router's behaviour tests: engines that answer by script over raw TCP (so they
//! can die mid-request or mid-stream exactly as a killed process does), a node whose blocks are
//! saved only after some lookups and whose holders are scripted, the router itself in-process,
//! and a client.

// Each test binary uses a subset of these helpers.
#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pegaflow_router::config::Args;
use pegaflow_router::http::app;
use pegaflow_router::pd::PdRouter;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Fails a test that does not finish: nothing the router does may hang.
pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .expect("the test hung")
}

/// What a fake engine does with one request.
pub enum Reply {
    /// Answers this status and JSON body.
    Json(u16, Value),
    /// Streams these server-sent events, one chunk each, then ends cleanly.
    Events(Vec<String>),
    /// Streams these chunks, then the process "dies": the connection closes mid-body.
    EventsThenDie(Vec<String>),
    /// Streams `first`, waits for `gate`, then streams `rest` and ends cleanly.
    Gated {
        first: Vec<String>,
        gate: Arc<Notify>,
        rest: Vec<String>,
    },
    /// Reads the request, then closes the connection without a word (killed mid-request).
    Die,
    /// Reads the request and never answers (a stopped process).
    Hang,
}

/// A request a fake engine received.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub body: Value,
}

type Script = dyn Fn(&Received) -> Reply + Send + Sync;

/// An engine on a loopback port, answering by script; it records what it received.
pub struct FakeEngine {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeEngine {
    pub async fn start(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_one(stream, script.clone(), log.clone()));
            }
        });
        Self { url, received }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("log").clone()
    }
}

/// A URL where nothing listens: connections are refused.
pub async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    format!("http://{}", listener.local_addr().expect("addr"))
}

async fn serve_one(mut stream: TcpStream, script: Arc<Script>, log: Arc<Mutex<Vec<Received>>>) {
    let Some(received) = read_request(&mut stream).await else {
        return;
    };
    log.lock().expect("log").push(received.clone());
    match script(&received) {
        Reply::Json(status, body) => {
            let body = body.to_string();
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
        }
        Reply::Events(events) => {
            write_events(&mut stream, &events).await;
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
        Reply::EventsThenDie(events) => write_events(&mut stream, &events).await,
        Reply::Gated { first, gate, rest } => {
            write_events(&mut stream, &first).await;
            gate.notified().await;
            for event in &rest {
                let _ = stream.write_all(chunk(event).as_bytes()).await;
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
        Reply::Die => {}
        Reply::Hang => std::future::pending::<()>().await,
    }
}

async fn write_events(stream: &mut TcpStream, events: &[String]) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let _ = stream.write_all(head.as_bytes()).await;
    for event in events {
        let _ = stream.write_all(chunk(event).as_bytes()).await;
        let _ = stream.flush().await;
    }
}

fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

async fn read_request(stream: &mut TcpStream) -> Option<Received> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        bytes.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_string();
    let path = head.split(' ').nth(1)?.to_string();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while bytes.len() < head_end + length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    let body = serde_json::from_slice(&bytes[head_end..head_end + length]).ok()?;
    Some(Received { path, body })
}

/// Keys as the connector reports them (hex), distinct per tag.
pub fn keys(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag}{i:02}").repeat(8)).collect()
}

/// A fake pegaflow-node: `POST /api/lookup` over keys "saved" by [`FakeNode::save`], which
/// become held only after `lookups_until_saved` further lookups, as a save still in flight.
#[derive(Clone)]
pub struct FakeNode {
    pub url: String,
    state: Arc<NodeState>,
}

struct NodeState {
    held: Mutex<HashSet<String>>,
    saving: Mutex<Vec<String>>,
    lookups: AtomicUsize,
    lookups_until_saved: usize,
    holders: Mutex<NodeReply>,
    holders_asked: Mutex<Vec<Value>>,
}

/// What the fake node answers to `POST /api/holders`.
#[derive(Clone)]
pub enum NodeReply {
    /// This status and JSON body.
    Json(u16, Value),
    /// Never an answer (a node that hangs).
    Hang,
}

impl FakeNode {
    pub async fn start(lookups_until_saved: usize) -> Self {
        let state = Arc::new(NodeState {
            held: Mutex::new(HashSet::new()),
            saving: Mutex::new(Vec::new()),
            lookups: AtomicUsize::new(0),
            lookups_until_saved,
            holders: Mutex::new(NodeReply::Json(200, json!({"holders": []}))),
            holders_asked: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/api/lookup", post(node_lookup))
            .route("/api/holders", post(node_holders))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    /// A prefill engine's save of `keys` begins.
    pub fn save(&self, keys: &[String]) {
        self.state
            .saving
            .lock()
            .expect("saving")
            .extend_from_slice(keys);
    }

    /// Whether every key is held now.
    pub fn holds(&self, keys: &[String]) -> bool {
        let held = self.state.held.lock().expect("held");
        keys.iter().all(|key| held.contains(key))
    }

    pub fn lookups(&self) -> usize {
        self.state.lookups.load(Ordering::SeqCst)
    }

    /// What `/api/holders` answers from now on.
    pub fn answer_holders(&self, reply: NodeReply) {
        *self.state.holders.lock().expect("holders") = reply;
    }

    /// The bodies `/api/holders` received, in order.
    pub fn holders_asked(&self) -> Vec<Value> {
        self.state.holders_asked.lock().expect("asked").clone()
    }
}

async fn node_holders(
    State(state): State<Arc<NodeState>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    state.holders_asked.lock().expect("asked").push(body);
    let reply = state.holders.lock().expect("holders").clone();
    match reply {
        NodeReply::Json(status, body) => {
            (StatusCode::from_u16(status).expect("a status"), Json(body))
        }
        NodeReply::Hang => std::future::pending().await,
    }
}

async fn node_lookup(State(state): State<Arc<NodeState>>, Json(body): Json<Value>) -> Json<Value> {
    let lookups = state.lookups.fetch_add(1, Ordering::SeqCst) + 1;
    let mut held = state.held.lock().expect("held");
    if lookups >= state.lookups_until_saved {
        held.extend(state.saving.lock().expect("saving").drain(..));
    }
    let hits = body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .take_while(|key| key.as_str().is_some_and(|key| held.contains(key)))
        .count();
    Json(json!({ "hits": hits }))
}

/// A prefill engine with PegaKVConnector: "saves" `keys` to `node` and reports them.
pub async fn prefill_engine(node: &FakeNode, keys: Vec<String>) -> FakeEngine {
    let node = node.clone();
    FakeEngine::start(move |_| {
        node.save(&keys);
        Reply::Json(200, prefill_answer(&keys))
    })
    .await
}

/// A prefill answer naming `keys` under one rank of block size [`BLOCK_SIZE`].
pub fn prefill_answer(keys: &[String]) -> Value {
    json!({"choices": [{"text": "x"}], "kv_transfer_params": {"pegaflow_handoff": {
        "ranks": [{"namespace": NAMESPACE, "block_size": BLOCK_SIZE, "keys": keys}]}}})
}

/// The namespace digest fake prefill engines report.
pub const NAMESPACE: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The block size fake prefill engines report.
pub const BLOCK_SIZE: u32 = 16;

/// A decode engine that answers whether `node` held `keys` when its request arrived.
pub async fn decode_engine(node: &FakeNode, keys: Vec<String>, text: &str) -> FakeEngine {
    let node = node.clone();
    let text = text.to_string();
    FakeEngine::start(move |_| {
        Reply::Json(
            200,
            json!({"choices": [{"text": text}], "held_at_arrival": node.holds(&keys)}),
        )
    })
    .await
}

/// The router in-process on a loopback port, with `flags` after the backends.
pub async fn router(prefill: &[&str], decode: &[&str], node: &str, flags: &[&str]) -> String {
    let mut argv = vec!["pegaflow-router".to_string()];
    for url in prefill {
        argv.extend(["--prefill".to_string(), url.to_string()]);
    }
    for url in decode {
        argv.extend(["--decode".to_string(), url.to_string()]);
    }
    argv.extend(["--node-http".to_string(), node.to_string()]);
    argv.extend(flags.iter().map(ToString::to_string));
    let args = <Args as clap::Parser>::try_parse_from(argv).expect("valid flags");
    let router = Arc::new(PdRouter::new(&args).expect("router"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app(router)).await });
    url
}

/// An answer as the client saw it.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON answer")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }
}

/// Sends `body` to `url` + `path` and reads the whole answer (a stream to its end).
pub async fn send(url: &str, path: &str, body: Value) -> Answer {
    let response = request(url, path, Method::POST, body.to_string()).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the whole body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends `body` and returns once the answer's head arrived; the body is read by the caller.
pub async fn request(
    url: &str,
    path: &str,
    method: Method,
    body: String,
) -> axum::http::Response<hyper::body::Incoming> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    client.request(request).await.expect("the router answers")
}

/// The router's `/metrics` page.
pub async fn metrics(url: &str) -> String {
    let response = request(url, "/metrics", Method::GET, String::new()).await;
    let body = response.into_body().collect().await.expect("metrics");
    String::from_utf8_lossy(&body.to_bytes()).to_string()
}

/// The value of one series on the metrics page, e.g. `pegaflow_router_retries_total{role="decode"}`.
pub fn value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{page}"))
}

/// A fake pegaflow-node KV event publisher (docs/events.md): a PUB socket sending vLLM's
/// `KVEventBatch` messages, batch 0 `AllBlocksCleared`, then the batches [`publish`] gives and
/// an empty batch every 20 ms (so a late subscriber soon sees a gap), and a ROUTER socket
/// answering replays.
///
/// [`publish`]: FakePublisher::publish
pub struct FakePublisher {
    /// `PUB+REPLAY`, as `--node-events NODE=` takes it.
    pub endpoints: String,
    batches: tokio::sync::mpsc::UnboundedSender<Vec<rmpv::Value>>,
}

impl FakePublisher {
    pub async fn start() -> Self {
        use zeromq::{Socket, SocketRecv, SocketSend};
        let mut publish = zeromq::PubSocket::new();
        let publish_at = publish.bind("tcp://127.0.0.1:0").await.expect("bind PUB");
        let mut replay = zeromq::RouterSocket::new();
        let replay_at = replay.bind("tcp://127.0.0.1:0").await.expect("bind ROUTER");
        let (batches, mut events) = tokio::sync::mpsc::unbounded_channel::<Vec<rmpv::Value>>();
        tokio::spawn(async move {
            let mut sent: Vec<Bytes> = Vec::new();
            let mut next = Some(vec![event("AllBlocksCleared", "", &[])]);
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                if let Some(events) = next.take() {
                    let seq = (sent.len() as u64).to_be_bytes();
                    let payload = batch(events);
                    let frames = vec![Bytes::new(), Bytes::copy_from_slice(&seq), payload.clone()];
                    let _ = publish.send(frames.try_into().expect("frames")).await;
                    sent.push(payload);
                }
                tokio::select! {
                    more = events.recv() => match more {
                        Some(more) => next = Some(more),
                        None => return,
                    },
                    _ = tick.tick() => next = Some(Vec::new()),
                    request = replay.recv() => {
                        let frames = request.expect("replay request").into_vec();
                        let start = u64::from_be_bytes(frames[2].as_ref().try_into().expect("8 bytes"));
                        for (seq, payload) in sent.iter().enumerate().skip(start as usize) {
                            let answer = vec![frames[0].clone(), Bytes::new(), Bytes::new(),
                                Bytes::copy_from_slice(&(seq as u64).to_be_bytes()), payload.clone()];
                            replay.send(answer.try_into().expect("frames")).await.expect("replay");
                        }
                        let end = vec![frames[0].clone(), Bytes::new(), Bytes::new(),
                                       Bytes::copy_from_slice(&(-1i64).to_be_bytes()), Bytes::new()];
                        replay.send(end.try_into().expect("frames")).await.expect("replay end");
                    }
                }
            }
        });
        Self {
            endpoints: format!("{publish_at}+{replay_at}"),
            batches,
        }
    }

    /// Publishes one batch of `events` (from [`event`]).
    pub fn publish(&self, events: Vec<rmpv::Value>) {
        self.batches.send(events).expect("publisher running");
    }
}

/// vLLM's event map: `type`, `block_hashes`, `medium` (the fields the router reads).
pub fn event(kind: &str, medium: &str, keys: &[[u8; 32]]) -> rmpv::Value {
    let hashes = keys
        .iter()
        .map(|key| rmpv::Value::Binary(key.to_vec()))
        .collect();
    rmpv::Value::Map(vec![
        ("type".into(), kind.into()),
        ("block_hashes".into(), rmpv::Value::Array(hashes)),
        ("medium".into(), medium.into()),
    ])
}

/// `[ts, events, data_parallel_rank, epoch]`.
fn batch(events: Vec<rmpv::Value>) -> Bytes {
    let value = rmpv::Value::Array(vec![
        rmpv::Value::F64(0.0),
        rmpv::Value::Array(events),
        0u64.into(),
        1u64.into(),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &value).expect("encode");
    Bytes::from(out)
}

/// The node keys of `tokens`' full blocks under [`NAMESPACE`] and [`BLOCK_SIZE`]
/// (docs/protocol.md "Keys").
pub fn chain_keys(tokens: &[u32]) -> Vec<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let namespace = hex::decode(NAMESPACE).expect("hex");
    let mut parent = [0u8; 32];
    tokens
        .chunks_exact(BLOCK_SIZE as usize)
        .map(|block| {
            let mut hash = Sha256::new();
            hash.update(&namespace);
            hash.update(parent);
            for token in block {
                hash.update(token.to_le_bytes());
            }
            parent = hash.finalize().into();
            parent
        })
        .collect()
}
