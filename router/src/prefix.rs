//! Prefix-aware choice of the prefill engine (docs/pd.md "Choosing engines"): a prompt goes to
//! the prefill engine whose host's pegaflow-node already holds the longest prefix of it, so the
//! least is computed, unless that engine has more than `--prefix-load-gap` requests in flight
//! beyond the least loaded one.
//!
//! The router learns the engines' namespace digest and block size from a handoff (the connector
//! reports both per rank). From then on it takes each prompt's token ids from the body when the
//! prompt is token ids, else from vLLM's `POST /tokenize` on the least loaded prefill engine,
//! asks its node `POST /api/holders` how many leading blocks each node holds (itself exactly,
//! fabric peers by their gossiped digests), and maps each prefill engine to its node
//! (`--prefill NODE=URL`). Both calls share one short budget (`--prefix-timeout-s`); any
//! failure falls back to the load-only choice and is counted, never failing the request.
//!
//! A node subscribed to with `--node-events` answers from its KV events instead
//! ([`crate::node_events`]): the router chains the prompt's keys itself and counts the leading
//! ones the node's events say it holds; `/api/holders` is asked only for named nodes without a
//! synced event view.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::backend::{Backends, Load};
use crate::config::{Args, BaseUrl};
use crate::handoff::Handoff;
use crate::metrics::Metrics;
use crate::node_events::{Key, NodeViews};
use crate::pd::Endpoint;
use crate::upstream::Upstream;

/// The fields of a chat request that shape its prompt, passed on to `/tokenize` (vLLM's
/// `TokenizeChatRequest`, whose defaults agree with the chat request's for the rest).
const CHAT_PROMPT_FIELDS: [&str; 10] = [
    "model",
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "media_io_kwargs",
    "mm_processor_kwargs",
    "tools",
];
/// Likewise for a completion request with a text prompt (`TokenizeCompletionRequest`), besides
/// the prompt itself.
const COMPLETION_PROMPT_FIELDS: [&str; 2] = ["model", "add_special_tokens"];

/// How a prefix-aware choice ended, for `pegaflow_router_prefix_choices_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixOutcome {
    /// The engine whose node holds the longest prefix (at least one block) was chosen.
    Prefix,
    /// No engine's node holds a block of the prompt, or those holding the longest prefix were
    /// too busy: the choice went by load.
    Load,
    /// The router could not know the prompt's blocks: no handoff seen yet, or a batch of
    /// prompts.
    Unknown,
    /// Tokenizing or asking the node failed or ran past the budget.
    Failed,
}

impl PrefixOutcome {
    /// Every outcome, for metric series that exist from start.
    pub const ALL: [PrefixOutcome; 4] = [
        PrefixOutcome::Prefix,
        PrefixOutcome::Load,
        PrefixOutcome::Unknown,
        PrefixOutcome::Failed,
    ];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            PrefixOutcome::Prefix => "prefix",
            PrefixOutcome::Load => "load",
            PrefixOutcome::Unknown => "unknown",
            PrefixOutcome::Failed => "failed",
        }
    }
}

/// What the node needs to chain a prompt's keys, learned from a handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeySpace {
    namespace: String,
    block_size: u32,
}

impl KeySpace {
    /// The node keys of every full block of `tokens` (docs/protocol.md "Keys"):
    /// `key_i = sha256(namespace || key_{i-1} || tokens_i as u32 LE)`, `key_{-1}` all zeros.
    /// None when the namespace is not 32 bytes of hex.
    fn chain_keys(&self, tokens: &[u32]) -> Option<Vec<Key>> {
        let namespace = <[u8; 32]>::try_from(hex::decode(&self.namespace).ok()?).ok()?;
        let mut parent = [0u8; 32];
        let block_size = usize::try_from(self.block_size).ok()?.max(1);
        Some(
            tokens
                .chunks_exact(block_size)
                .map(|block| {
                    let mut hash = Sha256::new();
                    hash.update(namespace);
                    hash.update(parent);
                    for token in block {
                        hash.update(token.to_le_bytes());
                    }
                    parent = hash.finalize().into();
                    parent
                })
                .collect(),
        )
    }
}

/// Why no prefix-aware choice was made.
enum NoChoice {
    Unknown,
    Failed(String),
}

/// The prompt as the router can read it from a client's body.
#[derive(Debug, PartialEq)]
enum Prompt {
    /// Token ids given in the body.
    Tokens(Vec<u32>),
    /// Text or chat messages: this body asks `/tokenize` for the ids.
    Tokenize(Value),
}

/// vLLM's `/tokenize` answer (its `count` and `max_model_len` are not needed).
#[derive(Deserialize)]
struct Tokenized {
    tokens: Vec<u32>,
}

/// The node's `/api/holders` answer.
#[derive(Deserialize)]
struct Holders {
    holders: Vec<Holder>,
}

/// One node of the `/api/holders` answer and the leading blocks it holds.
#[derive(Deserialize)]
struct Holder {
    node: String,
    hits: u32,
}

/// The prefix-aware choice: the node to ask, its budget and load limit, and what was learned.
pub struct PrefixChoice {
    node: BaseUrl,
    budget: Duration,
    load_gap: usize,
    space: Mutex<Option<KeySpace>>,
    views: NodeViews,
}

impl PrefixChoice {
    /// The choice for `args`, when there is one to make: more than one prefill engine, and at
    /// least one names its node. None otherwise (the choice is by load only).
    pub fn new(args: &Args) -> Option<Self> {
        let named = args.prefill.iter().any(|engine| engine.node.is_some());
        (args.prefill.len() > 1 && named).then(|| Self {
            node: args.node_http.clone(),
            budget: args.prefix_timeout_s.min(args.prefill_timeout_s),
            load_gap: args.prefix_load_gap,
            space: Mutex::new(None),
            views: NodeViews::subscribe(&args.node_events),
        })
    }

    /// Remembers the namespace and block size of a handoff's first rank (a connector older
    /// than the block size teaches nothing).
    pub fn learn(&self, handoff: &Handoff) {
        let Some(rank) = handoff.ranks.first() else {
            return;
        };
        let Some(block_size) = rank.block_size.filter(|&size| size > 0) else {
            return;
        };
        *self.space.lock().unwrap_or_else(PoisonError::into_inner) = Some(KeySpace {
            namespace: rank.namespace.clone(),
            block_size,
        });
    }

    /// The prefill engine to try first, the choice counted by outcome; None when no choice
    /// could be made, and the load-only choice applies.
    pub async fn choose(
        &self,
        upstream: &Upstream,
        prefill: &Backends,
        endpoint: Endpoint,
        fields: &Map<String, Value>,
        metrics: &Metrics,
    ) -> Option<usize> {
        let (chosen, outcome) = match self.rank(upstream, prefill, endpoint, fields).await {
            Ok((index, outcome, hits)) => {
                metrics.prefix_cached_blocks.observe(f64::from(hits));
                (Some(index), outcome)
            }
            Err(NoChoice::Unknown) => (None, PrefixOutcome::Unknown),
            Err(NoChoice::Failed(why)) => {
                tracing::warn!(%why, "prefix-aware choice failed; choosing by load");
                (None, PrefixOutcome::Failed)
            }
        };
        metrics
            .prefix_choices_total
            .with_label_values(&[outcome.label()])
            .inc();
        chosen
    }

    /// The engine to try first, how it was chosen, and how many blocks its node holds.
    async fn rank(
        &self,
        upstream: &Upstream,
        prefill: &Backends,
        endpoint: Endpoint,
        fields: &Map<String, Value>,
    ) -> Result<(usize, PrefixOutcome, u32), NoChoice> {
        let space = self
            .space
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(NoChoice::Unknown)?;
        let prompt = Prompt::read(endpoint, fields).ok_or(NoChoice::Unknown)?;
        let deadline = Instant::now() + self.budget;
        let tokens = match prompt {
            Prompt::Tokens(tokens) => tokens,
            Prompt::Tokenize(body) => tokenize(upstream, prefill, body, deadline).await?,
        };
        let keys = space.chain_keys(&tokens).ok_or_else(|| {
            NoChoice::Failed(format!(
                "namespace {} is not 32 bytes of hex",
                space.namespace
            ))
        })?;
        let nodes: Vec<Option<&str>> = prefill.nodes().collect();
        let from_events: Vec<Option<u32>> = nodes
            .iter()
            .map(|node| node.and_then(|node| self.views.leading_held(node, &keys)))
            .collect();
        let unsynced = nodes
            .iter()
            .zip(&from_events)
            .any(|(node, hits)| node.is_some() && hits.is_none());
        let held = match unsynced {
            true => self.holders(upstream, &space, &tokens, deadline).await?,
            false => HashMap::new(),
        };
        let hits: Vec<u32> = nodes
            .iter()
            .zip(from_events)
            .map(|(node, hits)| {
                hits.or_else(|| node.and_then(|node| held.get(node)).copied())
                    .unwrap_or(0)
            })
            .collect();
        let (index, outcome) =
            decide(&prefill.loads(), &hits, self.load_gap).ok_or(NoChoice::Unknown)?;
        Ok((index, outcome, hits[index]))
    }

    /// Leading blocks of `tokens` each node holds, by node id, as the node answers.
    async fn holders(
        &self,
        upstream: &Upstream,
        space: &KeySpace,
        tokens: &[u32],
        deadline: Instant,
    ) -> Result<HashMap<String, u32>, NoChoice> {
        let body = json!({"namespace": space.namespace, "block_size": space.block_size,
                          "tokens": tokens});
        let holders: Holders = upstream
            .post_json(
                &self.node,
                "/api/holders",
                Bytes::from(body.to_string()),
                deadline,
            )
            .await
            .map_err(|error| NoChoice::Failed(format!("node {}: {error}", self.node)))?;
        Ok(holders
            .holders
            .into_iter()
            .map(|holder| (holder.node, holder.hits))
            .collect())
    }
}

/// The prompt's token ids from vLLM's `/tokenize` on the least loaded prefill engine.
async fn tokenize(
    upstream: &Upstream,
    prefill: &Backends,
    body: Value,
    deadline: Instant,
) -> Result<Vec<u32>, NoChoice> {
    let (_, backend) = prefill.least_loaded(&[]).ok_or(NoChoice::Unknown)?;
    let tokenized: Tokenized = upstream
        .post_json(
            &backend.url,
            "/tokenize",
            Bytes::from(body.to_string()),
            deadline,
        )
        .await
        .map_err(|error| NoChoice::Failed(format!("tokenize on {}: {error}", backend.url)))?;
    Ok(tokenized.tokens)
}

impl Prompt {
    /// The prompt of a client's body; None for a batch of prompts or a body without one.
    fn read(endpoint: Endpoint, fields: &Map<String, Value>) -> Option<Prompt> {
        match endpoint {
            Endpoint::ChatCompletions => fields
                .contains_key("messages")
                .then(|| Prompt::Tokenize(pick(fields, &CHAT_PROMPT_FIELDS))),
            Endpoint::Completions => {
                let prompt = match fields.get("prompt")? {
                    // A batch of one: that prompt.
                    Value::Array(items) if items.len() == 1 && !items[0].is_number() => &items[0],
                    prompt => prompt,
                };
                match prompt {
                    Value::String(_) => {
                        let mut body = pick(fields, &COMPLETION_PROMPT_FIELDS);
                        body["prompt"] = prompt.clone();
                        Some(Prompt::Tokenize(body))
                    }
                    ids => Vec::<u32>::deserialize(ids).ok().map(Prompt::Tokens),
                }
            }
        }
    }
}

/// The `names` fields of `fields` that are present, as a JSON object.
fn pick(fields: &Map<String, Value>, names: &[&str]) -> Value {
    let picked: Map<String, Value> = names
        .iter()
        .filter_map(|&name| Some((name.to_owned(), fields.get(name)?.clone())))
        .collect();
    Value::Object(picked)
}

/// The engine to try first, given each engine's load and its node's `hits`, in list order.
///
/// Engines cooling down after a failure are left out unless all are. Of the rest, those with at
/// most `load_gap` requests in flight beyond the least loaded may be chosen; among them the
/// longest prefix wins, then fewer in flight, then the earlier listed. The outcome is
/// [`PrefixOutcome::Prefix`] when the winner holds the longest prefix of all (at least one
/// block), else [`PrefixOutcome::Load`].
fn decide(loads: &[Load], hits: &[u32], load_gap: usize) -> Option<(usize, PrefixOutcome)> {
    let mut candidates: Vec<usize> = (0..loads.len()).filter(|&i| !loads[i].cooling).collect();
    if candidates.is_empty() {
        candidates = (0..loads.len()).collect();
    }
    let least = candidates.iter().map(|&i| loads[i].in_flight).min()?;
    let longest = candidates.iter().map(|&i| hits[i]).max()?;
    let chosen = candidates
        .into_iter()
        .filter(|&i| loads[i].in_flight <= least + load_gap)
        .min_by_key(|&i| (Reverse(hits[i]), loads[i].in_flight, i))?;
    let outcome = if hits[chosen] > 0 && hits[chosen] == longest {
        PrefixOutcome::Prefix
    } else {
        PrefixOutcome::Load
    };
    Some((chosen, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(in_flight: &[usize]) -> Vec<Load> {
        in_flight
            .iter()
            .map(|&in_flight| Load {
                cooling: false,
                in_flight,
            })
            .collect()
    }

    #[test]
    fn the_longest_prefix_wins_within_the_load_gap() {
        assert_eq!(
            decide(&loads(&[0, 2, 1]), &[1, 3, 0], 2),
            Some((1, PrefixOutcome::Prefix))
        );
        // Too busy: the next longest prefix among the rest, not just the least loaded.
        assert_eq!(
            decide(&loads(&[0, 3, 1]), &[0, 3, 2], 2),
            Some((2, PrefixOutcome::Load))
        );
        assert_eq!(
            decide(&loads(&[0, 3]), &[0, 3], 2),
            Some((0, PrefixOutcome::Load))
        );
    }

    #[test]
    fn ties_go_to_fewer_in_flight_then_the_earlier_listed() {
        assert_eq!(
            decide(&loads(&[2, 1, 1]), &[4, 4, 4], 4),
            Some((1, PrefixOutcome::Prefix))
        );
        assert_eq!(
            decide(&loads(&[1, 0, 0]), &[0, 0, 0], 4),
            Some((1, PrefixOutcome::Load))
        );
        assert_eq!(decide(&[], &[], 4), None);
    }

    #[test]
    fn an_engine_cooling_down_is_left_out_unless_all_are() {
        let mut cooling = loads(&[0, 0]);
        cooling[0].cooling = true;
        assert_eq!(
            decide(&cooling, &[5, 1], 4),
            Some((1, PrefixOutcome::Prefix))
        );
        cooling[1].cooling = true;
        assert_eq!(
            decide(&cooling, &[5, 1], 4),
            Some((0, PrefixOutcome::Prefix))
        );
    }

    #[test]
    fn keys_chain_as_the_connector_and_the_node_chain_them() {
        let raw = include_str!("../../connector/tests/golden/keys.json");
        let vectors: Vec<Value> = serde_json::from_str(raw).expect("keys.json parses");
        assert!(!vectors.is_empty());
        for vector in vectors {
            let space = KeySpace {
                namespace: vector["namespace"].as_str().expect("namespace").to_owned(),
                block_size: vector["namespace_fields"]["block_size"]
                    .as_u64()
                    .expect("block size") as u32,
            };
            let tokens = Vec::<u32>::deserialize(&vector["tokens"]).expect("tokens");
            let keys: Vec<String> = space
                .chain_keys(&tokens)
                .expect("a hex namespace")
                .iter()
                .map(hex::encode)
                .collect();
            assert_eq!(json!(keys), vector["keys"]);
        }
        let bad = KeySpace {
            namespace: "abc".into(),
            block_size: 16,
        };
        assert_eq!(bad.chain_keys(&[1; 16]), None);
    }

    fn fields(body: Value) -> Map<String, Value> {
        match body {
            Value::Object(fields) => fields,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn the_prompt_is_read_as_ids_or_asked_of_tokenize() {
        let read = |endpoint, body| Prompt::read(endpoint, &fields(body));
        let completions = Endpoint::Completions;
        assert_eq!(
            read(completions, json!({"prompt": [5, 6], "max_tokens": 3})),
            Some(Prompt::Tokens(vec![5, 6]))
        );
        assert_eq!(
            read(completions, json!({"prompt": [[5, 6]]})),
            Some(Prompt::Tokens(vec![5, 6]))
        );
        assert_eq!(
            read(
                completions,
                json!({"model": "m", "prompt": ["hi"], "add_special_tokens": false, "n": 2})
            ),
            Some(Prompt::Tokenize(
                json!({"model": "m", "prompt": "hi", "add_special_tokens": false})
            ))
        );
        assert_eq!(
            read(
                Endpoint::ChatCompletions,
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 3, "stream": true})
            ),
            Some(Prompt::Tokenize(
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            ))
        );
        for batch in [
            json!({"prompt": ["a", "b"]}),
            json!({"prompt": [-1]}),
            json!({}),
        ] {
            assert_eq!(read(completions, batch.clone()), None, "{batch}");
        }
        assert_eq!(
            read(Endpoint::ChatCompletions, json!({"prompt": "x"})),
            None
        );
    }
}
