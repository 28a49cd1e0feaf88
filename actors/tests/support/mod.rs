//! Shared test scaffolding: an in-process node on a temp socket and a shared-memory KV region.

// Each test binary uses a subset of these helpers.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::PathBuf;

use memmap2::MmapMut;
use pegaflow_actors::keys::NamespaceFields;
use pegaflow_actors::node::{start, RunningNode};
use pegaflow_actors::protocol::{RegionSpec, RegisterRequest};
use pegaflow_config::{NodeConfig, Size};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A node on a fresh socket with a `pool_mib` MiB pool; its temp dir lives as long as it.
pub async fn node(pool_mib: u64) -> (RunningNode, tempfile::TempDir) {
    node_with(pool_mib, |_| {}).await
}

/// [`node`], with `tweak` applied to its config before it starts.
pub async fn node_with(
    pool_mib: u64,
    tweak: impl FnOnce(&mut NodeConfig),
) -> (RunningNode, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = NodeConfig::default();
    config.socket.path = dir.path().join("node.sock");
    config.http.addr = "127.0.0.1:0".parse().expect("addr");
    config.pool.size = Size::mib(pool_mib);
    config.pool.max_page_size = Size::mib(pool_mib.min(64));
    tweak(&mut config);
    (start(&config).await.expect("node starts"), dir)
}

/// An engine registered on `node` over a fresh 8-block region named after `tag`, which saved
/// its first 3 blocks as the first keys of the prompt `0..tokens` (block size 16). Returns the
/// namespace digest, the prompt's token ids and all its keys; the region lives until dropped.
pub async fn three_blocks_saved(
    node: &RunningNode,
    tag: &str,
    tokens: u32,
) -> ([u8; 32], Vec<u32>, Vec<[u8; 32]>, ShmRegion) {
    let region = ShmRegion::new(tag, "vllm_lbnhc", 2, 8);
    let mut client = pegaflow_actors::client::Client::connect(node.socket_path())
        .await
        .expect("connect");
    let engine = client
        .register(region.register_request())
        .await
        .expect("register");
    let namespace: [u8; 32] = engine.namespace.clone().try_into().expect("32 bytes");
    let tokens: Vec<u32> = (0..tokens).collect();
    let keys = pegaflow_actors::keys::chain_keys(&namespace, &tokens, 16);
    client
        .save(engine.engine, &keys[..3], &[0, 1, 2])
        .await
        .expect("save");
    (namespace, tokens, keys, region)
}

/// An engine's KV memory in /dev/shm, laid out `vllm_lbnhc` or `kv_split`; unlinked on drop.
pub struct ShmRegion {
    pub name: String,
    pub map: MmapMut,
    pub layers: u32,
    pub blocks: u32,
    pub segments: u64,
    pub segment_bytes: u64,
    pub namespace: NamespaceFields,
}

impl ShmRegion {
    pub fn new(tag: &str, layout: &str, layers: u32, blocks: u32) -> Self {
        let namespace = NamespaceFields {
            model: format!("test-model-{tag}"),
            dtype: "bf16".into(),
            layout: layout.into(),
            block_size: 16,
            num_layers: layers,
            num_kv_heads: 2,
            head_dim: 32,
            tp_rank: 0,
            tp_size: 1,
            pp_stage: 0,
        };
        let segments = if layout == "kv_split" { 2 } else { 1 };
        let segment_bytes = 16 * 2 * 32 * 2 * 2 / segments;
        let name = format!("pegaflow-test-{}-{tag}", std::process::id());
        let path = PathBuf::from("/dev/shm").join(&name);
        let bytes = u64::from(layers) * u64::from(blocks) * segments * segment_bytes;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create shm");
        file.set_len(bytes).expect("size shm");
        // SAFETY: the file is ours, sized above, and outlives the mapping.
        let mut map = unsafe { MmapMut::map_mut(&file) }.expect("map shm");
        rand::rng().fill_bytes(&mut map);
        Self {
            name,
            map,
            layers,
            blocks,
            segments,
            segment_bytes,
            namespace,
        }
    }

    /// The `register` request describing this region.
    pub fn register_request(&self) -> RegisterRequest {
        let plane = u64::from(self.blocks) * self.segment_bytes;
        RegisterRequest {
            namespace: self.namespace.clone(),
            region: RegionSpec {
                shm: Some(self.name.clone()),
                bytes: self.map.len() as u64,
                ..RegionSpec::default()
            },
            num_blocks: self.blocks,
            segment_bytes: self.segment_bytes,
            layers: (0..u64::from(self.layers))
                .map(|l| {
                    (0..self.segments)
                        .map(|s| ((l * self.segments + s) * plane, self.segment_bytes))
                        .collect()
                })
                .collect(),
            engine_events: Vec::new(),
            load_progress: None,
        }
    }

    /// Every byte of one block, layer by layer, segment by segment.
    pub fn block(&self, block: u32) -> Vec<u8> {
        self.block_ranges(block)
            .flat_map(|at| self.map[at].to_vec())
            .collect()
    }

    /// Where a block's bytes lie in `map`, layer by layer, segment by segment.
    pub fn block_ranges(&self, block: u32) -> impl Iterator<Item = std::ops::Range<usize>> {
        let segment_bytes = self.segment_bytes as usize;
        self.register_request()
            .layers
            .into_iter()
            .flatten()
            .map(move |(offset, stride)| {
                let start = (offset + u64::from(block) * stride) as usize;
                start..start + segment_bytes
            })
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(PathBuf::from("/dev/shm").join(&self.name));
    }
}

/// One HTTP/1.1 POST of a JSON body on a fresh connection; returns the status code and the
/// body.
pub async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    exchange(addr, head + body).await
}

/// One HTTP/1.1 GET on a fresh connection; returns the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    exchange(addr, request).await
}

/// Sends one whole request on a fresh connection and reads the response to its end.
async fn exchange(addr: SocketAddr, request: String) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    (status, body.to_string())
}
