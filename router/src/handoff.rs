//! The no-race handoff: the prefill engine's answer names the keys of the prompt blocks it
//! saved (PegaKVConnector puts them in `kv_transfer_params.pegaflow_handoff`), and the router
//! asks the node (`POST /api/lookup`) until it holds every one of them, so the decode engine's
//! lookup finds the whole prompt instead of racing the save.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::{sleep_until, Instant};

use crate::config::BaseUrl;
use crate::pd::Fallback;
use crate::upstream::{Upstream, UpstreamError};

/// The `kv_transfer_params` key the connector answers under (and the router asks with).
pub const HANDOFF_KEY: &str = "pegaflow_handoff";

/// The first pause between two asks of the node; it doubles up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(2);
/// The longest pause between two asks of the node.
const MAX_POLL: Duration = Duration::from_millis(50);

/// What the prefill engine reported: per tensor-parallel rank, the chain of its prompt's keys.
#[derive(Debug, Deserialize)]
pub struct Handoff {
    /// One entry per rank; each rank's chain is looked up on its own.
    pub ranks: Vec<RankKeys>,
}

/// One rank's namespace and the keys of its blocks, as hex.
#[derive(Debug, Deserialize)]
pub struct RankKeys {
    /// The namespace digest, named in logs when the node does not confirm, and learned for the
    /// prefix-aware choice ([`crate::prefix`]).
    pub namespace: String,
    /// Tokens per block, learned with the namespace; absent from connectors before it was added.
    #[serde(default)]
    pub block_size: Option<u32>,
    /// The keys, in chain order.
    pub keys: Vec<String>,
}

/// The handoff named in a prefill engine's answer; `Err` says why there is none (no connector,
/// a connector without the handoff, or a malformed entry).
pub fn from_answer(answer: &Value) -> Result<Handoff, String> {
    let params = answer
        .get("kv_transfer_params")
        .and_then(|params| params.get(HANDOFF_KEY))
        .ok_or_else(|| format!("the answer has no `kv_transfer_params.{HANDOFF_KEY}`"))?;
    Handoff::deserialize(params)
        .map_err(|error| format!("`kv_transfer_params.{HANDOFF_KEY}`: {error}"))
}

/// Asks the node until it holds every rank's keys (`Ok`), or `deadline` passes: then the
/// fallback says whether the node answered with fewer hits (`Unconfirmed`) or failed.
pub async fn confirm(
    upstream: &Upstream,
    node: &BaseUrl,
    handoff: &Handoff,
    deadline: Instant,
) -> Result<(), Fallback> {
    let mut pending: Vec<&RankKeys> = handoff
        .ranks
        .iter()
        .filter(|rank| !rank.keys.is_empty())
        .collect();
    let mut pause = FIRST_POLL;
    loop {
        let mut node_failed = false;
        let mut still = Vec::new();
        for rank in pending {
            match held(upstream, node, rank, deadline).await {
                Ok(true) => {}
                Ok(false) => still.push(rank),
                Err(error) => {
                    tracing::debug!(%node, %error, "node lookup failed");
                    node_failed = true;
                    still.push(rank);
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() + pause >= deadline {
            tracing::warn!(%node, namespace = %pending[0].namespace, keys = pending[0].keys.len(),
                           "the node did not confirm the prefill's blocks in time");
            return Err(if node_failed {
                Fallback::NodeError
            } else {
                Fallback::Unconfirmed
            });
        }
        sleep_until(Instant::now() + pause).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// Whether the node holds every key of one rank.
async fn held(
    upstream: &Upstream,
    node: &BaseUrl,
    rank: &RankKeys,
    deadline: Instant,
) -> Result<bool, UpstreamError> {
    let body = Bytes::from(json!({ "keys": rank.keys }).to_string());
    let answer: Value = upstream
        .post_json(node, "/api/lookup", body, deadline)
        .await?;
    let hits = answer
        .get("hits")
        .and_then(Value::as_u64)
        .ok_or_else(|| UpstreamError::BadAnswer(format!("no `hits` in {answer}")))?;
    Ok(hits >= rank.keys.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handoff_is_read_from_the_answer() {
        let answer = json!({"choices": [], "kv_transfer_params": {HANDOFF_KEY: {
            "ranks": [{"namespace": "ab", "block_size": 16, "keys": ["01", "02"]}]}}});
        let handoff = from_answer(&answer).expect("a handoff");
        assert_eq!(handoff.ranks[0].keys, ["01", "02"]);
        assert_eq!(handoff.ranks[0].block_size, Some(16));
        let older = json!({"kv_transfer_params": {HANDOFF_KEY: {
            "ranks": [{"namespace": "ab", "keys": []}]}}});
        assert_eq!(
            from_answer(&older).expect("a handoff").ranks[0].block_size,
            None
        );
    }

    #[test]
    fn a_missing_or_malformed_handoff_says_why() {
        let error = from_answer(&json!({"kv_transfer_params": null})).expect_err("none");
        assert!(error.contains("has no"), "{error}");
        let error = from_answer(&json!({"kv_transfer_params": {HANDOFF_KEY: {"ranks": [{}]}}}))
            .expect_err("no keys");
        assert!(
            error.contains("namespace") || error.contains("keys"),
            "{error}"
        );
    }
}
