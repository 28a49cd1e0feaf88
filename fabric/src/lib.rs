//! PegaFlow fabric: how nodes find each other, learn which blocks each holds, and move pages
//! between them (docs/design.md §6).
//!
//! - [`Cluster`] is the membership handle. It wraps chitchat gossip and hides it entirely:
//!   callers see [`Member`]s, a [`MemberChange`] stream, a key-publishing API and a ranked list
//!   of [`Candidate`] holders for a missed prefix; gossip key names never leave [`member`].
//! - The [`digest`] module holds the block-availability filter a node publishes: a counting
//!   Bloom filter locally, split into fixed-size bit shards that are gossiped only when they
//!   change.
//! - The link moves pages: [`frame`] is the wire format (length-prefixed bincode 2 headers,
//!   raw page bytes after them), [`handshake`] authenticates both ends on the cluster secret,
//!   [`LinkServer`] serves pages leased from a [`PageSource`], [`LinkClient`] fetches them
//!   pipelined over one reused connection with bounded in-flight bytes and a deadline, and
//!   streams each page straight into where the caller's [`PageSink`] puts it.
//! - [`Fabric`] wires the three together and adds [`Fabric::fetch_prefix`]: nearest holder
//!   first, a false positive or a dead peer falls through to the next one, then to recompute.
//! - `rdma` (feature `rdma`): one-sided reads of a peer's registered arena.

mod change;
mod cluster;
pub mod digest;
mod error;
mod fabric;
pub mod frame;
pub mod handshake;
mod link;
pub mod member;
mod options;
mod ranking;
#[cfg(feature = "rdma")]
pub mod rdma;
mod source;

pub use change::{ChangeStream, MemberChange};
pub use cluster::Cluster;
pub use digest::{DigestShape, LocalDigest, RemoteDigest};
pub use error::{FabricError, FrameError, HandshakeError, LinkError, SinkError, SourceError};
pub use fabric::{Fabric, FetchOutcome, FetchReport};
pub use link::client::{
    FetchInto, FetchStream, FetchedPage, Landed, LinkClient, LinkOptions, Links,
};
pub use link::server::LinkServer;
pub use link::sink::PageSink;
pub use member::{Member, NodeId};
pub use options::{local_host_name, FabricOptions};
pub use ranking::{rank_candidates, Candidate, PeerStats};
pub use source::{MemoryLease, MemorySource, PageLease, PageSource};

/// Bytes in one block key: a SHA-256 digest (docs/design.md §4).
pub const KEY_BYTES: usize = 32;

/// One block's key, as the pool and the connector compute it.
pub type BlockKey = [u8; KEY_BYTES];
