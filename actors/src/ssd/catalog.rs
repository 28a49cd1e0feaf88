//! The catalog: which block lives in which segment record, and how many bytes each segment
//! takes, so the writer can tell when the tier is over its cap and which segments to drop.
//!
//! Space is reclaimed by dropping whole segments, oldest first: segments are append-only, so the
//! oldest one holds the blocks written longest ago, the coldest ones under LRU spilling. A block
//! rewritten later lives on in its newer record, so dropping the older segment loses nothing.

use std::collections::{BTreeMap, HashMap};

use super::format::RecordEntry;
use super::segment::SegmentId;
use crate::keys::{BlockKey, KeyHash};

/// Where a block is on SSD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub segment: SegmentId,
    pub entry: RecordEntry,
}

#[derive(Debug, Default)]
struct SegmentUse {
    bytes: u64,
    sealed: bool,
    keys: Vec<BlockKey>,
}

/// Key -> location, and per-segment byte use.
#[derive(Debug, Default)]
pub struct Catalog {
    keys: HashMap<BlockKey, Location, KeyHash>,
    segments: BTreeMap<SegmentId, SegmentUse>,
    used_bytes: u64,
}

impl Catalog {
    /// Whether `key` is on SSD.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.keys.contains_key(key)
    }

    /// Where `key` is on SSD.
    pub fn get(&self, key: &BlockKey) -> Option<Location> {
        self.keys.get(key).copied()
    }

    /// Registers a segment (recovered or new) that takes `bytes` on disk.
    pub fn add_segment(&mut self, id: SegmentId, bytes: u64, sealed: bool) {
        self.segments.insert(
            id,
            SegmentUse {
                bytes,
                sealed,
                keys: Vec::new(),
            },
        );
        self.used_bytes += bytes;
    }

    /// Records written to segment `id`, which now takes `bytes` on disk. A key already held
    /// elsewhere moves to its newer record.
    pub fn add_records(&mut self, id: SegmentId, entries: &[RecordEntry], bytes: u64) {
        let Some(segment) = self.segments.get_mut(&id) else {
            return;
        };
        self.used_bytes = self.used_bytes - segment.bytes + bytes;
        segment.bytes = bytes;
        for entry in entries {
            segment.keys.push(entry.key);
            self.keys.insert(
                entry.key,
                Location {
                    segment: id,
                    entry: *entry,
                },
            );
        }
    }

    /// Marks segment `id` sealed at its final length.
    pub fn seal(&mut self, id: SegmentId, bytes: u64) {
        self.add_records(id, &[], bytes);
        if let Some(segment) = self.segments.get_mut(&id) {
            segment.sealed = true;
        }
    }

    /// Forgets one block (its record failed its checksum); the rest of its segment stays.
    pub fn remove_key(&mut self, key: &BlockKey) {
        self.keys.remove(key);
    }

    /// Forgets segment `id` and every block whose newest record is in it; returns those blocks.
    pub fn drop_segment(&mut self, id: SegmentId) -> Vec<BlockKey> {
        let Some(segment) = self.segments.remove(&id) else {
            return Vec::new();
        };
        self.used_bytes -= segment.bytes;
        let mut dropped = segment.keys;
        dropped.retain(|key| {
            self.keys.get(key).is_some_and(|loc| loc.segment == id)
                && self.keys.remove(key).is_some()
        });
        dropped
    }

    /// Every block held.
    pub fn keys(&self) -> Vec<BlockKey> {
        self.keys.keys().copied().collect()
    }

    /// The sealed segments to drop, oldest first, so that `incoming` more bytes fit under
    /// `cap`; empty when they already fit. The open segment is never chosen.
    pub fn choose_drops(&self, cap: u64, incoming: u64) -> Vec<SegmentId> {
        let mut used = self.used_bytes;
        let mut drops = Vec::new();
        for (&id, segment) in &self.segments {
            if used + incoming <= cap {
                break;
            }
            if segment.sealed {
                used -= segment.bytes;
                drops.push(id);
            }
        }
        drops
    }

    /// Bytes all segments take on disk.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Blocks held.
    pub fn pages(&self) -> u64 {
        self.keys.len() as u64
    }

    /// Segments held.
    pub fn segments(&self) -> u64 {
        self.segments.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: u8, offset: u64) -> RecordEntry {
        RecordEntry {
            key: [key; 32],
            offset,
            len: 4000,
            crc32c: 0,
        }
    }

    #[test]
    fn drops_the_oldest_sealed_segments_first() {
        let mut catalog = Catalog::default();
        for id in 1..=3 {
            catalog.add_segment(id, 0, false);
            catalog.add_records(id, &[entry(id as u8, 0)], 100);
            catalog.seal(id, 100);
        }
        catalog.add_segment(4, 50, false);
        assert_eq!(catalog.used_bytes(), 350);
        assert_eq!(catalog.choose_drops(400, 50), Vec::<u64>::new());
        assert_eq!(catalog.choose_drops(400, 51), vec![1]);
        assert_eq!(catalog.choose_drops(300, 100), vec![1, 2]);
        assert_eq!(
            catalog.choose_drops(10, 100),
            vec![1, 2, 3],
            "never the open segment"
        );
        assert_eq!(catalog.drop_segment(1), vec![[1; 32]]);
        assert!(!catalog.contains(&[1; 32]));
        assert!(catalog.contains(&[2; 32]));
        assert_eq!((catalog.used_bytes(), catalog.pages()), (250, 2));
    }

    #[test]
    fn a_rewritten_block_survives_dropping_its_older_record() {
        let mut catalog = Catalog::default();
        catalog.add_segment(1, 0, false);
        catalog.add_records(1, &[entry(7, 0), entry(8, 8192)], 16384);
        catalog.seal(1, 20480);
        catalog.add_segment(2, 0, false);
        catalog.add_records(2, &[entry(7, 0)], 8192);
        assert_eq!(
            catalog.drop_segment(1),
            vec![[8; 32]],
            "7 lives on in segment 2"
        );
        assert_eq!(catalog.get(&[7; 32]).map(|l| l.segment), Some(2));
        assert!(!catalog.contains(&[8; 32]));
        catalog.remove_key(&[7; 32]);
        assert_eq!(catalog.pages(), 0);
    }
}
