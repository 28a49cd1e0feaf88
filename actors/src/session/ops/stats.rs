//! `stats`: the same document as `GET /api/stats`.

use crate::context::NodeContext;
use crate::protocol::{ProtoError, ReplyBody, StatsReply};

/// Answers `stats`.
pub async fn handle(ctx: &NodeContext) -> Result<ReplyBody, ProtoError> {
    Ok(ReplyBody::Stats(StatsReply {
        stats: Box::new(ctx.stats().await?),
    }))
}
