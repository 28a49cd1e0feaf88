//! `lookup`: the longest held prefix, optionally pinned until `release`. With the fabric on,
//! the prefix goes on through what peers' digests claim after the local hits.

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
    // Peers are asked only about what the pool misses, so only then are the keys needed again.
    let all_keys = state.ctx.peers.as_ref().map(|_| keys.clone());
    let outcome = ask(&state.ctx.pool, "pool", |reply| PoolMsg::Lookup {
        keys,
        lease_for,
        reply,
    })
    .await?;
    let remote_hits = match (&state.ctx.peers, all_keys) {
        (Some(peers), Some(all)) => all
            .get(outcome.hits as usize..)
            .filter(|missed| !missed.is_empty())
            .map_or(0, |missed| peers.remote_hits(missed)),
        _ => 0,
    };
    let hits = outcome.hits + remote_hits;
    state.ctx.metrics.lookup_done(
        asked,
        u64::from(hits),
        u64::from(outcome.ssd_hits),
        u64::from(remote_hits),
    );
    Ok(ReplyBody::Lookup(LookupReply {
        hits,
        lease: outcome.lease,
        ssd_hits: outcome.ssd_hits,
        remote_hits,
    }))
}
