//! Serving peers: the fabric's link server reads pages through [`PoolPageSource`], which pins
//! them in the pool for exactly as long as they are being sent.

use std::sync::Arc;

use pegaflow_fabric::{BlockKey, PageLease, PageSource, SourceError};
use pegaflow_gpu_dma::Arena;
use ractor::ActorRef;

use super::FabricMetrics;
use crate::context::ask;
use crate::pool::{PoolMsg, TransferLease};

/// The pool as the fabric's link server sees it.
pub struct PoolPageSource {
    pool: ActorRef<PoolMsg>,
    arena: Arc<Arena>,
    metrics: Arc<FabricMetrics>,
}

impl PoolPageSource {
    /// Serves pages of `arena` that `pool` pins for each fetch.
    pub fn new(pool: ActorRef<PoolMsg>, arena: Arc<Arena>, metrics: Arc<FabricMetrics>) -> Self {
        Self {
            pool,
            arena,
            metrics,
        }
    }
}

/// Pages pinned for one peer's fetch; dropping it unpins them.
pub struct PeerLease {
    /// Offset, length and stored crc32c of each leading page, all inside the arena.
    pages: Vec<(u64, u64, u32)>,
    arena: Arc<Arena>,
    _pin: TransferLease,
}

impl PageLease for PeerLease {
    fn count(&self) -> usize {
        self.pages.len()
    }

    fn page(&self, index: usize) -> (&[u8], u32) {
        let (offset, len, crc) = self.pages[index];
        // Checked when the lease was made: every listed span lies inside the arena.
        (self.arena.read(offset, len).unwrap_or_default(), crc)
    }
}

impl PageSource for PoolPageSource {
    type Lease = PeerLease;

    async fn lease(&self, keys: &[BlockKey]) -> Result<PeerLease, SourceError> {
        let keys = keys.to_vec();
        let grant = ask(&self.pool, "pool", |reply| PoolMsg::LeaseForPeer {
            keys,
            reply,
        })
        .await
        .map_err(|e| SourceError(e.message))?;
        let pin = TransferLease::new(self.pool.clone(), grant.lease);
        let pages = grant
            .pages
            .iter()
            .map(|page| (page.extent.offset, page.bytes, page.crc32c))
            .take_while(|&(offset, len, _)| self.arena.read(offset, len).is_ok())
            .collect::<Vec<_>>();
        Ok(PeerLease {
            pages,
            arena: self.arena.clone(),
            _pin: pin,
        })
    }

    fn served(&self, peer: &str, pages: usize, bytes: u64) {
        self.metrics.sent_to(peer, pages, bytes);
    }
}
