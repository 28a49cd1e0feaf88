//! `POST /api/holders`: which nodes hold how much of a prompt, asked with its token ids.
//!
//! The P/D router (`pegaflow-router`, docs/pd.md) asks it to send a prompt to the prefill
//! engine whose host already holds the longest prefix of it, so the least is computed. The
//! router knows token ids, not keys, so the node chains them itself ([`chain_keys`], the same
//! hashing as every engine). It answers for itself with the exact leading hits of its pool
//! (asked as `/api/lookup` asks: no lease, no count in the lookup metrics) and, when the fabric
//! runs, for every peer whose gossiped digest claims a prefix, with the run it claims (a digest
//! may claim a block falsely, about 1 % of the time; a wrong guess costs only a recompute).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router};
use pegaflow_config::FabricConfig;
use serde::{Deserialize, Serialize};

use crate::context::NodeContext;
use crate::http_lookup::{json_body, parse_hex_key, pool_hits, ApiError};
use crate::keys::chain_keys;

/// Largest body accepted: a prompt of a million tokens as JSON numbers.
const MAX_BODY_BYTES: usize = 16 << 20;

/// The request body: an engine's namespace and block size, and the prompt's token ids.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldersBody {
    /// The namespace digest as `2 * 32` hex digits, as the connector reports it in a handoff.
    pub namespace: String,
    /// Tokens per block of that engine (at least 1).
    pub block_size: u32,
    /// The prompt's token ids; a trailing partial block has no key and is never held.
    pub tokens: Vec<u32>,
}

/// The answer: this node first, then each peer that claims a prefix, nearest first.
#[derive(Debug, Serialize)]
pub struct HoldersAnswer {
    /// Never empty: this node is always first, with 0 hits when it holds nothing.
    pub holders: Vec<Holder>,
}

/// One node and how many leading blocks of the prompt it holds (or, for a peer, claims).
#[derive(Debug, Serialize)]
pub struct Holder {
    /// Its fabric node id ([`node_name`] for this node).
    pub node: String,
    /// Leading blocks held; for a peer, the run its digest claims.
    pub hits: u32,
}

/// What the endpoint needs: the node's handles and the name it answers for itself under.
struct HoldersState {
    ctx: Arc<NodeContext>,
    node_id: String,
}

/// The route `POST /api/holders`, answering for this node under [`node_name`].
pub fn routes(ctx: Arc<NodeContext>, fabric: &FabricConfig) -> Router {
    let node_id = node_name(&ctx, fabric);
    Router::new()
        .route("/api/holders", post(holders))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(HoldersState { ctx, node_id }))
}

/// The name this node goes by, so that a router can tell which engines run beside it: its
/// fabric node id when the fabric runs, else `fabric.node_id` when set, else the host name.
pub fn node_name(ctx: &NodeContext, fabric: &FabricConfig) -> String {
    match (&ctx.peers, &fabric.node_id) {
        (Some(peers), _) => peers.node_id(),
        (None, Some(configured)) => configured.clone(),
        (None, None) => pegaflow_fabric::local_host_name(),
    }
}

/// Answers `POST /api/holders`: 400 naming the field for a bad body, 503 while the node drains
/// or its pool does not answer.
async fn holders(
    State(state): State<Arc<HoldersState>>,
    body: Result<Json<HoldersBody>, JsonRejection>,
) -> Result<Json<HoldersAnswer>, ApiError> {
    let body = json_body(body)?;
    let namespace = parse_hex_key("namespace", &body.namespace).map_err(ApiError::bad_request)?;
    if body.block_size == 0 {
        return Err(ApiError::bad_request(
            "field `block_size`: must be at least 1".to_owned(),
        ));
    }
    let keys = chain_keys(&namespace, &body.tokens, body.block_size as usize);
    let peers: Vec<Holder> = state
        .ctx
        .peers
        .iter()
        .flat_map(|peers| peers.claimed_prefixes(&keys))
        .map(|(node, hits)| Holder { node, hits })
        .collect();
    let own = Holder {
        node: state.node_id.clone(),
        hits: pool_hits(&state.ctx, keys).await?,
    };
    Ok(Json(HoldersAnswer {
        holders: std::iter::once(own).chain(peers).collect(),
    }))
}
