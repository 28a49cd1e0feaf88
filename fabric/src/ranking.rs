//! Which peers to ask for a missed prefix, nearest first (docs/design.md §6).
//!
//! Order: same host, then same zone, then lowest measured round-trip time (peers never
//! measured come after measured ones), then least load, then node id so the order is stable.
//! A candidate's `claimed` prefix comes from its digest and may be a false positive; the caller
//! tries candidates in order and falls through on a miss.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::member::{Member, NodeId};
use crate::BlockKey;

/// Weight of a new RTT sample in the moving average: smooths one slow round trip without
/// hiding a peer that became slow.
const RTT_ALPHA: f64 = 0.25;

/// What this node measured about one peer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PeerStats {
    /// Smoothed round-trip time; `None` until first measured.
    pub rtt: Option<Duration>,
    /// Link load observed from here (e.g. fetches in flight), added to the peer's own load.
    pub observed_load: f32,
}

impl PeerStats {
    /// Folds one RTT sample into the moving average.
    pub fn observe_rtt(&mut self, sample: Duration) {
        self.rtt = Some(match self.rtt {
            None => sample,
            Some(avg) => avg.mul_f64(1.0 - RTT_ALPHA) + sample.mul_f64(RTT_ALPHA),
        });
    }
}

/// A peer that may hold a prefix of the keys asked about.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub member: Arc<Member>,
    /// Leading keys its digest claims (at least 1).
    pub claimed: usize,
    pub same_host: bool,
    pub same_zone: bool,
    pub rtt: Option<Duration>,
    /// Its gossiped load plus what we observe.
    pub load: f32,
}

/// Ranks the `members` whose digest claims at least the first of `keys`, as seen from a node
/// on `host` in `zone`.
pub fn rank_candidates<'a>(
    keys: &[BlockKey],
    host: &str,
    zone: &str,
    members: impl IntoIterator<Item = &'a Arc<Member>>,
    stats: &HashMap<NodeId, PeerStats>,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = members
        .into_iter()
        .filter_map(|member| {
            let claimed = member.digest.leading_run(keys);
            if claimed == 0 {
                return None;
            }
            let peer = stats.get(&member.node_id).copied().unwrap_or_default();
            Some(Candidate {
                claimed,
                same_host: !host.is_empty() && member.host == host,
                same_zone: !zone.is_empty() && member.zone == zone,
                rtt: peer.rtt,
                load: member.load + peer.observed_load,
                member: Arc::clone(member),
            })
        })
        .collect();
    out.sort_by(compare);
    out
}

fn compare(a: &Candidate, b: &Candidate) -> Ordering {
    b.same_host
        .cmp(&a.same_host)
        .then(b.same_zone.cmp(&a.same_zone))
        .then(match (a.rtt, b.rtt) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then(a.load.total_cmp(&b.load))
        .then(a.member.node_id.cmp(&b.member.node_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{DigestShape, LocalDigest, RemoteDigest};

    fn key(i: u8) -> BlockKey {
        [i; 32]
    }

    fn member(id: &str, host: &str, zone: &str, load: f32, holds: &[BlockKey]) -> Arc<Member> {
        let shape = DigestShape::for_capacity(1000, 0.01);
        let mut local = LocalDigest::new(shape);
        for k in holds {
            local.insert(k);
        }
        let mut digest = RemoteDigest::new(shape);
        for (shard, text) in local.take_dirty() {
            let words = crate::digest::decode_shard(&text).expect("own encoding");
            digest.set_shard(shard as usize, 1, words);
        }
        Arc::new(Member {
            node_id: NodeId::from(id),
            generation: 1,
            link_addr: "127.0.0.1:1".parse().expect("addr"),
            zone: zone.to_owned(),
            host: host.to_owned(),
            capacity_bytes: 0,
            load,
            digest: Arc::new(digest),
            digest_stamp_ms: None,
        })
    }

    fn order(cands: &[Candidate]) -> Vec<&str> {
        cands.iter().map(|c| &*c.member.node_id.0).collect()
    }

    #[test]
    fn nearest_first_then_rtt_then_load() {
        let keys = [key(1), key(2)];
        let members = vec![
            member("far-slow", "h9", "z9", 0.0, &keys),
            member("far-fast", "h8", "z9", 0.9, &keys),
            member("zone-busy", "h2", "z1", 0.8, &keys),
            member("zone-idle", "h3", "z1", 0.1, &keys),
            member("host", "h1", "z2", 1.0, &keys[..1]),
            member("none", "h1", "z1", 0.0, &[key(3)]),
        ];
        let mut stats = HashMap::new();
        stats
            .entry(NodeId::from("far-fast"))
            .or_insert_with(PeerStats::default)
            .observe_rtt(Duration::from_micros(50));
        stats
            .entry(NodeId::from("far-slow"))
            .or_insert_with(PeerStats::default)
            .observe_rtt(Duration::from_micros(900));
        let ranked = rank_candidates(&keys, "h1", "z1", &members, &stats);
        assert_eq!(
            order(&ranked),
            ["host", "zone-idle", "zone-busy", "far-fast", "far-slow"]
        );
        assert_eq!(ranked[0].claimed, 1);
        assert_eq!(ranked[1].claimed, 2);
    }

    #[test]
    fn unmeasured_peers_come_after_measured_ones_and_empty_zone_matches_nobody() {
        let keys = [key(1)];
        let members = vec![
            member("a", "", "", 0.0, &keys),
            member("b", "", "", 0.5, &keys),
        ];
        let mut stats = HashMap::new();
        stats
            .entry(NodeId::from("b"))
            .or_insert_with(PeerStats::default)
            .observe_rtt(Duration::from_millis(1));
        let ranked = rank_candidates(&keys, "", "", &members, &stats);
        assert_eq!(order(&ranked), ["b", "a"]);
        assert!(!ranked[0].same_zone && !ranked[0].same_host);
    }

    #[test]
    fn rtt_is_smoothed() {
        let mut s = PeerStats::default();
        s.observe_rtt(Duration::from_millis(4));
        s.observe_rtt(Duration::from_millis(8));
        assert_eq!(s.rtt, Some(Duration::from_millis(5)));
    }
}
