//! The host's pools: one [`PoolActor`](crate::pool::PoolActor) per NUMA node, each over its
//! own slice of the arena (its pages on that node), with its own allocator, index and LRU.
//!
//! A save lands in the pool nearest the saving GPU, unless another pool already holds or writes
//! the block: a block is stored once per host. A lookup and a load take the longest prefix over
//! all pools, each block from whichever pool holds it, the nearest pool asked first (the same
//! "nearest holder" rule the fabric applies between hosts). Lookup leases may pin pages in
//! several pools; the lease id the client gets stands for all of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use pegaflow_config::NodeConfig;
use pegaflow_gpu_dma::Arena;
use ractor::ActorRef;
use serde::{Deserialize, Serialize};

use crate::context::ask;
use crate::keys::BlockKey;
use crate::pool::{
    Extent, LeaseId, LookupOutcome, OwnerId, PageEntry, PoolMsg, PoolStats, SaveReservation,
    SaveSlot, TransferLease,
};
use crate::protocol::ProtoError;
use crate::topology::HostTopology;

/// One NUMA node's pool.
pub struct PoolHandle {
    pub numa_node: u32,
    pub actor: ActorRef<PoolMsg>,
}

/// One pool's occupancy, as `/api/stats` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaPoolStats {
    pub numa_node: u32,
    #[serde(flatten)]
    pub pool: PoolStats,
}

/// A lookup lease handed to a client: its owner, and each pool's own lease (by pool index).
type LookupLease = (OwnerId, Vec<(usize, LeaseId)>);

/// Every pool of the node.
pub struct Pools {
    /// In NUMA node order; never empty.
    pools: Vec<PoolHandle>,
    /// Lookup leases handed to clients: the owner and each pool's own lease.
    lookup_leases: Mutex<HashMap<LeaseId, LookupLease>>,
    next_lease: AtomicU64,
}

impl Pools {
    /// The node's pools, one per NUMA node, in node order (at least one).
    pub fn new(pools: Vec<PoolHandle>) -> Self {
        assert!(!pools.is_empty(), "a node has at least one pool");
        Self {
            pools,
            lookup_leases: Mutex::new(HashMap::new()),
            next_lease: AtomicU64::new(1),
        }
    }

    /// Every pool, in NUMA node order.
    pub fn all(&self) -> &[PoolHandle] {
        &self.pools
    }

    /// The pool of the first NUMA node: the only one when the SSD tier or the fabric is on.
    pub fn first(&self) -> &ActorRef<PoolMsg> {
        &self.pools[0].actor
    }

    /// Pool indices nearest `numa_node` first: its own pool (the first pool when the node has
    /// none), then the others in node order.
    fn nearest_first(&self, numa_node: u32) -> Vec<usize> {
        let own = self
            .pools
            .iter()
            .position(|p| p.numa_node == numa_node)
            .unwrap_or(0);
        std::iter::once(own)
            .chain((0..self.pools.len()).filter(|&i| i != own))
            .collect()
    }

    /// The longest prefix of `keys` held over all pools (memory or SSD), pinned for `lease_for`
    /// when given.
    pub async fn lookup(
        &self,
        keys: &[BlockKey],
        lease_for: Option<OwnerId>,
    ) -> Result<LookupOutcome, ProtoError> {
        let order = self.nearest_first(self.pools[0].numa_node);
        let mut outcome = LookupOutcome {
            hits: 0,
            ssd_hits: 0,
            lease: None,
        };
        let mut leases = Vec::new();
        // The pool that answered last stopped at a key it lacks: the others are asked next.
        let mut stopped = None;
        'prefix: while (outcome.hits as usize) < keys.len() {
            for &i in order.iter().filter(|&&i| Some(i) != stopped) {
                let rest = keys[outcome.hits as usize..].to_vec();
                let found = ask(&self.pools[i].actor, "pool", |reply| PoolMsg::Lookup {
                    keys: rest,
                    lease_for,
                    reply,
                })
                .await?;
                leases.extend(found.lease.map(|lease| (i, lease)));
                if found.hits > 0 {
                    outcome.hits += found.hits;
                    outcome.ssd_hits += found.ssd_hits;
                    stopped = Some(i);
                    continue 'prefix;
                }
            }
            break;
        }
        if let (Some(owner), false) = (lease_for, leases.is_empty()) {
            let id = self.next_lease.fetch_add(1, Ordering::Relaxed);
            self.leases().insert(id, (owner, leases));
            outcome.lease = Some(id);
        }
        Ok(outcome)
    }

    /// Ends a lookup lease of `owner`; the pages unpinned, `None` when it holds no such lease.
    pub async fn release(&self, owner: OwnerId, lease: LeaseId) -> Result<Option<u32>, ProtoError> {
        let parts = {
            let mut leases = self.leases();
            match leases.get(&lease) {
                Some((held_by, _)) if *held_by == owner => leases.remove(&lease),
                _ => None,
            }
        };
        let Some((_, parts)) = parts else {
            return Ok(None);
        };
        let mut released = 0;
        for (i, lease) in parts {
            let unpinned = ask(&self.pools[i].actor, "pool", |reply| PoolMsg::Release {
                owner,
                lease,
                reply,
            })
            .await?;
            released += unpinned.unwrap_or(0);
        }
        Ok(Some(released))
    }

    /// Ends every lookup lease of a session that went away.
    pub fn release_owner(&self, owner: OwnerId) {
        self.leases().retain(|_, (held_by, _)| *held_by != owner);
        for pool in &self.pools {
            // A pool that is gone (shutdown) holds no leases any more.
            let _ = pool.actor.cast(PoolMsg::ReleaseOwner { owner });
        }
    }

    /// Reserves pages for a save from a GPU on `numa_node` in the nearest pool; keys another
    /// pool holds or writes are `Present`. Returns the pool reserved in, to commit to.
    pub async fn reserve_save(
        &self,
        numa_node: u32,
        keys: Vec<BlockKey>,
        page_bytes: u64,
    ) -> Result<(ActorRef<PoolMsg>, SaveReservation), ProtoError> {
        let order = self.nearest_first(numa_node);
        let near = self.pools[order[0]].actor.clone();
        let mut elsewhere = vec![false; keys.len()];
        for &i in &order[1..] {
            let asked = keys.clone();
            let holds = ask(&self.pools[i].actor, "pool", |reply| PoolMsg::Holds {
                keys: asked,
                reply,
            })
            .await?;
            elsewhere
                .iter_mut()
                .zip(holds)
                .for_each(|(held, here)| *held |= here);
        }
        let new: Vec<BlockKey> = keys
            .iter()
            .zip(&elsewhere)
            .filter(|(_, held)| !**held)
            .map(|(key, _)| *key)
            .collect();
        let reserved = ask(&near, "pool", |reply| PoolMsg::ReserveSave {
            keys: new,
            page_bytes,
            reply,
        })
        .await?;
        let mut slots = reserved.slots.into_iter();
        let slots = elsewhere
            .iter()
            .map(|&held| match held {
                true => SaveSlot::Present,
                false => slots.next().unwrap_or(SaveSlot::Dropped),
            })
            .collect();
        let reservation = SaveReservation {
            lease: reserved.lease,
            slots,
        };
        Ok((near, reservation))
    }

    /// Pins the longest prefix of `keys` held over all pools (pages of `page_bytes`) for a load
    /// into a GPU on `numa_node`, nearest pool first, promoting SSD-resident blocks; the pins end
    /// when the returned guards drop.
    pub async fn acquire_load(
        &self,
        numa_node: u32,
        keys: &[BlockKey],
        page_bytes: u64,
    ) -> Result<(Vec<PageEntry>, Vec<TransferLease>), ProtoError> {
        let order = self.nearest_first(numa_node);
        let mut pages = Vec::new();
        let mut leases = Vec::new();
        let mut stopped = None;
        'prefix: while pages.len() < keys.len() {
            for &i in order.iter().filter(|&&i| Some(i) != stopped) {
                let pool = &self.pools[i].actor;
                let rest = keys[pages.len()..].to_vec();
                let grant = ask(pool, "pool", |reply| PoolMsg::AcquireLoad {
                    keys: rest,
                    page_bytes,
                    reply,
                })
                .await?;
                leases.push(TransferLease::new(pool.clone(), grant.lease));
                if !grant.pages.is_empty() {
                    pages.extend(grant.pages);
                    stopped = Some(i);
                    continue 'prefix;
                }
            }
            break;
        }
        Ok((pages, leases))
    }

    /// The pools whose actor is not running, one line each; empty when all are.
    pub fn problems(&self) -> Vec<String> {
        self.pools
            .iter()
            .filter(|pool| pool.actor.get_status() != ractor::ActorStatus::Running)
            .map(|pool| format!("pool actor of NUMA node {} is down", pool.numa_node))
            .collect()
    }

    /// Each pool's occupancy, in node order.
    pub async fn stats(&self) -> Result<Vec<NumaPoolStats>, ProtoError> {
        let mut all = Vec::with_capacity(self.pools.len());
        for pool in &self.pools {
            let stats = ask(&pool.actor, "pool", |reply| PoolMsg::Stats { reply }).await?;
            all.push(NumaPoolStats {
                numa_node: pool.numa_node,
                pool: stats,
            });
        }
        Ok(all)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, LookupLease>> {
        self.lookup_leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sum of every pool's occupancy: the host's pool.
pub fn total(pools: &[NumaPoolStats]) -> PoolStats {
    pools.iter().fold(PoolStats::default(), |sum, p| PoolStats {
        capacity_bytes: sum.capacity_bytes + p.pool.capacity_bytes,
        used_bytes: sum.used_bytes + p.pool.used_bytes,
        leased_bytes: sum.leased_bytes + p.pool.leased_bytes,
        pages: sum.pages + p.pool.pages,
        leased_pages: sum.leased_pages + p.pool.leased_pages,
        writing_pages: sum.writing_pages + p.pool.writing_pages,
        evictions: sum.evictions + p.pool.evictions,
    })
}

/// Slices of a shared arena start on multiples of this (a huge page) when they can, so each
/// one's NUMA policy covers whole pages.
const SLICE_ALIGN: u64 = 2 << 20;

/// Where each pool goes: `(NUMA node, its slice of an arena of arena_len bytes)`, in node
/// order. One pool per NUMA node holding a GPU of `topology` (the first node when none does),
/// `pool.size` split evenly; one pool for the whole arena when the SSD tier or the fabric is on,
/// which serve a single pool today.
pub fn plan(config: &NodeConfig, topology: &HostTopology, arena_len: u64) -> Vec<(u32, Extent)> {
    let mut nodes: Vec<u32> = topology
        .numa_nodes
        .iter()
        .copied()
        .filter(|node| topology.gpus.iter().any(|gpu| gpu.numa_node == *node))
        .collect();
    if nodes.is_empty() {
        nodes.push(topology.numa_nodes[0]);
    }
    let single = config.ssd.dir.is_some() || config.fabric.enabled;
    if single && nodes.len() > 1 {
        tracing::info!(
            numa_nodes = ?nodes,
            "one pool for the whole host: the SSD tier and the fabric serve a single pool"
        );
        nodes.truncate(1);
    }
    let count = nodes.len() as u64;
    let share = arena_len / count;
    let align = match share >= SLICE_ALIGN {
        true => SLICE_ALIGN,
        false => config.pool.page_align.0.max(1),
    };
    let share = share - share % align;
    nodes
        .iter()
        .enumerate()
        .map(|(i, &node)| {
            let offset = i as u64 * share;
            let len = match i as u64 + 1 == count {
                true => arena_len - offset,
                false => share,
            };
            (node, Extent { offset, len })
        })
        .collect()
}

/// Gives each pool's slice of `arena` the `MPOL_PREFERRED` policy of its NUMA node, before
/// anything touches its pages, on a host with several NUMA nodes online; logs what was done.
pub fn place(arena: &Arena, plan: &[(u32, Extent)]) {
    let online = pegaflow_gpu_dma::numa_nodes();
    for &(node, span) in plan {
        if online.len() <= 1 || !online.contains(&node) {
            tracing::info!(
                numa_node = node,
                online = ?online,
                "pool left to the default NUMA policy (the node is not one of several online)"
            );
            continue;
        }
        match arena.prefer_numa_node_for(span.offset, span.len, node) {
            Ok(()) => tracing::info!(
                numa_node = node,
                bytes = span.len,
                "pool pages preferred on its NUMA node (mbind MPOL_PREFERRED)"
            ),
            Err(error) => tracing::warn!(
                numa_node = node,
                %error,
                "cannot prefer the pool's NUMA node for its pages"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use pegaflow_config::{NodeConfig, Size};

    use super::*;
    use crate::topology::{GpuKind, GpuView};

    fn topology(nodes: &[u32], gpu_nodes: &[u32]) -> HostTopology {
        HostTopology {
            numa_nodes: nodes.to_vec(),
            gpus: gpu_nodes
                .iter()
                .enumerate()
                .map(|(i, &node)| GpuView {
                    uuid: format!("gpu-{i}"),
                    kind: GpuKind::Host,
                    ordinal: None,
                    name: None,
                    pci_bus_id: None,
                    numa_node: node,
                })
                .collect(),
            driver_error: None,
        }
    }

    #[test]
    fn one_pool_per_node_holding_a_gpu_split_evenly_on_huge_page_bounds() {
        let mut config = NodeConfig::default();
        config.pool.size = Size::mib(65);
        let len = config.pool.size.0;
        let plan = plan(&config, &topology(&[0, 1, 2], &[2, 0, 0]), len);
        let mib = 1 << 20;
        assert_eq!(
            plan,
            [
                (
                    0,
                    Extent {
                        offset: 0,
                        len: 32 * mib
                    }
                ),
                (
                    2,
                    Extent {
                        offset: 32 * mib,
                        len: 33 * mib
                    }
                )
            ]
        );
    }

    #[test]
    fn without_gpus_or_with_the_ssd_tier_there_is_one_pool() {
        let mut config = NodeConfig::default();
        let len = config.pool.size.0;
        let whole = Extent { offset: 0, len };
        assert_eq!(plan(&config, &topology(&[0, 1], &[]), len), [(0, whole)]);
        config.ssd.dir = Some("/tmp/ssd".into());
        assert_eq!(
            plan(&config, &topology(&[0, 1], &[1, 0]), len),
            [(0, whole)]
        );
    }
}
