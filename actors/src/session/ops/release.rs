//! `release`: ends a lookup lease.

use crate::context::ask;
use crate::pool::PoolMsg;
use crate::protocol::{ErrorCode, ProtoError, ReleaseReply, ReleaseRequest, ReplyBody};
use crate::session::SessionState;

/// Unpins a lease this session took with `lookup`.
pub async fn handle(state: &SessionState, req: ReleaseRequest) -> Result<ReplyBody, ProtoError> {
    let owner = state.id;
    let released = ask(&state.ctx.pool, "pool", |reply| PoolMsg::Release {
        owner,
        lease: req.lease,
        reply,
    })
    .await?
    .ok_or_else(|| {
        ProtoError::new(
            ErrorCode::UnknownLease,
            format!(
                "field `lease`: lease {} is not held by this connection",
                req.lease
            ),
        )
    })?;
    Ok(ReplyBody::Release(ReleaseReply { released }))
}
