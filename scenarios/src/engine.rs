//! A simulated inference engine: a real client of the node over its socket, with its KV memory
//! in shared memory. Per request it does what a connector does: look up the prompt's block
//! keys (leasing the hits), load the hit prefix, release the lease, and, once the missing blocks
//! are "computed", write them and save them. Every loaded block is checked byte-exact.

use std::path::Path;
use std::time::Instant;

use pegaflow_actors::client::{Client, ClientError};
use pegaflow_actors::keys::{join_keys, BlockKey, NamespaceFields};
use pegaflow_actors::protocol::{BlocksRequest, LookupReply, Request, SaveReply};

use crate::error::ScenarioError;
use crate::region::ShmRegion;
use crate::scenario::EngineSpec;

/// The namespace every simulated engine registers: one model, so engines on one node share
/// blocks exactly as replicas of one model do.
pub fn namespace(spec: &EngineSpec) -> NamespaceFields {
    NamespaceFields {
        model: "pegaflow-scenario/sim-model".into(),
        dtype: "bf16".into(),
        layout: "vllm_lbnhc".into(),
        block_size: spec.block_size,
        num_layers: spec.num_layers,
        num_kv_heads: spec.num_kv_heads,
        head_dim: spec.head_dim,
        tp_rank: 0,
        tp_size: 1,
        pp_stage: 0,
    }
}

/// What the lookup and load of one prompt found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Prefill {
    pub hits: u32,
    pub ssd_hits: u32,
    /// Hits only peers hold (fabric); the load fetches them, and may get fewer.
    pub remote_hits: u32,
    pub loaded: u32,
    /// Loaded blocks whose bytes were not the key's content.
    pub corrupt: u32,
    pub lookup_s: f64,
    pub load_s: f64,
}

impl Prefill {
    /// Loaded blocks that came from peers: the load delivers local hits first.
    pub fn remote_loaded(&self) -> u32 {
        self.loaded
            .saturating_sub(self.hits.saturating_sub(self.remote_hits))
    }
}

struct Connection {
    client: Client,
    handle: u32,
}

/// One engine.
pub struct Engine {
    pub id: u32,
    pub node: u32,
    spec: EngineSpec,
    region: ShmRegion,
    blocks: u32,
    generation: u32,
    connection: Option<Connection>,
}

impl Engine {
    /// An engine of `blocks` KV blocks, not yet connected.
    pub fn new(id: u32, node: u32, spec: &EngineSpec, blocks: u32) -> Result<Self, ScenarioError> {
        Ok(Self {
            id,
            node,
            spec: spec.clone(),
            region: ShmRegion::create(region_name(id, 0), spec, blocks)?,
            blocks,
            generation: 0,
            connection: None,
        })
    }

    /// Whether the engine holds a live connection.
    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    /// Blocks in the engine's region.
    pub fn blocks(&self) -> u32 {
        self.region.blocks()
    }

    /// Connects to the node and registers the region.
    pub async fn connect(&mut self, socket: &Path) -> Result<(), ScenarioError> {
        let engine = self.id;
        let wrap = |source| ScenarioError::Engine { engine, source };
        let mut client = Client::connect(socket).await.map_err(wrap)?;
        let reply = client
            .register(self.region.register_request(namespace(&self.spec)))
            .await
            .map_err(wrap)?;
        self.connection = Some(Connection {
            client,
            handle: reply.engine,
        });
        Ok(())
    }

    /// Forgets a connection that failed (the node died); the next request runs uncached.
    pub fn disconnect(&mut self) {
        self.connection = None;
    }

    /// The engine process dies: it leases `keys` (as a scheduler does before a load) and goes
    /// away without releasing; then it comes back with a fresh region. Returns the pages that
    /// were leased when it died.
    pub async fn crash(&mut self, keys: &[BlockKey], socket: &Path) -> Result<u32, ScenarioError> {
        let mut leased = 0;
        if let Some(conn) = self.connection.as_mut() {
            if !keys.is_empty() {
                leased = conn
                    .client
                    .lookup(keys, true)
                    .await
                    .map(|r| r.hits)
                    .unwrap_or(0);
            }
        }
        self.connection = None;
        self.generation += 1;
        // The old region is unlinked by its drop, as the dead process's memory would be.
        self.region = ShmRegion::create(
            region_name(self.id, self.generation),
            &self.spec,
            self.blocks,
        )?;
        self.connect(socket).await?;
        Ok(leased)
    }

    /// Looks up `keys`, loads the hit prefix into blocks `0..`, releases the lease and checks
    /// every loaded byte. An error means the connection is gone.
    pub async fn prefill(&mut self, keys: &[BlockKey]) -> Result<Prefill, ClientError> {
        let conn = self.connection.as_mut().ok_or_else(not_connected)?;
        let started = Instant::now();
        let found = conn.client.lookup(keys, true).await?;
        let lookup_s = started.elapsed().as_secs_f64();
        let hits = found.hits.min(keys.len() as u32);
        let mut outcome = Prefill {
            hits,
            ssd_hits: found.ssd_hits,
            remote_hits: found.remote_hits.min(hits),
            lookup_s,
            ..Prefill::default()
        };
        if hits > 0 {
            for block in 0..hits {
                self.region.clear_block(block);
            }
            let started = Instant::now();
            let block_ids: Vec<u32> = (0..hits).collect();
            let loaded = conn
                .client
                .load(conn.handle, &keys[..hits as usize], &block_ids)
                .await?;
            outcome.load_s = started.elapsed().as_secs_f64();
            outcome.loaded = loaded.loaded.min(hits);
        }
        if let Some(lease) = found.lease {
            conn.client.release(lease).await?;
        }
        outcome.corrupt = (0..outcome.loaded)
            .filter(|&b| !self.region.check_block(b, &keys[b as usize]))
            .count() as u32;
        Ok(outcome)
    }

    /// Writes the computed blocks `first..` of the prompt and saves them (with `persist` when
    /// the engine is configured so).
    pub async fn save(&mut self, keys: &[BlockKey], first: u32) -> Result<SaveReply, ClientError> {
        let conn = self.connection.as_mut().ok_or_else(not_connected)?;
        let block_ids: Vec<u32> = (first..keys.len() as u32).collect();
        for &block in &block_ids {
            self.region.write_block(block, &keys[block as usize]);
        }
        conn.client
            .call(Request::Save(BlocksRequest {
                engine: conn.handle,
                keys: join_keys(&keys[first as usize..]),
                block_ids,
                persist: self.spec.persist,
                after_events: Vec::new(),
                answer_when_queued: false,
            }))
            .await
    }

    /// Loads the leading `keys` (any blocks, not necessarily a prefix) the node itself holds
    /// into blocks `0..` and returns, per key up to the first one it does not hold, whether its
    /// bytes were right. Used to check that acknowledged blocks survived a fault, so blocks
    /// only peers hold are not loaded: a copy fetched from a peer would hide a local loss.
    pub async fn load_and_check(&mut self, keys: &[BlockKey]) -> Result<Vec<bool>, ClientError> {
        let found = self.peek(keys).await?;
        let held = found
            .hits
            .saturating_sub(found.remote_hits)
            .min(keys.len() as u32);
        if held == 0 {
            return Ok(Vec::new());
        }
        let conn = self.connection.as_mut().ok_or_else(not_connected)?;
        for block in 0..held {
            self.region.clear_block(block);
        }
        let block_ids: Vec<u32> = (0..held).collect();
        let loaded = conn
            .client
            .load(conn.handle, &keys[..held as usize], &block_ids)
            .await?;
        Ok((0..loaded.loaded.min(held))
            .map(|b| self.region.check_block(b, &keys[b as usize]))
            .collect())
    }

    /// Looks `keys` up without a lease: what the node (and its peers) hold now.
    pub async fn peek(&mut self, keys: &[BlockKey]) -> Result<LookupReply, ClientError> {
        let conn = self.connection.as_mut().ok_or_else(not_connected)?;
        conn.client.lookup(keys, false).await
    }

    /// Asks the node whether it holds `key` itself (memory or SSD); `Some(ssd_only)` when it
    /// does.
    pub async fn holds(&mut self, key: &BlockKey) -> Result<Option<bool>, ClientError> {
        let reply = self.peek(std::slice::from_ref(key)).await?;
        Ok((reply.hits == 1 && reply.remote_hits == 0).then_some(reply.ssd_hits == 1))
    }
}

/// A region name unique in this process (replays may run side by side, as tests do) and
/// tagged with the process id, so leftovers of a killed harness are recognisable.
fn region_name(engine: u32, generation: u32) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "pegaflow-scenario-{}-{unique}-e{engine}-g{generation}",
        std::process::id()
    )
}

fn not_connected() -> ClientError {
    ClientError::Protocol("engine is not connected (its node is down)".into())
}
