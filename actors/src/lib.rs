//! The PegaFlow node: ractor actors that keep engines' KV blocks in a shared pool and move
//! them between the pool and engines' KV memory (docs/design.md §5), the connector socket
//! protocol (§7), and the HTTP endpoints for operators (§8).
//!
//! `pegaflow-node` (src/main.rs) only parses its config and runs [`node::Node`].

pub mod client;
pub mod context;
pub mod dashboard;
pub mod events;
pub mod http;
pub mod http_holders;
pub mod http_lookup;
pub mod keys;
pub mod layout;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod otlp;
pub mod page_crc;
pub mod peers;
pub mod pool;
pub mod pools;
pub mod protocol;
pub mod session;
pub mod socket_file;
pub mod ssd;
pub mod stats;
pub mod topology;
pub mod transfer;
pub mod transfers;
