//! Extent allocator over the arena: best-fit over aligned byte ranges with coalescing frees.
//!
//! Blocks of one model all have the same size, so in practice every extent is reused whole and
//! nothing fragments; blocks of different models on one node still share the arena without
//! a fixed page size wasting space on small models.

use std::collections::{BTreeMap, BTreeSet};

/// A byte range of the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// Hands out aligned extents of the arena and takes them back.
#[derive(Debug)]
pub struct ExtentAllocator {
    align: u64,
    capacity: u64,
    free_bytes: u64,
    by_offset: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
}

impl ExtentAllocator {
    /// An allocator over `capacity` bytes; `align` must be a power of two.
    pub fn new(capacity: u64, align: u64) -> Self {
        Self::over(0, capacity, align)
    }

    /// An allocator over the `capacity` bytes from `base` (aligned to `align`): one pool's
    /// slice of an arena shared with other pools.
    pub fn over(base: u64, capacity: u64, align: u64) -> Self {
        let align = align.max(1).next_power_of_two();
        let capacity = capacity - capacity % align;
        let mut allocator = Self {
            align,
            capacity,
            free_bytes: 0,
            by_offset: BTreeMap::new(),
            by_size: BTreeSet::new(),
        };
        if capacity > 0 {
            allocator.insert_free(base, capacity);
        }
        allocator
    }

    /// The extent length a request of `bytes` occupies.
    pub fn rounded(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.align).max(1) * self.align
    }

    /// Best fit for `bytes` (rounded up to the alignment), or `None` when no free run is large enough.
    pub fn allocate(&mut self, bytes: u64) -> Option<Extent> {
        let len = self.rounded(bytes);
        let &(size, offset) = self.by_size.range((len, 0)..).next()?;
        self.remove_free(offset, size);
        if size > len {
            self.insert_free(offset + len, size - len);
        }
        Some(Extent { offset, len })
    }

    /// Returns an extent, merging it with free neighbours.
    pub fn free(&mut self, extent: Extent) {
        let (mut offset, mut len) = (extent.offset, extent.len);
        if let Some((&prev_offset, &prev_len)) = self.by_offset.range(..offset).next_back() {
            if prev_offset + prev_len == offset {
                self.remove_free(prev_offset, prev_len);
                offset = prev_offset;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.by_offset.get(&(offset + len)) {
            self.remove_free(offset + len, next_len);
            len += next_len;
        }
        self.insert_free(offset, len);
    }

    /// Bytes managed.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes not allocated.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.by_offset.insert(offset, len);
        self.by_size.insert((len, offset));
        self.free_bytes += len;
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.by_offset.remove(&offset);
        self.by_size.remove(&(len, offset));
        self.free_bytes -= len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_aligned_and_exhausts() {
        let mut a = ExtentAllocator::new(16 * 4096, 4096);
        let first = a.allocate(1).expect("room");
        assert_eq!(
            first,
            Extent {
                offset: 0,
                len: 4096
            }
        );
        let second = a.allocate(4097).expect("room");
        assert_eq!(second.len, 8192);
        assert_eq!(a.free_bytes(), 13 * 4096);
        assert!(a.allocate(14 * 4096).is_none());
        assert!(a.allocate(13 * 4096).is_some());
        assert_eq!(a.free_bytes(), 0);
        assert!(a.allocate(1).is_none());
    }

    #[test]
    fn frees_coalesce_back_to_one_run() {
        let mut a = ExtentAllocator::new(8 * 4096, 4096);
        let extents: Vec<Extent> = (0..8).map(|_| a.allocate(4096).expect("room")).collect();
        for i in [1, 3, 5, 7, 0, 2, 6, 4] {
            a.free(extents[i]);
        }
        assert_eq!(a.free_bytes(), 8 * 4096);
        assert_eq!(
            a.allocate(8 * 4096),
            Some(Extent {
                offset: 0,
                len: 8 * 4096
            })
        );
    }

    #[test]
    fn an_allocator_over_a_slice_hands_out_only_its_offsets() {
        let mut a = ExtentAllocator::over(8 * 4096, 2 * 4096, 4096);
        let offsets: Vec<_> = (0..2)
            .map(|_| a.allocate(4096).expect("room").offset)
            .collect();
        assert_eq!(offsets, [8 * 4096, 9 * 4096]);
        assert!(a.allocate(1).is_none());
        assert_eq!(a.capacity(), 2 * 4096);
    }

    #[test]
    fn best_fit_prefers_the_smallest_hole() {
        let mut a = ExtentAllocator::new(10 * 4096, 4096);
        let big = a.allocate(4 * 4096).expect("room");
        let _keep = a.allocate(4096).expect("room");
        let small = a.allocate(2 * 4096).expect("room");
        let _keep2 = a.allocate(4096).expect("room");
        a.free(big);
        a.free(small);
        assert_eq!(a.allocate(2 * 4096).map(|e| e.offset), Some(small.offset));
    }
}
