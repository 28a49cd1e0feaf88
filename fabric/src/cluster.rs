//! The cluster handle: joins the gossip, publishes this node's advert and digest, keeps a
//! decoded view of the live peers, and answers "who may hold these keys, nearest first".
//!
//! Three tasks run behind the handle and stop when it is dropped:
//! - chitchat's server (UDP gossip, failure detection);
//! - the publisher, which owns the [`LocalDigest`]: key updates arrive on a channel (so the
//!   pool never waits for gossip) and dirty shards are written to chitchat once per gossip
//!   interval, or at once on [`Cluster::flush`], with a stamp saying when the digest was last
//!   current (readers report their copy's age from it);
//! - the view builder, which turns chitchat's live-node snapshots into [`Member`]s (reusing
//!   unchanged shards), publishes the view for lock-free readers and emits [`MemberChange`]s.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use chitchat::transport::UdpTransport;
use chitchat::{spawn_chitchat, Chitchat, ChitchatHandle, ChitchatId, NodeState};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::change::{ChangeStream, MemberChange, CHANGE_BUFFER};
use crate::digest::{LocalDigest, RemoteDigest};
use crate::error::FabricError;
use crate::member::{self, Member, NodeId};
use crate::options::FabricOptions;
use crate::ranking::{rank_candidates, Candidate, PeerStats};
use crate::BlockKey;

/// Live peers as last decoded from gossip (self excluded).
#[derive(Default)]
struct View {
    members: BTreeMap<NodeId, Arc<Member>>,
}

/// Work for the publisher task.
enum Command {
    Keys {
        added: Vec<BlockKey>,
        removed: Vec<BlockKey>,
    },
    Load(f32),
    Flush(oneshot::Sender<()>),
}

/// Handle on this node's cluster membership; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    me: Arc<Member>,
    chitchat: ChitchatHandle,
    view: watch::Receiver<Arc<View>>,
    changes: broadcast::Sender<MemberChange>,
    commands: mpsc::UnboundedSender<Command>,
    peers: Mutex<HashMap<NodeId, PeerStats>>,
    failure_timeout: Duration,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.chitchat.abort();
    }
}

impl Cluster {
    /// Joins the cluster of `options`, advertising `link_addr` as where peers fetch pages.
    pub async fn join(
        options: &FabricOptions,
        link_addr: std::net::SocketAddr,
    ) -> Result<Cluster, FabricError> {
        let shape = options.digest_shape();
        let generation = member::unix_millis(SystemTime::now());
        let me = Arc::new(Member {
            node_id: NodeId::from(options.node_id.as_str()),
            generation,
            link_addr,
            zone: options.zone.clone(),
            host: options.host.clone(),
            capacity_bytes: options.capacity_bytes,
            load: 0.0,
            digest: Arc::new(RemoteDigest::new(shape)),
            digest_stamp_ms: None,
        });
        let config = options.chitchat_config(generation);
        let self_id = config.chitchat_id.clone();
        let chitchat = spawn_chitchat(config, member::initial_keys(&me), &UdpTransport)
            .await
            .map_err(|e| FabricError::Gossip {
                addr: options.gossip_listen,
                reason: format!("{e:#}"),
            })?;
        let live = chitchat.chitchat().lock().await.live_nodes_watcher();

        let (view_tx, view_rx) = watch::channel(Arc::new(View::default()));
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(view_loop(live, self_id, view_tx, changes.clone())),
            tokio::spawn(publish_loop(
                chitchat.chitchat(),
                LocalDigest::new(shape),
                command_rx,
                options.gossip_interval,
            )),
        ];
        tracing::info!(
            node = %me.node_id,
            cluster = options.cluster_id,
            gossip = %options.gossip_advertise,
            link = %link_addr,
            digest_shards = shape.shards,
            digest_bytes = shape.gossip_bytes(),
            "joined fabric"
        );
        Ok(Cluster {
            inner: Arc::new(Inner {
                me,
                chitchat,
                view: view_rx,
                changes,
                commands,
                peers: Mutex::new(HashMap::new()),
                failure_timeout: options.failure_timeout,
                tasks,
            }),
        })
    }

    /// This node as it advertises itself (its digest is published, not held here).
    pub fn me(&self) -> &Member {
        &self.inner.me
    }

    /// Live peers, self excluded.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.inner.view.borrow().members.values().cloned().collect()
    }

    /// One live peer.
    pub fn member(&self, node: &NodeId) -> Option<Arc<Member>> {
        self.inner.view.borrow().members.get(node).cloned()
    }

    /// Subscribes to membership changes from now on.
    pub fn subscribe(&self) -> ChangeStream {
        ChangeStream::new(self.inner.changes.subscribe())
    }

    /// Records keys this node now holds (`added`) or no longer holds (`removed`). Never blocks;
    /// peers see the change within a gossip interval plus propagation.
    pub fn publish_keys(&self, added: &[BlockKey], removed: &[BlockKey]) {
        if added.is_empty() && removed.is_empty() {
            return;
        }
        self.send(Command::Keys {
            added: added.to_vec(),
            removed: removed.to_vec(),
        });
    }

    /// Publishes this node's load (0 idle .. 1 saturated), quantised to 1 %.
    pub fn set_load(&self, load: f32) {
        self.send(Command::Load(load));
    }

    /// Writes pending digest and load changes to gossip now rather than at the next tick.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Flush(tx));
        // An error means the publisher is gone, i.e. the cluster is shutting down.
        let _ = rx.await;
    }

    /// Peers whose digest claims a prefix of `keys`, nearest first (see [`crate::ranking`]).
    pub fn candidates(&self, keys: &[BlockKey]) -> Vec<Candidate> {
        let view = Arc::clone(&self.inner.view.borrow());
        let peers = self.peers();
        rank_candidates(
            keys,
            &self.inner.me.host,
            &self.inner.me.zone,
            view.members.values(),
            &peers,
        )
    }

    /// Feeds one measured round trip to `node` into its ranking.
    pub fn observe_rtt(&self, node: &NodeId, rtt: Duration) {
        self.peers()
            .entry(node.clone())
            .or_default()
            .observe_rtt(rtt);
    }

    /// Sets the load this node observes on its link to `node` (e.g. fetches in flight over
    /// the link's capacity), added to the peer's own gossiped load in the ranking.
    pub fn observe_load(&self, node: &NodeId, load: f32) {
        self.peers().entry(node.clone()).or_default().observed_load = load.max(0.0);
    }

    /// What this node measured about `node`.
    pub fn peer_stats(&self, node: &NodeId) -> PeerStats {
        self.peers().get(node).copied().unwrap_or_default()
    }

    /// The configured failure-detection window.
    pub fn failure_timeout(&self) -> Duration {
        self.inner.failure_timeout
    }

    /// Stops gossiping; peers declare this node dead within their failure timeout.
    pub async fn leave(&self) {
        if let Err(e) = self.inner.chitchat.initiate_shutdown() {
            tracing::debug!(error = %e, "gossip already stopped");
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, PeerStats>> {
        // The map holds plain numbers; a panic elsewhere cannot leave it inconsistent.
        self.inner
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, command: Command) {
        if self.inner.commands.send(command).is_err() {
            tracing::debug!("fabric publisher stopped; update dropped");
        }
    }
}

/// Owns the local digest; writes dirty shards and load to gossip once per interval.
async fn publish_loop(
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    mut digest: LocalDigest,
    mut commands: mpsc::UnboundedReceiver<Command>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut load = None;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Keys { added, removed }) => {
                    added.iter().for_each(|k| digest.insert(k));
                    removed.iter().for_each(|k| digest.remove(k));
                }
                Some(Command::Load(l)) => load = Some(l),
                Some(Command::Flush(done)) => {
                    publish(&chitchat, &mut digest, load.take()).await;
                    let _ = done.send(());
                }
            },
            _ = tick.tick() => publish(&chitchat, &mut digest, load.take()).await,
        }
    }
}

async fn publish(
    chitchat: &tokio::sync::Mutex<Chitchat>,
    digest: &mut LocalDigest,
    load: Option<f32>,
) {
    let dirty = digest.take_dirty();
    let mut chitchat = chitchat.lock().await;
    let state = chitchat.self_node_state();
    for (shard, text) in &dirty {
        state.set(member::shard_key(*shard), text);
    }
    if let Some(load) = load {
        let (key, value) = member::load_entry(load);
        state.set(key, value);
    }
    // Stamped even when nothing changed: readers measure their copy's age from it.
    let (key, value) = member::digest_stamp_entry(SystemTime::now());
    state.set(key, value);
    tracing::trace!(
        shards = dirty.len(),
        keys = digest.len(),
        "digest published"
    );
}

/// Rebuilds the view on every chitchat live-set change and reports the differences.
async fn view_loop(
    mut live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    self_id: ChitchatId,
    view_tx: watch::Sender<Arc<View>>,
    changes: broadcast::Sender<MemberChange>,
) {
    loop {
        let previous = Arc::clone(&view_tx.borrow());
        let next = build_view(&live.borrow_and_update(), &self_id, &previous);
        for change in diff(&previous, &next) {
            match &change {
                MemberChange::Joined(m) => {
                    tracing::info!(peer = %m.node_id, link = %m.link_addr, zone = m.zone, "peer joined")
                }
                MemberChange::Left(id) => tracing::info!(peer = %id, "peer left"),
                MemberChange::Updated(_) => {}
            }
            // No subscriber is fine.
            let _ = changes.send(change);
        }
        view_tx.send_replace(Arc::new(next));
        if live.changed().await.is_err() {
            return;
        }
    }
}

fn build_view(
    states: &BTreeMap<ChitchatId, NodeState>,
    self_id: &ChitchatId,
    previous: &View,
) -> View {
    let mut members: BTreeMap<NodeId, Arc<Member>> = BTreeMap::new();
    for (id, state) in states {
        if id.node_id == self_id.node_id {
            continue;
        }
        let node = NodeId(Arc::clone(&id.node_id));
        // A restarted node may briefly appear twice; the newest generation wins.
        if members
            .get(&node)
            .is_some_and(|m| m.generation >= id.generation_id)
        {
            continue;
        }
        let old = previous.members.get(&node).map(Arc::as_ref);
        match Member::update_from(&id.node_id, id.generation_id, state, old) {
            Some(m) => {
                let reuse = old.filter(|o| {
                    o.same_advert(&m)
                        && Arc::ptr_eq(&o.digest, &m.digest)
                        && o.digest_stamp_ms == m.digest_stamp_ms
                });
                let member = match (reuse, previous.members.get(&node)) {
                    (Some(_), Some(old_arc)) => Arc::clone(old_arc),
                    _ => Arc::new(m),
                };
                members.insert(node, member);
            }
            None => tracing::warn!(peer = &*id.node_id, "peer advert unreadable; ignored"),
        }
    }
    View { members }
}

fn diff(previous: &View, next: &View) -> Vec<MemberChange> {
    let mut out = Vec::new();
    for (id, old) in &previous.members {
        match next.members.get(id) {
            None => out.push(MemberChange::Left(id.clone())),
            Some(new) if new.generation != old.generation => {
                out.push(MemberChange::Left(id.clone()));
                out.push(MemberChange::Joined(Arc::clone(new)));
            }
            Some(new) if !new.same_advert(old) => out.push(MemberChange::Updated(Arc::clone(new))),
            Some(_) => {}
        }
    }
    for (id, new) in &next.members {
        if !previous.members.contains_key(id) {
            out.push(MemberChange::Joined(Arc::clone(new)));
        }
    }
    out
}
