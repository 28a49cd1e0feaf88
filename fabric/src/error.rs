//! The errors callers of the fabric handle, one enum per concern.

use std::net::SocketAddr;
use std::time::Duration;

/// Starting or running the cluster handle.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// The configuration cannot describe a working node.
    #[error("fabric config: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    /// Chitchat could not start (usually: the gossip UDP port is taken).
    #[error("gossip could not start on {addr}: {reason}")]
    Gossip { addr: SocketAddr, reason: String },
    /// The link listener could not bind.
    #[error("link listener could not bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Reading or writing one link frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announced more than the configured maximum; the connection is closed
    /// without reading the body, so a hostile peer cannot make us allocate.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    /// The stream ended inside a frame.
    #[error("connection closed inside a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    /// The header did not decode as a link message.
    #[error("malformed frame header: {0}")]
    Malformed(String),
    /// A page's bytes do not match the crc32c its sender computed at save time.
    #[error("page {index} failed its checksum (crc32c {got:#010x}, expected {want:#010x})")]
    Checksum { index: u32, got: u32, want: u32 },
    /// Socket error.
    #[error("link i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Authenticating a link.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer proved no knowledge of our cluster secret (or we of its).
    #[error("peer does not share the cluster secret")]
    WrongSecret,
    /// The peer belongs to another cluster.
    #[error("peer is in cluster {theirs:?}, we are in {ours:?}")]
    WrongCluster { ours: String, theirs: String },
    /// The peer speaks another link protocol version.
    #[error("peer speaks link protocol v{theirs}, we speak v{ours}")]
    Version { ours: u16, theirs: u16 },
    /// The peer refused us and said why.
    #[error("refused by peer: {0}")]
    Refused(String),
    /// The peer sent something other than the next handshake step.
    #[error("unexpected handshake message: {0}")]
    Unexpected(&'static str),
    /// The handshake did not finish in time.
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A fetch over a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: HandshakeError,
    },
    /// The fetch's deadline passed before its last page arrived.
    #[error("deadline passed after {pages} pages")]
    Deadline { pages: usize },
    /// The connection went away (peer died, or a frame error closed it).
    #[error("link to {addr} closed: {reason}")]
    Closed { addr: SocketAddr, reason: String },
    /// The peer sent a page that does not fit what was asked.
    #[error("protocol violation by {addr}: {reason}")]
    Protocol { addr: SocketAddr, reason: String },
    /// The peer's source failed to lease pages.
    #[error("peer could not serve: {0}")]
    Remote(String),
    /// The fetch's own [`crate::PageSink`] refused a page: a local fault, not the peer's.
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A [`crate::PageSource`] could not lease pages.
#[derive(Debug, thiserror::Error)]
#[error("page source: {0}")]
pub struct SourceError(pub String);

/// A [`crate::PageSink`] could not store a page.
#[derive(Debug, thiserror::Error)]
#[error("page sink: {0}")]
pub struct SinkError(pub String);
