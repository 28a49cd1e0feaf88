//! `pegaflow-router`: prefill/decode disaggregation in front of vLLM engines that run
//! PegaKVConnector (docs/pd.md).
//!
//! A prefill engine computes the prompt and saves its KV blocks to the pegaflow-node; the
//! router waits until the node confirms it holds them, then sends the request to a decode
//! engine, which loads those blocks instead of computing them. Prefix- and load-aware choice,
//! retries on a failed engine, deadlines on every step, and a fallback to plain decode-side
//! prefill keep a client answered when engines or the node fail.
//!
//! `src/main.rs` only parses flags and serves [`http::app`].

pub mod backend;
pub mod config;
pub mod error;
pub mod handoff;
pub mod http;
pub mod metrics;
pub mod node_events;
pub mod pd;
pub mod prefix;
pub mod stream;
pub mod upstream;
