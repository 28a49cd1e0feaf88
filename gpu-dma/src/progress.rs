//! The load progress board: one shared-memory word per layer-event slot through which the node
//! tells a GPU engine that a load recorded that slot's event.
//!
//! Why: an engine's stream may only wait on layer `L`'s event once the node has recorded it
//! (waiting on an event not yet recorded for this load waits on nothing). Without the board the
//! node answers a load only after enqueueing every layer, and enqueueing a 10K-token load's 32
//! layers of scattered copies takes about as long as the copies themselves (the driver's queue
//! fills and the host waits for it to drain). With the board the node answers at once with a
//! ticket, arms each slot as it records the layer's event, and the engine waits on the host for
//! the board to show its ticket before its stream waits on that layer: layer 0 computes while
//! layer 31 is still being enqueued.
//!
//! Each word holds the ticket of the last load that recorded the slot, or that ticket with
//! [`FAILED`] set when the load stopped before recording it. The engine creates the file, the
//! node maps it at register (validated like a shared-memory KV region) and the engine unlinks it
//! once registered, so no file outlives either process.
//!
//! The mapping is guarded like a KV region's (`fault`): an engine that shrinks its board only
//! loses its own board (the node's stores then land in private zero pages it never sees).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;

use crate::error::DmaError;
use crate::fault::Guarded;
use crate::region::{map_guarded, open_shm_file, DEFAULT_SHM_ROOT};

/// Set in a slot's word when the load with that ticket failed before recording the slot.
pub const FAILED: u64 = 1 << 63;

/// Bytes per slot word.
const WORD_BYTES: u64 = 8;

/// An engine's board, mapped shared read-write.
#[derive(Debug)]
pub struct ProgressBoard {
    /// Declared before `words`, so it leaves the guard table before the mapping goes.
    _guard: Guarded,
    words: MmapRaw,
    slots: u32,
}

impl ProgressBoard {
    /// Maps the shared-memory object `name`, which must hold at least one word per slot, and
    /// clears it: tickets count from 1 per registration, so a board registered again after a
    /// node restart must not show the previous node's tickets as recorded.
    pub fn open(name: &str, slots: u32) -> Result<ProgressBoard, DmaError> {
        Self::open_in(Path::new(DEFAULT_SHM_ROOT), name, slots)
    }

    fn open_in(root: &Path, name: &str, slots: u32) -> Result<ProgressBoard, DmaError> {
        let bytes = u64::from(slots) * WORD_BYTES;
        let (words, guard) = map_guarded(open_shm_file(root, name, bytes)?, name, bytes)?;
        let board = ProgressBoard {
            _guard: guard,
            words,
            slots,
        };
        (0..slots).for_each(|slot| board.store(slot, 0));
        Ok(board)
    }

    /// Says that the load `ticket` recorded `slot`'s event.
    pub fn arm(&self, slot: u32, ticket: u64) {
        self.store(slot, ticket & !FAILED);
    }

    /// Says that the load `ticket` stopped before recording `slot`'s event.
    pub fn fail(&self, slot: u32, ticket: u64) {
        self.store(slot, ticket | FAILED);
    }

    /// The word of `slot` as the engine reads it (tests).
    pub fn read(&self, slot: u32) -> Option<u64> {
        self.word(slot).map(|word| word.load(Ordering::Acquire))
    }

    fn store(&self, slot: u32, value: u64) {
        // Slots come from the node's own ring, sized like the board; a slot past it is a bug
        // that must not write outside the mapping.
        if let Some(word) = self.word(slot) {
            word.store(value, Ordering::Release);
        }
    }

    fn word(&self, slot: u32) -> Option<&AtomicU64> {
        if slot >= self.slots {
            return None;
        }
        let offset = (u64::from(slot) * WORD_BYTES) as usize;
        // SAFETY: the mapping is page-aligned and holds `slots` words, so the pointer is in
        // bounds and 8-byte aligned; it lives as long as `self`. The engine only reads it.
        Some(unsafe { AtomicU64::from_ptr(self.words.as_mut_ptr().add(offset).cast::<u64>()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board_file(dir: &tempfile::TempDir, bytes: u64) {
        let file = std::fs::File::create(dir.path().join("board")).expect("create");
        file.set_len(bytes).expect("size");
    }

    #[test]
    fn arming_and_failing_write_the_ticket_in_the_slots_word() {
        let dir = tempfile::tempdir().expect("tempdir");
        board_file(&dir, 4 * WORD_BYTES);
        let board = ProgressBoard::open_in(dir.path(), "board", 4).expect("open");
        board.arm(1, 7);
        board.fail(3, 7);
        assert_eq!(
            (0..4).map(|s| board.read(s)).collect::<Vec<_>>(),
            [Some(0), Some(7), Some(0), Some(7 | FAILED)]
        );
        let bytes = std::fs::read(dir.path().join("board")).expect("read back");
        assert_eq!(bytes[8..16], 7u64.to_le_bytes());
    }

    #[test]
    fn opening_clears_an_earlier_registrations_tickets() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("board"), [0xff; 16]).expect("stale board");
        let board = ProgressBoard::open_in(dir.path(), "board", 2).expect("open");
        assert_eq!([board.read(0), board.read(1)], [Some(0), Some(0)]);
    }

    #[test]
    fn a_slot_past_the_board_is_never_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        board_file(&dir, 2 * WORD_BYTES);
        let board = ProgressBoard::open_in(dir.path(), "board", 2).expect("open");
        board.arm(2, 5);
        assert_eq!(board.read(2), None);
        assert_eq!(
            std::fs::read(dir.path().join("board")).expect("read"),
            [0; 16]
        );
    }

    #[test]
    fn a_board_smaller_than_its_slots_or_badly_named_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        board_file(&dir, 8);
        let small = ProgressBoard::open_in(dir.path(), "board", 2).unwrap_err();
        assert!(
            matches!(small, DmaError::RegionTooSmall { needed: 16, .. }),
            "{small}"
        );
        let named = ProgressBoard::open_in(dir.path(), "../board", 1).unwrap_err();
        assert!(matches!(named, DmaError::BadRegionName { .. }), "{named}");
    }

    /// An engine that shrinks its board only loses its own board: the node's stores land in
    /// private pages (with the board mapped unguarded, this test died of SIGBUS).
    #[test]
    fn a_shrunk_board_never_faults_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        board_file(&dir, 4 * WORD_BYTES);
        let board = ProgressBoard::open_in(dir.path(), "board", 4).expect("open");
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("board"))
            .expect("open file")
            .set_len(0)
            .expect("shrink");
        board.arm(3, 9);
        board.fail(0, 9);
        assert_eq!(
            board.read(3),
            Some(9),
            "the node's own view after the fault"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("board"))
                .expect("stat")
                .len(),
            0
        );
    }
}
