//! What a node advertises, and the only place that knows the gossip key names.
//!
//! A node's gossip state is a handful of small keys (link address, zone, host, capacity, load,
//! digest shape, the digest's publication stamp) plus one key per digest shard. [`Member::update_from`] turns a chitchat node
//! state into a [`Member`], reusing the decoded shards whose gossip version did not change, so
//! a peer saving one block costs its readers one shard decode, not the whole digest.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::NodeState;

use crate::digest::{decode_shard, DigestShape, RemoteDigest};

const KEY_LINK: &str = "link";
const KEY_ZONE: &str = "zone";
const KEY_HOST: &str = "host";
const KEY_CAPACITY: &str = "capacity";
const KEY_LOAD: &str = "load";
const KEY_DIGEST: &str = "digest";
const KEY_DIGEST_AT: &str = "digest_at";
const SHARD_PREFIX: &str = "digest:";

/// Gossip key of digest shard `index`.
pub(crate) fn shard_key(index: u32) -> String {
    format!("{SHARD_PREFIX}{index:05}")
}

/// The keys a node publishes at start, before any shard.
pub(crate) fn initial_keys(me: &Member) -> Vec<(String, String)> {
    vec![
        (KEY_LINK.to_owned(), me.link_addr.to_string()),
        (KEY_ZONE.to_owned(), me.zone.clone()),
        (KEY_HOST.to_owned(), me.host.clone()),
        (KEY_CAPACITY.to_owned(), me.capacity_bytes.to_string()),
        (KEY_LOAD.to_owned(), load_text(me.load)),
        (KEY_DIGEST.to_owned(), me.digest.shape().encode()),
    ]
}

/// Gossip key and value for a load update. Load is quantised to 1 %, so jitter below that
/// does not create gossip versions.
pub(crate) fn load_entry(load: f32) -> (&'static str, String) {
    (KEY_LOAD, load_text(load))
}

/// Gossip key and value stamping the digest as current at `now` (milliseconds since the Unix
/// epoch), written on every publication tick so readers can tell how old their copy is.
pub(crate) fn digest_stamp_entry(now: SystemTime) -> (&'static str, String) {
    (KEY_DIGEST_AT, unix_millis(now).to_string())
}

/// Milliseconds since the Unix epoch (zero for a clock set before it).
pub(crate) fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

fn load_text(load: f32) -> String {
    format!("{:.2}", load.clamp(0.0, 1.0))
}

/// A node is live for the fabric only once its link address is gossiped: without it nobody can
/// fetch from it.
pub(crate) fn is_usable(state: &NodeState) -> bool {
    state
        .get(KEY_LINK)
        .is_some_and(|addr| addr.parse::<SocketAddr>().is_ok())
}

/// Stable node name (from `fabric.node_id`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub Arc<str>);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        NodeId(id.into())
    }
}

/// One node of the cluster as its gossip describes it.
#[derive(Clone, Debug)]
pub struct Member {
    pub node_id: NodeId,
    /// Changes on every restart, so a restarted node is a new member.
    pub generation: u64,
    /// Where peers fetch pages (TCP link).
    pub link_addr: SocketAddr,
    /// Locality label; empty means unknown and matches nobody.
    pub zone: String,
    /// Host identity: nodes on the same machine fetch from each other first.
    pub host: String,
    /// Pool capacity in bytes.
    pub capacity_bytes: u64,
    /// Self-reported load, 0 (idle) to 1 (saturated).
    pub load: f32,
    /// The keys it may hold.
    pub digest: Arc<RemoteDigest>,
    /// When, by its own clock (ms since the Unix epoch), it last stamped its digest current;
    /// `None` until its first publication tick reaches this node.
    pub digest_stamp_ms: Option<u64>,
}

impl Member {
    /// Reads a member from its gossip state, reusing `previous`'s decoded shards where their
    /// version did not change. `None` when a required key is missing or malformed.
    pub(crate) fn update_from(
        node_id: &str,
        generation: u64,
        state: &NodeState,
        previous: Option<&Member>,
    ) -> Option<Member> {
        let link_addr = state.get(KEY_LINK)?.parse().ok()?;
        let shape = state
            .get(KEY_DIGEST)
            .and_then(DigestShape::decode)
            .unwrap_or(DigestShape {
                shards: 1,
                hashes: 1,
            });
        let reusable = previous
            .filter(|p| p.generation == generation && p.digest.shape() == shape)
            .map(|p| &p.digest);
        let mut digest = match reusable {
            Some(d) => RemoteDigest::clone(d),
            None => RemoteDigest::new(shape),
        };
        for index in 0..shape.shards {
            let Some(versioned) = state.get_versioned(&shard_key(index)) else {
                continue;
            };
            if digest.shard_version(index as usize) == Some(versioned.version) {
                continue;
            }
            match decode_shard(&versioned.value) {
                Some(words) => digest.set_shard(index as usize, versioned.version, words),
                None => tracing::warn!(
                    peer = node_id,
                    shard = index,
                    "malformed digest shard ignored"
                ),
            }
        }
        let digest = match reusable {
            Some(old) if digest_unchanged(old, &digest, shape) => Arc::clone(old),
            _ => Arc::new(digest),
        };
        Some(Member {
            node_id: NodeId::from(node_id),
            generation,
            link_addr,
            zone: state.get(KEY_ZONE).unwrap_or_default().to_owned(),
            host: state.get(KEY_HOST).unwrap_or_default().to_owned(),
            capacity_bytes: state
                .get(KEY_CAPACITY)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
            load: state
                .get(KEY_LOAD)
                .and_then(|l| l.parse().ok())
                .unwrap_or(0.0),
            digest,
            digest_stamp_ms: state.get(KEY_DIGEST_AT).and_then(|at| at.parse().ok()),
        })
    }

    /// How old this node's copy of the member's digest is at `now`: the time since the member
    /// last stamped it current, by the two hosts' clocks (skew between them adds in; a copy
    /// stamped in this host's future reads as zero).
    pub fn digest_age(&self, now: SystemTime) -> Option<Duration> {
        let stamp = self.digest_stamp_ms?;
        Some(Duration::from_millis(
            unix_millis(now).saturating_sub(stamp),
        ))
    }

    /// Whether anything but the digest differs (what subscribers of changes care about).
    pub(crate) fn same_advert(&self, other: &Member) -> bool {
        self.generation == other.generation
            && self.link_addr == other.link_addr
            && self.zone == other.zone
            && self.host == other.host
            && self.capacity_bytes == other.capacity_bytes
            && self.load == other.load
    }
}

fn digest_unchanged(old: &RemoteDigest, new: &RemoteDigest, shape: DigestShape) -> bool {
    (0..shape.shards as usize).all(|i| old.shard_version(i) == new.shard_version(i))
}
