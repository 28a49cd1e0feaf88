//! What the link server serves from: the node implements [`PageSource`] over its pool, tests
//! and benchmarks use [`MemorySource`].
//!
//! A source *leases* pages: the lease pins them (no eviction, no rewrite) while their bytes are
//! written to the socket, and releases them when dropped, so a slow or dying peer can delay an
//! eviction but never read a page that is being reused.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use crate::error::SourceError;
use crate::BlockKey;

/// Pages pinned for one fetch; dropping it releases them.
pub trait PageLease: Send {
    /// How many leading keys of the request are held (and pinned).
    fn count(&self) -> usize;
    /// Bytes of page `index` (< [`PageLease::count`]) and the crc32c stored with it at save.
    fn page(&self, index: usize) -> (&[u8], u32);
}

/// Where a link server reads pages.
pub trait PageSource: Send + Sync + 'static {
    type Lease: PageLease + 'static;

    /// Pins the pages of the longest held prefix of `keys`; an empty lease when the first key
    /// is not held (the requester's digest gave a false positive).
    fn lease(
        &self,
        keys: &[BlockKey],
    ) -> impl Future<Output = Result<Self::Lease, SourceError>> + Send;

    /// Called once `pages` pages (`bytes` in all) of one lease are written to the socket of
    /// `peer` (its node id), so the node can count what it served to whom. Pages of a fetch
    /// whose connection broke midway are not reported.
    fn served(&self, _peer: &str, _pages: usize, _bytes: u64) {}
}

/// An in-memory [`PageSource`] for tests, the simulation and the benchmark.
#[derive(Clone, Default)]
pub struct MemorySource {
    inner: Arc<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    pages: Mutex<HashMap<BlockKey, (Bytes, u32)>>,
    active: AtomicUsize,
    delay: Mutex<Duration>,
}

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a page with its correct checksum.
    pub fn insert(&self, key: BlockKey, page: Bytes) {
        let crc = crc32c::crc32c(&page);
        self.insert_with_crc(key, page, crc);
    }

    /// Stores a page with any checksum (tests use a wrong one to model corruption).
    pub fn insert_with_crc(&self, key: BlockKey, page: Bytes, crc32c: u32) {
        self.pages().insert(key, (page, crc32c));
    }

    /// Makes every lease wait `delay` first (models a slow pool; tests kill peers mid-fetch).
    pub fn set_delay(&self, delay: Duration) {
        *self
            .inner
            .delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = delay;
    }

    /// Leases not yet released.
    pub fn active_leases(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    fn pages(&self) -> std::sync::MutexGuard<'_, HashMap<BlockKey, (Bytes, u32)>> {
        self.inner
            .pages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A [`MemorySource`] lease: shared handles on the pages, counted until dropped.
pub struct MemoryLease {
    pages: Vec<(Bytes, u32)>,
    source: Arc<MemoryInner>,
}

impl PageLease for MemoryLease {
    fn count(&self) -> usize {
        self.pages.len()
    }

    fn page(&self, index: usize) -> (&[u8], u32) {
        let (bytes, crc) = &self.pages[index];
        (bytes, *crc)
    }
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        self.source.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PageSource for MemorySource {
    type Lease = MemoryLease;

    async fn lease(&self, keys: &[BlockKey]) -> Result<MemoryLease, SourceError> {
        let delay = *self
            .inner
            .delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let map = self.pages();
        let pages = keys.iter().map_while(|k| map.get(k).cloned()).collect();
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        Ok(MemoryLease {
            pages,
            source: Arc::clone(&self.inner),
        })
    }
}
