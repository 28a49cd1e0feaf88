//! `hello`: who the node is and what it accepts.

use crate::context::NodeContext;
use crate::protocol::handshake::{check_client_version, PACKAGE_VERSION};
use crate::protocol::{HelloReply, HelloRequest, ProtoError, ReplyBody, PROTOCOL_VERSION};

/// Answers `hello`, or refuses a client whose package version cannot work with this node (the
/// protocol version was checked when the frame was decoded).
pub fn handle(ctx: &NodeContext, req: &HelloRequest) -> Result<ReplyBody, ProtoError> {
    if let Some(version) = &req.version {
        if let Err(error) = check_client_version(version) {
            tracing::warn!(client = %req.client, "hello refused: {}", error.message);
            return Err(error);
        }
    }
    tracing::info!(client = %req.client, version = req.version.as_deref(), "hello");
    Ok(ReplyBody::Hello(HelloReply {
        protocol: PROTOCOL_VERSION,
        node: format!("pegaflow-node {PACKAGE_VERSION}"),
        version: PACKAGE_VERSION.to_string(),
        dma: ctx.dma().to_string(),
        pool_bytes: ctx.metrics.pool_capacity_bytes.get().max(0) as u64,
        max_frame_bytes: ctx.max_frame_bytes,
    }))
}
