//! `PoolActor`: owns the page allocator, the key index and every lease over pool pages.
//!
//! The arena bytes themselves are shared with the transfer actor (it is the DMA target); who
//! may touch which page is decided here alone, through leases: a save writes only extents
//! reserved for it, a load reads only pages pinned for it, and eviction only ever takes
//! pages nobody holds.

mod allocator;
mod index;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

pub use allocator::{Extent, ExtentAllocator};
pub use index::{PageEntry, PageIndex};

use crate::keys::BlockKey;
use crate::metrics::Metrics;

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
    /// Pins the longest held prefix of `keys` whose pages are `page_bytes` long, for a load.
    AcquireLoad {
        keys: Vec<BlockKey>,
        page_bytes: u64,
        reply: RpcReplyPort<LoadGrant>,
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
    next_lease: LeaseId,
    evictions: u64,
    metrics: Arc<Metrics>,
}

impl PoolState {
    /// An empty pool of `capacity` bytes handing out `align`-aligned extents.
    pub fn new(capacity: u64, align: u64, metrics: Arc<Metrics>) -> Self {
        let state = Self {
            allocator: ExtentAllocator::new(capacity, align),
            index: PageIndex::default(),
            leases: HashMap::new(),
            writing: HashSet::new(),
            writing_bytes: 0,
            next_lease: 1,
            evictions: 0,
            metrics,
        };
        state.publish();
        state
    }

    fn new_lease(&mut self, lease: Lease) -> LeaseId {
        let id = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(id, lease);
        id
    }

    /// See [`PoolMsg::Lookup`].
    pub fn lookup(&mut self, keys: &[BlockKey], lease_for: Option<OwnerId>) -> LookupOutcome {
        let hits = keys.iter().take_while(|key| self.index.touch(key)).count();
        let lease = match lease_for {
            Some(owner) if hits > 0 => {
                let pinned: Vec<BlockKey> = keys[..hits].to_vec();
                for key in &pinned {
                    self.index.lease(key);
                }
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
            lease,
        }
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
            let (_, victim) = self.index.evict_lru()?;
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
        let mut stored = 0;
        for (i, (key, extent)) in pages.into_iter().enumerate() {
            self.finish_writing(&key, extent);
            let Some(&crc) = crcs.get(i) else {
                self.allocator.free(extent);
                continue;
            };
            match self.index.insert(key, extent, page_bytes, crc) {
                Ok(()) => stored += 1,
                Err(extent) => self.allocator.free(extent),
            }
        }
        self.publish();
        stored
    }

    /// See [`PoolMsg::AcquireLoad`].
    pub fn acquire_load(&mut self, keys: &[BlockKey], page_bytes: u64) -> LoadGrant {
        let mut pinned = Vec::new();
        let mut pages = Vec::new();
        for key in keys {
            match self.index.get(key) {
                Some(entry) if entry.bytes == page_bytes => {}
                _ => break,
            }
            if let Some(entry) = self.index.lease(key) {
                pinned.push(*key);
                pages.push(entry);
            }
        }
        let lease = self.new_lease(Lease::Pinned {
            owner: None,
            keys: pinned,
        });
        self.publish();
        LoadGrant { lease, pages }
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
            leased_bytes: self.index.leased_bytes() + self.writing_bytes,
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

    fn publish(&self) {
        let stats = self.stats();
        let m = &self.metrics;
        m.pool_capacity_bytes.set(stats.capacity_bytes as i64);
        m.pool_used_bytes.set(stats.used_bytes as i64);
        m.pool_leased_bytes.set(stats.leased_bytes as i64);
        m.pool_pages.set(stats.pages as i64);
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
        _myself: ActorRef<PoolMsg>,
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
            } => drop(reply.send(state.acquire_load(&keys, page_bytes))),
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
