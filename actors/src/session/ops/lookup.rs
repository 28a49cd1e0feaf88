//! `lookup`: the longest held prefix, optionally pinned until `release`. With the fabric on,
//! the prefix goes on through what peers' digests claim after the local hits.

use super::parse_keys;
use crate::protocol::{LookupReply, LookupRequest, ProtoError, ReplyBody};
use crate::session::SessionState;

/// Answers `lookup` from the pools' indexes.
pub async fn handle(state: &SessionState, req: LookupRequest) -> Result<ReplyBody, ProtoError> {
    let keys = parse_keys(&req.keys)?;
    let asked = keys.len() as u64;
    let lease_for = req.lease.then_some(state.id);
    let outcome = state.ctx.pools.lookup(&keys, lease_for).await?;
    let remote_hits = match &state.ctx.peers {
        Some(peers) => keys
            .get(outcome.hits as usize..)
            .filter(|missed| !missed.is_empty())
            .map_or(0, |missed| peers.remote_hits(missed)),
        None => 0,
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
