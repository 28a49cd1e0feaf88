//! The crc32c of each page a save wrote, which the pool stores with the page and every reader
//! (SSD, fabric) checks.
//!
//! A save that waits on the engine's per-layer events lands layer by layer while the engine
//! still computes the later layers; its pages are checksummed the same way
//! ([`LayerwiseCrcs`]): each landed layer's segments are appended to their pages' running
//! crc32c, so when the last layer lands only that layer is left to checksum instead of every
//! byte of the save (1.3 GB for a 10K-token Llama-3.1-8B prompt, tens of milliseconds after
//! the engine's last layer). A page whose segments do not arrive back to back from its start is
//! checksummed whole at the end, as are all pages of a save without events
//! ([`checksum_pages`], spread over cores).

use std::ops::Range;

use pegaflow_gpu_dma::{Arena, CopyOp};

use crate::transfer::TransferError;

/// Below this many bytes a save's checksums run on the copy thread; above, spread over cores
/// (crc32c runs at ~14 GB/s per core, slower than a DMA engine fills pages).
const PARALLEL_CHECKSUM_BYTES: u64 = 8 << 20;

/// Running crc32c of a save's pages, fed one landed layer at a time.
pub struct LayerwiseCrcs<'a> {
    arena: &'a Arena,
    /// `(offset, len)` of each page, in the save's order.
    pages: &'a [(u64, u64)],
    /// Page indices sorted by offset, to find the page an op wrote into.
    by_offset: Vec<usize>,
    /// Per page: the crc32c of its first `covered` bytes, or `None` once its segments broke
    /// order (it is then checksummed whole at the end).
    running: Vec<Option<(u32, u64)>>,
}

impl<'a> LayerwiseCrcs<'a> {
    /// Nothing checksummed yet.
    pub fn new(arena: &'a Arena, pages: &'a [(u64, u64)]) -> Self {
        let mut by_offset: Vec<usize> = (0..pages.len()).collect();
        by_offset.sort_by_key(|&i| pages[i].0);
        Self {
            arena,
            pages,
            by_offset,
            running: vec![Some((0, 0)); pages.len()],
        }
    }

    /// Appends the bytes one landed layer's `ops` wrote to their pages' running crc32c.
    pub fn absorb(&mut self, ops: &[CopyOp]) -> Result<(), TransferError> {
        for op in ops {
            let Some(page) = self.page_of(op.arena_offset..op.arena_offset + op.len) else {
                continue;
            };
            let start = self.pages[page].0;
            self.running[page] = match self.running[page] {
                Some((crc, covered)) if start + covered == op.arena_offset => {
                    let bytes = self.arena.read(op.arena_offset, op.len)?;
                    Some((crc32c::crc32c_append(crc, bytes), covered + op.len))
                }
                _ => None,
            };
        }
        Ok(())
    }

    /// The crc32c of every page, in the save's order: the running one where the layers covered
    /// the page back to back, else the whole page's.
    pub fn finish(self) -> Result<Vec<u32>, TransferError> {
        let unfinished: Vec<(u64, u64)> = self
            .pages
            .iter()
            .zip(&self.running)
            .filter(|&(&(_, len), state)| !matches!(state, Some((_, covered)) if *covered == len))
            .map(|(&page, _)| page)
            .collect();
        let mut whole = checksum_pages(self.arena, &unfinished)?.into_iter();
        self.pages
            .iter()
            .zip(self.running)
            .map(|(&(_, len), state)| match state {
                Some((crc, covered)) if covered == len => Ok(crc),
                _ => whole
                    .next()
                    .ok_or_else(|| TransferError::Worker("checksum count mismatch".into())),
            })
            .collect()
    }

    /// The page holding all of `span`, if any.
    fn page_of(&self, span: Range<u64>) -> Option<usize> {
        let after = self
            .by_offset
            .partition_point(|&i| self.pages[i].0 <= span.start);
        let page = *self.by_offset.get(after.checked_sub(1)?)?;
        let (offset, len) = self.pages[page];
        (span.end <= offset + len).then_some(page)
    }
}

/// The crc32c of each page, spread over cores when there are many bytes.
fn checksum_pages(arena: &Arena, pages: &[(u64, u64)]) -> Result<Vec<u32>, TransferError> {
    let checksum = |part: &[(u64, u64)]| -> Result<Vec<u32>, TransferError> {
        part.iter()
            .map(|&(offset, len)| Ok(crc32c::crc32c(arena.read(offset, len)?)))
            .collect()
    };
    let total: u64 = pages.iter().map(|&(_, len)| len).sum();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if total < PARALLEL_CHECKSUM_BYTES || threads == 1 || pages.len() < 2 {
        return checksum(pages);
    }
    let chunk = pages.len().div_ceil(threads);
    std::thread::scope(|scope| {
        // A part whose thread the OS refuses (process limits) is checksummed here instead.
        let workers: Vec<_> = pages
            .chunks(chunk)
            .map(|part| {
                std::thread::Builder::new()
                    .spawn_scoped(scope, move || checksum(part))
                    .map_err(|_| part)
            })
            .collect();
        let mut crcs = Vec::with_capacity(pages.len());
        for worker in workers {
            let part = match worker {
                Ok(thread) => thread
                    .join()
                    .map_err(|_| TransferError::Worker("checksum thread panicked".into()))??,
                Err(part) => checksum(part)?,
            };
            crcs.extend(part);
        }
        Ok(crcs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT: u64 = 64;
    const LAYERS: u64 = 4;
    const PAGE: u64 = SEGMENT * LAYERS;

    /// An arena of `pages` pages of random bytes.
    fn arena(pages: u64) -> Arena {
        let arena = Arena::new(pages * PAGE, "page-crc-test").expect("arena");
        let bytes: Vec<u8> = (0..pages * PAGE).map(|i| (i * 7 + i / 13) as u8).collect();
        arena.write(0, &bytes).expect("fill");
        arena
    }

    /// Layer `layer`'s op into page slot `slot` (a page holds its layers one after the other).
    fn op(slot: u64, layer: u64) -> CopyOp {
        CopyOp {
            region_offset: 0,
            arena_offset: slot * PAGE + layer * SEGMENT,
            len: SEGMENT,
        }
    }

    fn whole(arena: &Arena, pages: &[(u64, u64)]) -> Vec<u32> {
        pages
            .iter()
            .map(|&(offset, len)| crc32c::crc32c(arena.read(offset, len).expect("read")))
            .collect()
    }

    #[test]
    fn layers_landing_in_order_give_each_pages_whole_crc() {
        let arena = arena(5);
        // Pages in save order unlike arena order; each layer's ops in yet another order.
        let pages: Vec<(u64, u64)> = [3, 0, 4].iter().map(|&s| (s * PAGE, PAGE)).collect();
        let mut crcs = LayerwiseCrcs::new(&arena, &pages);
        for layer in 0..LAYERS {
            crcs.absorb(&[op(4, layer), op(3, layer), op(0, layer)])
                .expect("absorb");
        }
        assert_eq!(crcs.finish().expect("finish"), whole(&arena, &pages));
    }

    #[test]
    fn a_page_whose_segments_break_order_or_stop_short_is_checksummed_whole() {
        let arena = arena(3);
        let pages: Vec<(u64, u64)> = (0..3).map(|s| (s * PAGE, PAGE)).collect();
        let mut crcs = LayerwiseCrcs::new(&arena, &pages);
        crcs.absorb(&[op(0, 0), op(1, 1), op(2, 0)])
            .expect("absorb");
        crcs.absorb(&[op(0, 1), op(1, 0), op(2, 1)])
            .expect("absorb");
        crcs.absorb(&[op(0, 2), op(0, 3), op(2, 2)])
            .expect("absorb");
        // Page 0 complete in order, page 1 out of order, page 2 one layer short.
        assert_eq!(crcs.finish().expect("finish"), whole(&arena, &pages));
    }

    #[test]
    fn ops_outside_every_page_are_ignored() {
        let arena = arena(40);
        let pages: Vec<(u64, u64)> = (0..20).map(|s| (s * PAGE, PAGE)).collect();
        let mut crcs = LayerwiseCrcs::new(&arena, &pages);
        crcs.absorb(&[op(30, 0), op(0, 0)]).expect("absorb");
        assert_eq!(crcs.finish().expect("finish"), whole(&arena, &pages));
    }

    #[test]
    fn many_bytes_are_checksummed_across_cores_alike() {
        let big = PARALLEL_CHECKSUM_BYTES / PAGE * 2;
        let arena = arena(big);
        let all: Vec<(u64, u64)> = (0..big).map(|s| (s * PAGE, PAGE)).collect();
        assert_eq!(
            checksum_pages(&arena, &all).expect("crcs"),
            whole(&arena, &all)
        );
    }
}
