//! The node's side of the fabric (`pegaflow-fabric`, docs/fabric.md): it serves this node's
//! pool to peers, keeps the gossiped digest equal to the keys in pool memory, answers how much
//! of a missed prefix peers hold, and fetches those pages into the pool for a load.

mod fetch;
mod metrics;
mod source;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use pegaflow_config::FabricConfig;
use pegaflow_fabric::{Fabric, FabricError, FabricOptions, Member};
use pegaflow_gpu_dma::Arena;
use ractor::ActorRef;
use serde::{Deserialize, Serialize};

use crate::keys::BlockKey;
use crate::pool::{PoolMsg, ResidencyFeed};

pub use fetch::FetchSummary;
pub use metrics::FabricMetrics;
pub use source::{PeerLease, PoolPageSource};

/// Smallest page the digest is sized for: a 16-token block of a small model. A pool of mostly
/// larger pages over-sizes the digest a little, never under-sizes it.
const TYPICAL_MIN_PAGE_BYTES: u64 = 256 << 10;
/// Digest size bounds: at 1 % false positives, 1.2 bytes per key, so 12 KiB to 1.2 MiB.
const MIN_EXPECTED_KEYS: u64 = 10_000;
const MAX_EXPECTED_KEYS: u64 = 1_000_000;

/// A node's membership in the fabric.
pub struct Peers {
    fabric: Fabric,
    pool: ActorRef<PoolMsg>,
    arena: Arc<Arena>,
    fetch_timeout: Duration,
    /// How often the per-peer gauges (digest age) are refreshed: once per gossip round.
    gauge_period: Duration,
    metrics: Arc<FabricMetrics>,
}

/// The fabric as `/api/stats` and the dashboard show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FabricStats {
    pub node_id: String,
    /// Live peers, by name.
    pub peers: Vec<PeerView>,
    pub fetched_pages: u64,
    pub fetched_bytes: u64,
    pub served_pages: u64,
    pub false_positives: u64,
    pub fetch_failures: u64,
}

/// One peer as `/api/stats` and the dashboard show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub node_id: String,
    pub link_addr: String,
    pub zone: String,
    pub host: String,
    pub load: f32,
    /// Smoothed link round trip, once a fetch or ping measured one.
    pub rtt_ms: Option<f64>,
    /// Age of this node's copy of the peer's digest, once the peer's first stamp arrived.
    pub digest_age_s: Option<f64>,
    /// Page bytes fetched from the peer.
    pub bytes_received: u64,
    /// Page bytes served to the peer.
    pub bytes_sent: u64,
}

impl Peers {
    /// Joins the cluster of `config`, serving `arena` pages that `pool` pins, and tells the
    /// pool to report its resident keys to the digest from now on.
    pub async fn start(
        config: &FabricConfig,
        pool: ActorRef<PoolMsg>,
        arena: Arc<Arena>,
        metrics: FabricMetrics,
    ) -> Result<Arc<Peers>, FabricError> {
        let expected_keys =
            (arena.len() / TYPICAL_MIN_PAGE_BYTES).clamp(MIN_EXPECTED_KEYS, MAX_EXPECTED_KEYS);
        let options = FabricOptions::from_config(config, arena.len(), expected_keys)?;
        let metrics = Arc::new(metrics);
        let source = PoolPageSource::new(pool.clone(), arena.clone(), metrics.clone());
        let fabric = Fabric::start(options, Arc::new(source)).await?;
        let peers = Arc::new(Peers {
            fabric,
            pool: pool.clone(),
            arena,
            fetch_timeout: Duration::from_millis(config.fetch_timeout_ms),
            gauge_period: Duration::from_millis(config.gossip_interval_ms.max(1)),
            metrics,
        });
        tokio::spawn(watch_peers(Arc::downgrade(&peers)));
        let feed = Box::new(DigestFeed(peers.clone()));
        if pool.cast(PoolMsg::AttachFeed { feed }).is_err() {
            tracing::warn!("pool stopped before the fabric started; nothing will be advertised");
        }
        tracing::info!(
            node = %peers.fabric.cluster().me().node_id,
            link = %peers.fabric.link_addr(),
            expected_keys,
            "joined the fabric"
        );
        Ok(peers)
    }

    /// This node's name in the cluster.
    pub fn node_id(&self) -> String {
        self.fabric.cluster().me().node_id.to_string()
    }

    /// How many keys after `keys[0]` (inclusive) some peer claims to hold: the most any
    /// candidate claims, since a load falls through candidates in rank order.
    pub fn remote_hits(&self, keys: &[BlockKey]) -> u32 {
        let best = self
            .fabric
            .cluster()
            .candidates(keys)
            .iter()
            .map(|c| c.claimed)
            .max()
            .unwrap_or(0);
        best.min(keys.len()) as u32
    }

    /// Each peer whose digest claims a prefix of `keys`, by name, with the leading keys it
    /// claims, nearest first: where the P/D router learns which host already holds a prompt
    /// (`/api/holders`). A claim may be a false positive of the digest.
    pub fn claimed_prefixes(&self, keys: &[BlockKey]) -> Vec<(String, u32)> {
        self.fabric
            .cluster()
            .candidates(keys)
            .iter()
            .map(|c| {
                (
                    c.member.node_id.to_string(),
                    c.claimed.min(keys.len()) as u32,
                )
            })
            .collect()
    }

    /// What `/api/stats` reports about the fabric.
    pub fn stats(&self) -> FabricStats {
        let m = &self.metrics;
        FabricStats {
            node_id: self.node_id(),
            peers: self.view(),
            fetched_pages: m.fetch_pages_total.get(),
            fetched_bytes: m.fetch_bytes_total.get(),
            served_pages: m.served_pages_total.get(),
            false_positives: m.fetch_false_positives_total.get(),
            fetch_failures: m.fetch_failures_total.get(),
        }
    }

    /// Live peers, by name for a stable display.
    pub fn view(&self) -> Vec<PeerView> {
        let cluster = self.fabric.cluster();
        let now = SystemTime::now();
        let mut peers: Vec<PeerView> = cluster
            .members()
            .iter()
            .map(|member| {
                let rtt = cluster.peer_stats(&member.node_id).rtt;
                let bytes = self.metrics.bytes_with(&member.node_id.to_string());
                peer_view(member, rtt, member.digest_age(now), bytes)
            })
            .collect();
        peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        peers
    }

    /// Sets each live peer's RTT gauge to what this node measured (a fetch may have added a
    /// sample).
    fn publish_rtts(&self) {
        let cluster = self.fabric.cluster();
        for member in cluster.members() {
            if let Some(rtt) = cluster.peer_stats(&member.node_id).rtt {
                self.metrics.peer_rtt(&member.node_id.to_string(), rtt);
            }
        }
    }

    /// Sets the live-peer count and digest ages; drops the gauges of peers in `known` that
    /// left. Returns the live peers' names.
    fn refresh_gauges(&self, known: BTreeSet<String>) -> BTreeSet<String> {
        let members = self.fabric.cluster().members();
        self.metrics.peers.set(members.len() as i64);
        let now = SystemTime::now();
        let mut live = BTreeSet::new();
        for member in &members {
            let name = member.node_id.to_string();
            if let Some(age) = member.digest_age(now) {
                self.metrics.peer_digest_age(&name, age);
            }
            live.insert(name);
        }
        for gone in known.difference(&live) {
            self.metrics.forget_peer(gone);
        }
        live
    }

    /// Publishes pending digest changes now (tests; shutdown).
    pub async fn flush(&self) {
        self.fabric.cluster().flush().await;
    }

    /// Leaves the gossip so peers stop asking this node; links keep serving until exit.
    pub async fn leave(&self) {
        self.fabric.leave().await;
    }
}

/// Keeps the membership gauges true until the node stops: `pegaflow_fabric_peers` on every
/// change, each live peer's digest age once per gossip round, and a departed peer's gauges
/// dropped.
async fn watch_peers(peers: Weak<Peers>) {
    let Some((mut changes, period)) = peers
        .upgrade()
        .map(|p| (p.fabric.cluster().subscribe(), p.gauge_period))
    else {
        return;
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known = BTreeSet::new();
    loop {
        let Some(peers) = peers.upgrade() else { return };
        known = peers.refresh_gauges(known);
        drop(peers);
        tokio::select! {
            change = changes.next() => if change.is_none() { return },
            _ = tick.tick() => {}
        }
    }
}

fn peer_view(
    member: &Member,
    rtt: Option<Duration>,
    digest_age: Option<Duration>,
    (bytes_received, bytes_sent): (u64, u64),
) -> PeerView {
    PeerView {
        node_id: member.node_id.to_string(),
        link_addr: member.link_addr.to_string(),
        zone: member.zone.clone(),
        host: member.host.clone(),
        load: member.load,
        rtt_ms: rtt.map(|d| d.as_secs_f64() * 1e3),
        digest_age_s: digest_age.map(|d| d.as_secs_f64()),
        bytes_received,
        bytes_sent,
    }
}

/// Forwards the pool's resident-key changes to the gossiped digest.
struct DigestFeed(Arc<Peers>);

impl ResidencyFeed for DigestFeed {
    fn changed(&self, added: &[BlockKey], removed: &[BlockKey]) {
        self.0.fabric.cluster().publish_keys(added, removed);
    }
}
