//! The host copy engine: engine regions in POSIX shared memory, copies with `preadv`/`pwritev`.
//!
//! Used where there is no GPU (CI, vLLM CPU). The node never maps an engine's file (see
//! `region`): a save reads the region's file straight into arena pages, a load writes arena
//! pages into it, each run of ops that is contiguous in the region being one vectored call. Small
//! batches run on the calling thread; batches above [`PARALLEL_THRESHOLD_BYTES`] are split into
//! byte-balanced runs of ops copied on a few scoped threads, because one core cannot saturate
//! host memory bandwidth.

use std::io::{IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::arena::Arena;
use crate::engine::{CopyOp, Direction, DmaEngine};
use crate::error::{check_span, DmaError};
use crate::region::{HostRegion, RegionSource, DEFAULT_SHM_ROOT};

/// Batches of at least this many bytes are copied by several threads; below it (about 1 ms of
/// copying) spawning threads costs more than it gains. Measured on a 2-core VM, a 64 MiB batch of
/// 64 KiB ops went from 7.0-7.3 GB/s on one thread to 9.7-11.3 GB/s on two.
const PARALLEL_THRESHOLD_BYTES: u64 = 8 << 20;

/// Most threads one batch is split across; more gains little on a host's memory channels.
const MAX_COPY_THREADS: usize = 4;

/// Most buffers one `preadv`/`pwritev` takes (`IOV_MAX` on Linux).
const MAX_IOVECS: usize = 1024;

/// Copies between shared-memory engine regions and the pool arena through the regions' files.
#[derive(Debug)]
pub struct HostDmaEngine {
    arena: Arc<Arena>,
    shm_root: PathBuf,
    threads: usize,
}

impl HostDmaEngine {
    /// An engine over `arena` that opens regions as files in `/dev/shm`.
    pub fn new(arena: Arc<Arena>) -> HostDmaEngine {
        HostDmaEngine::with_shm_root(arena, PathBuf::from(DEFAULT_SHM_ROOT))
    }

    /// An engine that opens regions in `shm_root` instead of `/dev/shm`, so tests and unusual
    /// hosts can use any directory (ideally on tmpfs).
    pub fn with_shm_root(arena: Arc<Arena>, shm_root: PathBuf) -> HostDmaEngine {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_COPY_THREADS);
        HostDmaEngine {
            arena,
            shm_root,
            threads,
        }
    }

    /// Checks every op against both sides and returns the batch's total bytes; the first failure
    /// is returned before anything is copied.
    fn check_ops(&self, region: &HostRegion, ops: &[CopyOp]) -> Result<u64, DmaError> {
        let mut total = 0u64;
        for op in ops {
            check_span("region", op.region_offset, op.len, region.bytes())?;
            check_span("arena", op.arena_offset, op.len, self.arena.len())?;
            total = total.saturating_add(op.len);
        }
        Ok(total)
    }

    /// Runs `ops` on the current thread, one vectored call per run of ops contiguous in the region.
    ///
    /// # Safety
    /// Every op must have passed [`HostDmaEngine::check_ops`] against this `region`.
    unsafe fn copy_run(
        &self,
        region: &HostRegion,
        direction: Direction,
        ops: &[CopyOp],
    ) -> Result<(), DmaError> {
        let arena_base = self.arena.base_ptr();
        let mut rest = ops;
        while !rest.is_empty() {
            let (run, later) = rest.split_at(contiguous_run(rest));
            rest = later;
            // SAFETY: `check_ops` proved every arena span lies inside the arena's mapping, which
            // `self` keeps alive for the call. The slices are handed to the kernel only; no Rust
            // code reads or writes through them while another holds them: concurrent access to
            // the same arena bytes is excluded by the pool's leases (module docs of `arena`), and
            // the ops of one batch never share arena bytes (the layout gives each block of each
            // layer its own span of its own page).
            let arena_span = |op: &CopyOp| unsafe {
                std::slice::from_raw_parts_mut(
                    arena_base.add(op.arena_offset as usize),
                    op.len as usize,
                )
            };
            match direction {
                Direction::Save => {
                    let mut bufs: Vec<IoSliceMut<'_>> = run
                        .iter()
                        .map(|op| IoSliceMut::new(arena_span(op)))
                        .collect();
                    region.read_at(&mut bufs, run[0].region_offset)?;
                }
                Direction::Load => {
                    let mut bufs: Vec<IoSlice<'_>> =
                        run.iter().map(|op| IoSlice::new(arena_span(op))).collect();
                    region.write_at(&mut bufs, run[0].region_offset)?;
                }
            }
        }
        Ok(())
    }
}

impl DmaEngine for HostDmaEngine {
    type Region = HostRegion;
    /// When the layer's `copy_layer` returned: its bytes were in place then.
    type LayerEnd = Instant;

    fn name(&self) -> &'static str {
        "host"
    }

    fn open_region(&self, source: &RegionSource) -> Result<HostRegion, DmaError> {
        match source {
            RegionSource::SharedMemory { name, bytes } => {
                HostRegion::open(&self.shm_root, name, *bytes)
            }
            RegionSource::CudaIpc { .. } => Err(DmaError::UnsupportedRegion {
                engine: "host",
                kind: source.kind(),
            }),
        }
    }

    fn copy_layer(
        &self,
        region: &HostRegion,
        direction: Direction,
        ops: &[CopyOp],
    ) -> Result<(), DmaError> {
        let total = self.check_ops(region, ops)?;
        if total < PARALLEL_THRESHOLD_BYTES || self.threads < 2 || ops.len() < 2 {
            // SAFETY: every op passed `check_ops` above.
            return unsafe { self.copy_run(region, direction, ops) };
        }
        let share = total.div_ceil(self.threads as u64);
        std::thread::scope(|scope| {
            let mut helpers = Vec::new();
            let mut mine = Ok(());
            let mut rest = ops;
            while !rest.is_empty() {
                let run = split_run(rest, share);
                let (now, later) = rest.split_at(run);
                rest = later;
                // SAFETY (both calls): `now` is part of `ops`, which all passed `check_ops`.
                let copy = move || unsafe { self.copy_run(region, direction, now) };
                if rest.is_empty() {
                    // The last run goes on this thread instead of idling in the join.
                    mine = mine.and(copy());
                    continue;
                }
                // A thread the OS refuses (process limits) is no failure: the run is copied here.
                match std::thread::Builder::new().spawn_scoped(scope, copy) {
                    Ok(helper) => helpers.push(helper),
                    Err(_) => mine = mine.and(copy()),
                }
            }
            helpers.into_iter().fold(mine, |result, helper| {
                let theirs = helper
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                result.and(theirs)
            })
        })
    }

    fn end_layer(
        &self,
        _region: &HostRegion,
        _direction: Direction,
        _event_slot: Option<u32>,
    ) -> Result<Instant, DmaError> {
        Ok(Instant::now())
    }

    fn wait_layer(&self, _region: &HostRegion, end: Instant) -> Result<Instant, DmaError> {
        Ok(end)
    }
}

/// How many leading ops are contiguous in the region (each starting where the last ended), up to
/// [`MAX_IOVECS`]: one vectored call copies them.
fn contiguous_run(ops: &[CopyOp]) -> usize {
    let mut end = ops[0].region_offset + ops[0].len;
    let mut run = 1;
    for op in &ops[1..ops.len().min(MAX_IOVECS)] {
        if op.region_offset != end {
            break;
        }
        end += op.len;
        run += 1;
    }
    run
}

/// How many leading ops make up one run of about `share` bytes (at least one op).
fn split_run(ops: &[CopyOp], share: u64) -> usize {
    let mut bytes = 0u64;
    for (i, op) in ops.iter().enumerate() {
        bytes = bytes.saturating_add(op.len);
        if bytes >= share {
            return i + 1;
        }
    }
    ops.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(len: u64) -> CopyOp {
        CopyOp {
            region_offset: 0,
            arena_offset: 0,
            len,
        }
    }

    #[test]
    fn runs_are_byte_balanced() {
        let ops: Vec<CopyOp> = (0..8).map(|_| op(10)).collect();
        assert_eq!(split_run(&ops, 40), 4);
        assert_eq!(split_run(&ops, 1), 1);
        assert_eq!(split_run(&ops, 1000), 8);
        assert_eq!(split_run(&[op(100), op(1)], 50), 1);
    }

    #[test]
    fn runs_follow_region_contiguity() {
        let at = |region_offset, len| CopyOp {
            region_offset,
            arena_offset: 0,
            len,
        };
        assert_eq!(
            contiguous_run(&[at(0, 10), at(10, 5), at(15, 1), at(40, 1)]),
            3
        );
        assert_eq!(contiguous_run(&[at(10, 10), at(0, 10)]), 1);
        let long: Vec<CopyOp> = (0..3000).map(|i| at(i, 1)).collect();
        assert_eq!(contiguous_run(&long), MAX_IOVECS);
    }

    #[test]
    fn cuda_regions_are_refused() {
        let arena = Arc::new(Arena::new(4096, "test-arena").unwrap());
        let engine = HostDmaEngine::new(arena);
        let err = engine
            .open_region(&RegionSource::CudaIpc {
                handle: [0; 64],
                offset: 0,
                bytes: 4096,
                engine_events: Vec::new(),
            })
            .unwrap_err();
        assert!(
            matches!(err, DmaError::UnsupportedRegion { engine: "host", .. }),
            "{err}"
        );
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn assert_engine<E: DmaEngine>() {}
        assert_engine::<HostDmaEngine>();
    }
}
