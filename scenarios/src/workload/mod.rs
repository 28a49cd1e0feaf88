//! Workloads: what requests arrive when. Traces and generators both produce Mooncake-format
//! requests (a prompt described by one hash id per `hash_block_tokens` tokens, equal ids meaning
//! equal prefix blocks), so everything downstream handles one shape.

pub mod synthetic;
pub mod tokens;
pub mod trace;

use crate::error::ScenarioError;
use crate::scenario::WorkloadSpec;

/// One request to replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Arrival, virtual ms from the workload's start.
    pub at_ms: u64,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// One id per `hash_block_tokens` tokens of the input (the last block may be partial).
    pub hash_ids: Vec<u64>,
}

/// A workload ready to replay.
#[derive(Clone, Debug)]
pub struct Workload {
    pub requests: Vec<Request>,
    pub hash_block_tokens: u32,
}

impl Workload {
    /// Loads the trace or runs the generator the scenario names; `limit` caps the request
    /// count (CI replays small slices of the same scenarios).
    pub fn load(
        spec: &WorkloadSpec,
        base_dir: &std::path::Path,
        limit: Option<usize>,
    ) -> Result<Self, ScenarioError> {
        let (mut requests, hash_block_tokens) = match spec {
            WorkloadSpec::Trace {
                path,
                requests,
                skip,
                hash_block_tokens,
            } => {
                let take = match (requests, limit) {
                    (Some(a), Some(b)) => Some((*a).min(b)),
                    (a, b) => a.or(b),
                };
                let path = base_dir.join(path);
                (
                    trace::read(&path, *skip, take, *hash_block_tokens)?,
                    *hash_block_tokens,
                )
            }
            WorkloadSpec::Synthetic(spec) => (synthetic::generate(spec), spec.hash_block_tokens),
        };
        if let Some(limit) = limit {
            requests.truncate(limit);
        }
        Ok(Self {
            requests,
            hash_block_tokens,
        })
    }

    /// Full KV blocks of the longest prompt: the engines' regions must hold that many.
    pub fn max_blocks(&self, block_size: u32) -> u32 {
        self.requests
            .iter()
            .map(|r| r.input_tokens / block_size)
            .max()
            .unwrap_or(0)
    }
}
