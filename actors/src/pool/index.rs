//! The key index: which pages hold which block, and which of them may be evicted.
//!
//! Only committed, unleased pages sit in the LRU list, so eviction never has to skip a page an
//! in-flight save or load is using: a leased page is simply not a candidate.

use std::collections::HashMap;

use lru::LruCache;

use super::allocator::Extent;
use crate::keys::{BlockKey, KeyHash};

/// A stored block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    pub extent: Extent,
    /// Bytes of the block (the extent may be rounded up).
    pub bytes: u64,
    pub crc32c: u32,
    leases: u32,
    /// Whether a lookup or load hit it while in memory (SSD admission asks).
    hit: bool,
}

impl PageEntry {
    /// Whether the page was hit (looked up, loaded, or saved again) since it was stored.
    pub fn was_hit(&self) -> bool {
        self.hit
    }
}

/// Key -> page, with LRU order over the evictable pages.
pub struct PageIndex {
    entries: HashMap<BlockKey, PageEntry, KeyHash>,
    evictable: LruCache<BlockKey, (), KeyHash>,
    leased_bytes: u64,
}

impl Default for PageIndex {
    fn default() -> Self {
        Self {
            entries: HashMap::default(),
            evictable: LruCache::unbounded_with_hasher(KeyHash::default()),
            leased_bytes: 0,
        }
    }
}

impl PageIndex {
    /// The entry for `key`, if stored.
    pub fn get(&self, key: &BlockKey) -> Option<&PageEntry> {
        self.entries.get(key)
    }

    /// Marks `key` recently used and hit; returns whether it is stored.
    pub fn touch(&mut self, key: &BlockKey) -> bool {
        self.evictable.promote(key);
        match self.entries.get_mut(key) {
            Some(entry) => {
                entry.hit = true;
                true
            }
            None => false,
        }
    }

    /// Stores a committed page as most recently used. Returns the extent back if the key was
    /// already stored (a concurrent save won), so the caller can free it.
    pub fn insert(
        &mut self,
        key: BlockKey,
        extent: Extent,
        bytes: u64,
        crc32c: u32,
    ) -> Result<(), Extent> {
        if self.entries.contains_key(&key) {
            return Err(extent);
        }
        self.entries.insert(
            key,
            PageEntry {
                extent,
                bytes,
                crc32c,
                leases: 0,
                hit: false,
            },
        );
        self.evictable.put(key, ());
        Ok(())
    }

    /// Pins a stored page against eviction (and counts it hit); `None` if not stored.
    pub fn lease(&mut self, key: &BlockKey) -> Option<PageEntry> {
        let entry = self.entries.get_mut(key)?;
        entry.hit = true;
        if entry.leases == 0 {
            self.evictable.pop(key);
            self.leased_bytes += entry.extent.len;
        }
        entry.leases += 1;
        Some(*entry)
    }

    /// Drops one pin; at zero the page becomes evictable again, as most recently used.
    pub fn unlease(&mut self, key: &BlockKey) {
        if let Some(entry) = self.entries.get_mut(key) {
            if entry.leases == 0 {
                return;
            }
            entry.leases -= 1;
            if entry.leases == 0 {
                self.leased_bytes -= entry.extent.len;
                self.evictable.put(*key, ());
            }
        }
    }

    /// Removes and returns the least recently used unleased page.
    pub fn evict_lru(&mut self) -> Option<(BlockKey, PageEntry)> {
        let (key, ()) = self.evictable.pop_lru()?;
        self.entries.remove(&key).map(|entry| (key, entry))
    }

    /// Every stored key.
    pub fn keys(&self) -> Vec<BlockKey> {
        self.entries.keys().copied().collect()
    }

    /// Pages stored.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Pages currently pinned.
    pub fn leased_pages(&self) -> usize {
        self.entries.len() - self.evictable.len()
    }

    /// Bytes of pinned pages.
    pub fn leased_bytes(&self) -> u64 {
        self.leased_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> BlockKey {
        [i; 32]
    }

    fn extent(i: u64) -> Extent {
        Extent {
            offset: i * 4096,
            len: 4096,
        }
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut index = PageIndex::default();
        for i in 0..3 {
            index
                .insert(key(i), extent(i as u64), 4096, 0)
                .expect("new");
        }
        assert!(index.touch(&key(0)));
        assert_eq!(index.evict_lru().map(|(k, _)| k), Some(key(1)));
        assert_eq!(index.evict_lru().map(|(k, _)| k), Some(key(2)));
        assert_eq!(index.evict_lru().map(|(k, _)| k), Some(key(0)));
        assert!(index.evict_lru().is_none());
    }

    #[test]
    fn leased_pages_are_never_evicted() {
        let mut index = PageIndex::default();
        index.insert(key(1), extent(1), 4096, 7).expect("new");
        index.insert(key(2), extent(2), 4096, 8).expect("new");
        assert_eq!(index.lease(&key(1)).map(|e| e.crc32c), Some(7));
        assert_eq!(index.lease(&key(1)).map(|e| e.crc32c), Some(7));
        assert_eq!(index.leased_bytes(), 4096);
        assert_eq!(index.evict_lru().map(|(k, _)| k), Some(key(2)));
        assert!(index.evict_lru().is_none());
        index.unlease(&key(1));
        assert!(index.evict_lru().is_none());
        index.unlease(&key(1));
        assert_eq!(index.leased_bytes(), 0);
        assert_eq!(index.evict_lru().map(|(k, _)| k), Some(key(1)));
    }

    #[test]
    fn duplicate_insert_hands_the_extent_back() {
        let mut index = PageIndex::default();
        index.insert(key(1), extent(1), 4096, 0).expect("new");
        assert_eq!(index.insert(key(1), extent(5), 4096, 0), Err(extent(5)));
        assert_eq!(index.len(), 1);
    }
}
