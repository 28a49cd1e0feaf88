//! The host copy engine: engine regions in POSIX shared memory, copies with `memcpy`.
//!
//! Used where there is no GPU (CI, vLLM CPU). Small batches run on the calling thread; batches
//! above [`PARALLEL_THRESHOLD_BYTES`] are split into byte-balanced runs of ops copied on a few
//! scoped threads, because one core cannot saturate host memory bandwidth. The regions are
//! mapped under the `SIGBUS` guard (`fault`): a batch that touched pages the engine cut off its
//! file fails with an error naming the region once it is done.

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

/// Copies between shared-memory engine regions and the pool arena with `memcpy`.
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

    /// Runs `ops` on the current thread.
    ///
    /// # Safety
    /// Every op must have passed [`HostDmaEngine::check_ops`] against this `region`.
    unsafe fn copy_run(&self, region: &HostRegion, direction: Direction, ops: &[CopyOp]) {
        let (region_base, arena_base) = (region.base_ptr(), self.arena.base_ptr());
        for op in ops {
            // SAFETY: `check_ops` proved both spans lie inside their mappings, which outlive this
            // call (`region` is borrowed, the arena is held by `self`). A region page the engine
            // cut off its file faults, and the guard replaces the mapping with zero pages of the
            // same size before the access resumes, so the pointers stay valid. The region and the
            // arena are distinct mappings of distinct files (a memfd cannot be reached through a
            // name in the shm root, and region opens refuse symlinks), so source and destination
            // never overlap. Concurrent writers of the same bytes are excluded by the pool's
            // leases (arena) and the session's ordering (region).
            unsafe {
                let region_ptr = region_base.add(op.region_offset as usize);
                let arena_ptr = arena_base.add(op.arena_offset as usize);
                let (src, dst) = match direction {
                    Direction::Save => (region_ptr, arena_ptr),
                    Direction::Load => (arena_ptr, region_ptr),
                };
                std::ptr::copy_nonoverlapping(src, dst, op.len as usize);
            }
        }
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
        region.check_intact()?;
        if total < PARALLEL_THRESHOLD_BYTES || self.threads < 2 || ops.len() < 2 {
            // SAFETY: every op passed `check_ops` above.
            unsafe { self.copy_run(region, direction, ops) };
            return region.check_intact();
        }
        let share = total.div_ceil(self.threads as u64);
        std::thread::scope(|scope| {
            let mut rest = ops;
            while !rest.is_empty() {
                let run = split_run(rest, share);
                let (now, later) = rest.split_at(run);
                rest = later;
                // SAFETY (both calls): `now` is part of `ops`, which all passed `check_ops`.
                let copy = move || unsafe { self.copy_run(region, direction, now) };
                if rest.is_empty() {
                    // The last run goes on this thread instead of idling in the join.
                    copy();
                } else if std::thread::Builder::new()
                    .spawn_scoped(scope, copy)
                    .is_err()
                {
                    // A thread the OS refuses (process limits) is no failure: copied here.
                    copy();
                }
            }
        });
        region.check_intact()
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
