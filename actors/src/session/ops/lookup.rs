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
    let metrics = &state.ctx.metrics;
    metrics.lookup_blocks_total.inc_by(asked);
    metrics
        .lookup_hit_blocks_total
        .inc_by(u64::from(outcome.hits));
    metrics
        .lookup_miss_blocks_total
        .inc_by(asked - u64::from(outcome.hits));
    Ok(ReplyBody::Lookup(LookupReply {
        hits: outcome.hits,
        lease: outcome.lease,
        ssd_hits: outcome.ssd_hits,
    }))
}
