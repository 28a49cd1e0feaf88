//! `release`: ends a lookup lease.

use crate::protocol::{ErrorCode, ProtoError, ReleaseReply, ReleaseRequest, ReplyBody};
use crate::session::SessionState;

/// Unpins a lease this session took with `lookup`.
pub async fn handle(state: &SessionState, req: ReleaseRequest) -> Result<ReplyBody, ProtoError> {
    let owner = state.id;
    let released = state
        .ctx
        .pools
        .release(owner, req.lease)
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
