//! `hello`: who the node is and what it accepts.

use crate::context::NodeContext;
use crate::protocol::{HelloReply, HelloRequest, ProtoError, ReplyBody, PROTOCOL_VERSION};

/// Answers `hello`; the version itself was checked when the frame was decoded.
pub fn handle(ctx: &NodeContext, req: &HelloRequest) -> Result<ReplyBody, ProtoError> {
    tracing::info!(client = %req.client, "hello");
    Ok(ReplyBody::Hello(HelloReply {
        protocol: PROTOCOL_VERSION,
        node: concat!("pegaflow-node ", env!("CARGO_PKG_VERSION")).to_string(),
        dma: ctx.dma().to_string(),
        pool_bytes: ctx.metrics.pool_capacity_bytes.get().max(0) as u64,
        max_frame_bytes: ctx.max_frame_bytes,
    }))
}
