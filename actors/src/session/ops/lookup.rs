//! `lookup`: the longest held prefix, optionally pinned until `release`.

use super::parse_keys;
use crate::context::ask;
use crate::pool::PoolMsg;
use crate::protocol::{LookupReply, LookupRequest, ProtoError, ReplyBody};
use crate::session::SessionState;

/// Answers `lookup` from the pool's index.
pub async fn handle(state: &SessionState, req: LookupRequest) -> Result<ReplyBody, ProtoError> {
    let keys = parse_keys(&req.keys)?;
    let asked = keys.len() as u64;
    let lease_for = req.lease.then_some(state.id);
    let outcome = ask(&state.ctx.pool, "pool", |reply| PoolMsg::Lookup {
        keys,
        lease_for,
        reply,
    })
    .await?;
    state
        .ctx
        .metrics
        .lookup_done(asked, u64::from(outcome.hits), u64::from(outcome.ssd_hits));
    Ok(ReplyBody::Lookup(LookupReply {
        hits: outcome.hits,
        lease: outcome.lease,
        ssd_hits: outcome.ssd_hits,
    }))
}
