//! `PoolActor`: owns the page allocator, the key index, every lease over pool pages, and the
//! SSD tier below them.
//!
//! The arena bytes themselves are shared with the transfer actor (it is the DMA target); who
//! may touch which page is decided here alone, through leases: a save writes only extents
//! reserved for it, a load reads only pages pinned for it, and eviction only ever takes
//! pages nobody holds.
//!
//! With an SSD tier ([`crate::ssd`]), an evicted page is offered to it (copied out before its
//! extent is freed), a lookup counts SSD-resident keys as hits, and a load first promotes its
//! SSD-resident blocks into freshly reserved extents: the reads run off the actor, which is told
//! when they are done ([`PoolMsg::Promoted`]) and only then grants the load.

mod allocator;
mod index;
mod residency;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

pub use allocator::{Extent, ExtentAllocator};
pub use index::{PageEntry, PageIndex};
pub use residency::ResidencyFeed;

use crate::events::{EventSink, Medium};
use crate::keys::BlockKey;
use crate::metrics::Metrics;
use crate::ssd::reader::Promotion;
use crate::ssd::SsdTier;

/// Identifies who holds a lookup lease: one socket session.
pub type OwnerId = u64;
/// Identifies one lease (a lookup pin, a save reservation, or a load pin).
pub type LeaseId = u64;

/// Messages the pool answers.
pub enum PoolMsg {
    /// Longest held prefix of `keys`; pins it for `lease_for` when given.
    Lookup {
        keys: Vec<BlockKey>,
        lease_for: Option<OwnerId>,
        reply: RpcReplyPort<LookupOutcome>,
    },
    /// Which of `keys` this pool holds in memory or is writing: another pool of the host asks
    /// before it stores them, so a block is kept once per host.
    Holds {
        keys: Vec<BlockKey>,
        reply: RpcReplyPort<Vec<bool>>,
    },
    /// Reserves one extent per new key, evicting LRU pages as needed.
    ReserveSave {
        keys: Vec<BlockKey>,
        page_bytes: u64,
        reply: RpcReplyPort<SaveReservation>,
    },
    /// Publishes a reservation's pages (bytes copied, checksums computed); replies the count stored.
    CommitSave {
        lease: LeaseId,
        crcs: Vec<u32>,
        reply: RpcReplyPort<u32>,
    },
    /// Pins the longest held prefix of `keys` whose pages are `page_bytes` long, for a load,
    /// promoting SSD-resident blocks into memory first.
    AcquireLoad {
        keys: Vec<BlockKey>,
        page_bytes: u64,
        reply: RpcReplyPort<LoadGrant>,
    },
    /// Sent by the pool to itself: a load's promotions finished (`done`, one flag each).
    Promoted {
        pending: PendingLoad,
        done: Vec<bool>,
        reply: RpcReplyPort<LoadGrant>,
    },
    /// Writes the held pages of `keys` to SSD and syncs; replies how many of the distinct
    /// keys are then durable on SSD (0 without an SSD tier).
    Persist {
        keys: Vec<BlockKey>,
        reply: RpcReplyPort<u32>,
    },
    /// Pins the longest prefix of `keys` held in memory, for a peer's fetch; ended by
    /// [`PoolMsg::EndTransfer`]. SSD-only pages are not served to peers.
    LeaseForPeer {
        keys: Vec<BlockKey>,
        reply: RpcReplyPort<LoadGrant>,
    },
    /// From now on, tells `feed` every key entering or leaving memory; it first hears every
    /// key held now.
    AttachFeed {
        feed: Box<dyn ResidencyFeed>,
    },
    /// Ends a transfer's lease: aborts an uncommitted save or unpins a load.
    EndTransfer {
        lease: LeaseId,
    },
    /// Ends a lookup lease held by `owner`; replies the pages unpinned, `None` if not held.
    Release {
        owner: OwnerId,
        lease: LeaseId,
        reply: RpcReplyPort<Option<u32>>,
    },
    /// Ends every lookup lease of a session that went away.
    ReleaseOwner {
        owner: OwnerId,
    },
    Stats {
        reply: RpcReplyPort<PoolStats>,
    },
}

/// Answer to [`PoolMsg::Lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LookupOutcome {
    pub hits: u32,
    /// How many of the `hits` are on SSD only (a load promotes them first).
    pub ssd_hits: u32,
    pub lease: Option<LeaseId>,
}

/// What a save should do with each key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveSlot {
    /// Already stored (or being stored by another save): nothing to copy.
    Present,
    /// Copy the block into this extent.
    Write(Extent),
    /// No page could be freed: every page is leased.
    Dropped,
}

/// Answer to [`PoolMsg::ReserveSave`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveReservation {
    pub lease: LeaseId,
    pub slots: Vec<SaveSlot>,
}

/// Answer to [`PoolMsg::AcquireLoad`]: pages of the leading held keys, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadGrant {
    pub lease: LeaseId,
    pub pages: Vec<PageEntry>,
}

/// What [`PoolState::acquire_load`] decided.
pub enum LoadPlan {
    /// Every block of the prefix is in memory and pinned.
    Ready(LoadGrant),
    /// Some blocks must be read from SSD first; finish with [`PoolState::finish_load`].
    Promote(PendingLoad, Vec<Promotion>),
}

/// A load waiting for its promotions: its pinned pages and reserved extents, in key order.
pub struct PendingLoad {
    lease: LeaseId,
    steps: Vec<LoadStep>,
    page_bytes: u64,
}

enum LoadStep {
    Held(BlockKey, PageEntry),
    Promoting {
        key: BlockKey,
        extent: Extent,
        crc32c: u32,
    },
}

/// Pool occupancy, as `/api/stats` and `stats` report it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub leased_bytes: u64,
    pub pages: u64,
    pub leased_pages: u64,
    pub writing_pages: u64,
    pub evictions: u64,
}

enum Lease {
    /// Pages pinned by a lookup (`owner` set) or a load (`owner` none).
    Pinned {
        owner: Option<OwnerId>,
        keys: Vec<BlockKey>,
    },
    /// Extents reserved for a save that has not committed yet.
    Writing {
        pages: Vec<(BlockKey, Extent)>,
        page_bytes: u64,
    },
}

/// The pool's whole state; plain data so it is unit-testable without an actor.
pub struct PoolState {
    allocator: ExtentAllocator,
    index: PageIndex,
    leases: HashMap<LeaseId, Lease>,
    writing: HashSet<BlockKey>,
    writing_bytes: u64,
    /// Bytes of extents being filled from SSD.
    promoting_bytes: u64,
    next_lease: LeaseId,
    evictions: u64,
    metrics: Arc<Metrics>,
    ssd: Option<SsdTier>,
    feed: Option<Box<dyn ResidencyFeed>>,
    /// The NUMA node this pool's slice of the arena is on (the `numa_node` metric label).
    numa_node: u32,
    /// What [`PoolState::publish`] last added to the host-wide gauges.
    published: PoolStats,
    events: EventSink,
}

impl PoolState {
    /// An empty pool of `capacity` bytes handing out `align`-aligned extents, over `ssd` when
    /// the tier is on.
    pub fn new(capacity: u64, align: u64, metrics: Arc<Metrics>, ssd: Option<SsdTier>) -> Self {
        let whole = Extent {
            offset: 0,
            len: capacity,
        };
        Self::over(whole, 0, align, metrics, ssd)
    }

    /// An empty pool over the arena bytes of `span`, on NUMA node `numa_node`; see [`Self::new`].
    pub fn over(
        span: Extent,
        numa_node: u32,
        align: u64,
        metrics: Arc<Metrics>,
        ssd: Option<SsdTier>,
    ) -> Self {
        let mut state = Self {
            allocator: ExtentAllocator::over(span.offset, span.len, align),
            index: PageIndex::default(),
            leases: HashMap::new(),
            writing: HashSet::new(),
            writing_bytes: 0,
            promoting_bytes: 0,
            next_lease: 1,
            evictions: 0,
            metrics,
            ssd,
            feed: None,
            numa_node,
            published: PoolStats::default(),
            events: EventSink::off(),
        };
        state.publish();
        state
    }

    /// Reports every page entering or leaving memory to `events` (KV events).
    pub fn with_events(mut self, events: EventSink) -> Self {
        self.events = events;
        self
    }

    fn new_lease(&mut self, lease: Lease) -> LeaseId {
        let id = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(id, lease);
        id
    }

    /// See [`PoolMsg::Lookup`]. Memory is asked first, then the SSD tier; a lease pins the
    /// hits held in memory (SSD-resident ones have no page to pin).
    pub fn lookup(&mut self, keys: &[BlockKey], lease_for: Option<OwnerId>) -> LookupOutcome {
        let mut hits = 0usize;
        let mut ssd_hits = 0u32;
        for key in keys {
            if self.index.touch(key) {
                hits += 1;
            } else if self.ssd.as_ref().is_some_and(|ssd| ssd.contains(key)) {
                hits += 1;
                ssd_hits += 1;
            } else {
                break;
            }
        }
        if let Some(ssd) = &self.ssd {
            ssd.count_hits(ssd_hits);
        }
        let lease = match lease_for {
            Some(owner) if hits > 0 => {
                let pinned: Vec<BlockKey> = keys[..hits]
                    .iter()
                    .filter(|key| self.index.lease(key).is_some())
                    .copied()
                    .collect();
                Some(self.new_lease(Lease::Pinned {
                    owner: Some(owner),
                    keys: pinned,
                }))
            }
            _ => None,
        };
        self.publish();
        LookupOutcome {
            hits: hits as u32,
            ssd_hits,
            lease,
        }
    }

    /// See [`PoolMsg::Holds`].
    pub fn holds(&self, keys: &[BlockKey]) -> Vec<bool> {
        keys.iter()
            .map(|key| self.index.get(key).is_some() || self.writing.contains(key))
            .collect()
    }

    /// See [`PoolMsg::ReserveSave`].
    pub fn reserve_save(&mut self, keys: &[BlockKey], page_bytes: u64) -> SaveReservation {
        let mut pages = Vec::new();
        let mut seen = HashSet::new();
        let slots = keys
            .iter()
            .map(|key| {
                if !seen.insert(*key) || self.index.touch(key) || self.writing.contains(key) {
                    return SaveSlot::Present;
                }
                match self.allocate_evicting(page_bytes) {
                    Some(extent) => {
                        self.writing.insert(*key);
                        self.writing_bytes += extent.len;
                        pages.push((*key, extent));
                        SaveSlot::Write(extent)
                    }
                    None => SaveSlot::Dropped,
                }
            })
            .collect();
        let lease = self.new_lease(Lease::Writing { pages, page_bytes });
        self.publish();
        SaveReservation { lease, slots }
    }

    fn allocate_evicting(&mut self, bytes: u64) -> Option<Extent> {
        loop {
            if let Some(extent) = self.allocator.allocate(bytes) {
                return Some(extent);
            }
            let (key, victim) = self.index.evict_lru()?;
            self.tell_feed(&[], &[key]);
            if let Some(ssd) = self.ssd.as_mut() {
                ssd.spill(&key, &victim, victim.was_hit());
            }
            self.allocator.free(victim.extent);
            self.evictions += 1;
            self.metrics.pool_evictions_total.inc();
        }
    }

    /// See [`PoolMsg::CommitSave`]. `crcs` has one checksum per written page, in order.
    pub fn commit_save(&mut self, lease: LeaseId, crcs: &[u32]) -> u32 {
        let Some(Lease::Writing { pages, page_bytes }) =
            self.take_lease_if(lease, |l| matches!(l, Lease::Writing { .. }))
        else {
            return 0;
        };
        let mut added = Vec::with_capacity(pages.len());
        for (i, (key, extent)) in pages.into_iter().enumerate() {
            self.finish_writing(&key, extent);
            let Some(&crc) = crcs.get(i) else {
                self.allocator.free(extent);
                continue;
            };
            match self.index.insert(key, extent, page_bytes, crc) {
                Ok(()) => {
                    added.push(key);
                    if self.ssd.as_mut().is_some_and(|ssd| ssd.seen_before(&key)) {
                        self.index.touch(&key);
                    }
                }
                Err(extent) => self.allocator.free(extent),
            }
        }
        self.tell_feed(&added, &[]);
        self.publish();
        added.len() as u32
    }

    /// See [`PoolMsg::AcquireLoad`]. Pins the leading blocks held in memory and reserves an
    /// extent for each leading block held on SSD; stops at the first block in neither (or of
    /// another size, or with no room left).
    pub fn acquire_load(&mut self, keys: &[BlockKey], page_bytes: u64) -> LoadPlan {
        let mut pinned = Vec::new();
        let mut steps = Vec::new();
        let mut promotions = Vec::new();
        for key in keys {
            if let Some(entry) = self.index.get(key) {
                if entry.bytes != page_bytes {
                    break;
                }
                if let Some(entry) = self.index.lease(key) {
                    pinned.push(*key);
                    steps.push(LoadStep::Held(*key, entry));
                }
                continue;
            }
            let Some(location) = self.ssd.as_ref().and_then(|ssd| ssd.location(key)) else {
                break;
            };
            if location.entry.len != page_bytes {
                break;
            }
            let Some(extent) = self.allocate_evicting(page_bytes) else {
                break;
            };
            self.promoting_bytes += extent.len;
            promotions.push(Promotion {
                key: *key,
                location,
                arena_offset: extent.offset,
            });
            steps.push(LoadStep::Promoting {
                key: *key,
                extent,
                crc32c: location.entry.crc32c,
            });
        }
        let lease = self.new_lease(Lease::Pinned {
            owner: None,
            keys: pinned,
        });
        self.publish();
        let pending = PendingLoad {
            lease,
            steps,
            page_bytes,
        };
        if promotions.is_empty() {
            LoadPlan::Ready(self.finish_load(pending, &[]))
        } else {
            LoadPlan::Promote(pending, promotions)
        }
    }

    /// Completes a load once its promotions ran (`done`: one flag per promotion, in order):
    /// promoted pages join the index, and the grant covers the blocks up to the first failed
    /// promotion; pages pinned past it are unpinned, pages promoted past it stay cached.
    pub fn finish_load(&mut self, pending: PendingLoad, done: &[bool]) -> LoadGrant {
        let mut done = done.iter().copied();
        let mut pages = Vec::new();
        let mut pinned = Vec::new();
        let mut promoted = Vec::new();
        let mut broken = false;
        for step in pending.steps {
            match step {
                LoadStep::Held(key, _) if broken => self.index.unlease(&key),
                LoadStep::Held(key, entry) => {
                    pinned.push(key);
                    pages.push(entry);
                }
                LoadStep::Promoting {
                    key,
                    extent,
                    crc32c,
                } => {
                    self.promoting_bytes -= extent.len;
                    if !done.next().unwrap_or(false) {
                        self.allocator.free(extent);
                        broken = true;
                        continue;
                    }
                    // A save may have stored the same block meanwhile: keep its page.
                    match self.index.insert(key, extent, pending.page_bytes, crc32c) {
                        Ok(()) => promoted.push(key),
                        Err(extent) => self.allocator.free(extent),
                    }
                    if broken {
                        continue;
                    }
                    match self.index.lease(&key) {
                        Some(entry) => {
                            pinned.push(key);
                            pages.push(entry);
                        }
                        None => broken = true,
                    }
                }
            }
        }
        if let Some(Lease::Pinned { keys, .. }) = self.leases.get_mut(&pending.lease) {
            *keys = pinned;
        }
        self.tell_feed(&promoted, &[]);
        self.publish();
        LoadGrant {
            lease: pending.lease,
            pages,
        }
    }

    /// Hands a grant to its load; if the load is gone, its pins end here.
    fn send_grant(&mut self, reply: RpcReplyPort<LoadGrant>, grant: LoadGrant) {
        let lease = grant.lease;
        if reply.send(grant).is_err() {
            self.end_transfer(lease);
        }
    }

    /// See [`PoolMsg::LeaseForPeer`].
    pub fn lease_for_peer(&mut self, keys: &[BlockKey]) -> LoadGrant {
        let mut pinned = Vec::new();
        let mut pages = Vec::new();
        for key in keys {
            let Some(entry) = self.index.lease(key) else {
                break;
            };
            pinned.push(*key);
            pages.push(entry);
        }
        let lease = self.new_lease(Lease::Pinned {
            owner: None,
            keys: pinned,
        });
        self.publish();
        LoadGrant { lease, pages }
    }

    /// See [`PoolMsg::AttachFeed`].
    pub fn attach_feed(&mut self, feed: Box<dyn ResidencyFeed>) {
        feed.changed(&self.index.keys(), &[]);
        self.feed = Some(feed);
    }

    /// Tells the residency feed and KV events which keys entered and left memory.
    fn tell_feed(&self, added: &[BlockKey], removed: &[BlockKey]) {
        self.events.stored(Medium::Memory, added);
        self.events.removed(Medium::Memory, removed);
        if let Some(feed) = &self.feed {
            if !added.is_empty() || !removed.is_empty() {
                feed.changed(added, removed);
            }
        }
    }

    /// See [`PoolMsg::Persist`].
    pub fn persist(&mut self, keys: &[BlockKey], reply: RpcReplyPort<u32>) {
        let Some(ssd) = self.ssd.as_mut() else {
            let _ = reply.send(0);
            return;
        };
        let mut seen = HashSet::new();
        let mut durable = 0;
        let mut pages = Vec::new();
        for key in keys.iter().filter(|key| seen.insert(**key)) {
            if ssd.contains(key) {
                durable += 1;
            } else if let Some(entry) = self.index.get(key) {
                pages.push((*key, *entry));
            }
        }
        ssd.persist(pages, durable, reply);
    }

    /// See [`PoolMsg::EndTransfer`].
    pub fn end_transfer(&mut self, lease: LeaseId) {
        match self.take_lease_if(lease, |l| {
            !matches!(l, Lease::Pinned { owner: Some(_), .. })
        }) {
            Some(Lease::Writing { pages, .. }) => {
                for (key, extent) in pages {
                    self.finish_writing(&key, extent);
                    self.allocator.free(extent);
                }
            }
            Some(Lease::Pinned { keys, .. }) => self.unpin(&keys),
            None => {}
        }
        self.publish();
    }

    /// See [`PoolMsg::Release`].
    pub fn release(&mut self, owner: OwnerId, lease: LeaseId) -> Option<u32> {
        let taken = self.take_lease_if(
            lease,
            |l| matches!(l, Lease::Pinned { owner: Some(o), .. } if *o == owner),
        );
        let Some(Lease::Pinned { keys, .. }) = taken else {
            return None;
        };
        self.unpin(&keys);
        self.publish();
        Some(keys.len() as u32)
    }

    /// See [`PoolMsg::ReleaseOwner`].
    pub fn release_owner(&mut self, owner: OwnerId) {
        let held: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| matches!(l, Lease::Pinned { owner: Some(o), .. } if *o == owner))
            .map(|(id, _)| *id)
            .collect();
        for lease in held {
            self.release(owner, lease);
        }
    }

    /// Current occupancy.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            capacity_bytes: self.allocator.capacity(),
            used_bytes: self.allocator.capacity() - self.allocator.free_bytes(),
            leased_bytes: self.index.leased_bytes() + self.writing_bytes + self.promoting_bytes,
            pages: self.index.len() as u64,
            leased_pages: self.index.leased_pages() as u64,
            writing_pages: self.writing.len() as u64,
            evictions: self.evictions,
        }
    }

    fn take_lease_if(&mut self, lease: LeaseId, accept: impl Fn(&Lease) -> bool) -> Option<Lease> {
        if self.leases.get(&lease).is_some_and(accept) {
            self.leases.remove(&lease)
        } else {
            None
        }
    }

    fn finish_writing(&mut self, key: &BlockKey, extent: Extent) {
        self.writing.remove(key);
        self.writing_bytes -= extent.len;
    }

    fn unpin(&mut self, keys: &[BlockKey]) {
        for key in keys {
            self.index.unlease(key);
        }
    }

    /// Sets this pool's gauges and moves the host-wide ones (the sums over pools) by what
    /// changed since the last call.
    fn publish(&mut self) {
        let stats = self.stats();
        let (m, was) = (&self.metrics, &self.published);
        let delta = |now: u64, was: u64| now as i64 - was as i64;
        m.pool_capacity_bytes
            .add(delta(stats.capacity_bytes, was.capacity_bytes));
        m.pool_used_bytes
            .add(delta(stats.used_bytes, was.used_bytes));
        m.pool_leased_bytes
            .add(delta(stats.leased_bytes, was.leased_bytes));
        m.pool_pages.add(delta(stats.pages, was.pages));
        let node = [self.numa_node.to_string()];
        let node = [node[0].as_str()];
        m.numa_pool_capacity_bytes
            .with_label_values(&node)
            .set(stats.capacity_bytes as i64);
        m.numa_pool_used_bytes
            .with_label_values(&node)
            .set(stats.used_bytes as i64);
        m.numa_pool_pages
            .with_label_values(&node)
            .set(stats.pages as i64);
        self.published = stats;
    }
}

/// Ends a save's or load's lease when dropped, so a failed, cancelled or finished transfer
/// never leaks pages. Ending a lease that a commit already consumed is a no-op.
pub struct TransferLease {
    pool: ActorRef<PoolMsg>,
    lease: LeaseId,
}

impl TransferLease {
    /// Guards `lease` until this value is dropped.
    pub fn new(pool: ActorRef<PoolMsg>, lease: LeaseId) -> Self {
        Self { pool, lease }
    }

    /// The guarded lease.
    pub fn id(&self) -> LeaseId {
        self.lease
    }
}

impl Drop for TransferLease {
    fn drop(&mut self) {
        // A pool that is gone (shutdown) holds no leases any more.
        let _ = self.pool.cast(PoolMsg::EndTransfer { lease: self.lease });
    }
}

/// The actor wrapper around [`PoolState`].
pub struct PoolActor;

impl Actor for PoolActor {
    type Msg = PoolMsg;
    type State = PoolState;
    type Arguments = PoolState;

    async fn pre_start(
        &self,
        _myself: ActorRef<PoolMsg>,
        state: PoolState,
    ) -> Result<PoolState, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<PoolMsg>,
        message: PoolMsg,
        state: &mut PoolState,
    ) -> Result<(), ActorProcessingErr> {
        // A reply port whose caller went away is not an error of the pool.
        match message {
            PoolMsg::Lookup {
                keys,
                lease_for,
                reply,
            } => drop(reply.send(state.lookup(&keys, lease_for))),
            PoolMsg::Holds { keys, reply } => drop(reply.send(state.holds(&keys))),
            PoolMsg::ReserveSave {
                keys,
                page_bytes,
                reply,
            } => drop(reply.send(state.reserve_save(&keys, page_bytes))),
            PoolMsg::CommitSave { lease, crcs, reply } => {
                drop(reply.send(state.commit_save(lease, &crcs)))
            }
            PoolMsg::AcquireLoad {
                keys,
                page_bytes,
                reply,
            } => match state.acquire_load(&keys, page_bytes) {
                LoadPlan::Ready(grant) => state.send_grant(reply, grant),
                LoadPlan::Promote(pending, promotions) => match state.ssd.as_ref() {
                    Some(ssd) => {
                        let reads = ssd.promote(promotions);
                        tokio::spawn(async move {
                            let done = reads.await;
                            // A stopped pool takes its extents with it.
                            let _ = myself.cast(PoolMsg::Promoted {
                                pending,
                                done,
                                reply,
                            });
                        });
                    }
                    None => {
                        let grant = state.finish_load(pending, &[]);
                        state.send_grant(reply, grant);
                    }
                },
            },
            PoolMsg::Promoted {
                pending,
                done,
                reply,
            } => {
                let grant = state.finish_load(pending, &done);
                state.send_grant(reply, grant);
            }
            PoolMsg::Persist { keys, reply } => state.persist(&keys, reply),
            PoolMsg::LeaseForPeer { keys, reply } => {
                let grant = state.lease_for_peer(&keys);
                state.send_grant(reply, grant);
            }
            PoolMsg::AttachFeed { feed } => state.attach_feed(feed),
            PoolMsg::EndTransfer { lease } => state.end_transfer(lease),
            PoolMsg::Release {
                owner,
                lease,
                reply,
            } => drop(reply.send(state.release(owner, lease))),
            PoolMsg::ReleaseOwner { owner } => state.release_owner(owner),
            PoolMsg::Stats { reply } => drop(reply.send(state.stats())),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
