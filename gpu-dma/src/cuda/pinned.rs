//! Pinning the pool arena for DMA: `cuMemHostRegister` in chunks, in parallel, in the background.
//!
//! Registering pins every page and maps it for the GPU; for a never-touched memfd that also means
//! allocating and zeroing it, about 1 s per 10 GiB on one thread. A 64 GiB pool must not hold up
//! the node's start, so [`PinnedArena::start`] returns at once and a background thread registers
//! fixed-size chunks from the lowest offset up, on several worker threads. Each chunk's state is
//! an atomic; progress is [`PinProgress`]. A copy that touches a chunk not yet pinned waits for it
//! ([`PinnedArena::wait_span`]); the pool hands out low offsets first, so early requests rarely
//! wait. If a chunk fails to pin, copies touching it fail with the driver's reason while the rest
//! of the arena keeps working.
//!
//! The kernel addresses arena pages by their host address: on 64-bit Linux with unified
//! addressing the device pointer of registered memory equals its host pointer, which is checked
//! per chunk so that one base pointer covers all chunks and ops may straddle chunk boundaries.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use cudarc::driver::{sys, CudaContext};

use crate::arena::Arena;
use crate::cuda::driver::{bind, check};
use crate::error::DmaError;

/// Bytes registered per `cuMemHostRegister` call: small enough to spread over threads and to let
/// copies at low offsets start early, large enough that per-call overhead is noise.
pub const PIN_CHUNK_BYTES: u64 = 256 << 20;

/// Most threads pinning at once; the kernel's page-pinning path stops scaling beyond a few.
const MAX_PIN_THREADS: usize = 8;

const PENDING: u8 = 0;
const PINNED: u8 = 1;
const FAILED: u8 = 2;

/// How far pinning has come, for the start-up log and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinProgress {
    /// Bytes registered so far.
    pub pinned_bytes: u64,
    /// The arena's size.
    pub total_bytes: u64,
    /// The first failure, if a chunk could not be pinned.
    pub failure: Option<String>,
}

impl PinProgress {
    /// True once every byte is pinned.
    pub fn is_complete(&self) -> bool {
        self.pinned_bytes == self.total_bytes
    }
}

/// Chunk states shared between the engine and the pinning threads.
struct PinState {
    chunks: Vec<AtomicU8>,
    pinned_bytes: AtomicU64,
    all_pinned: AtomicBool,
    cancel: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Guards nothing but the wake-ups of [`PinnedArena::wait_span`].
    changed: Mutex<()>,
    cv: Condvar,
}

impl PinState {
    fn set(&self, chunk: usize, state: u8) {
        let _guard = self.changed.lock().unwrap_or_else(PoisonError::into_inner);
        self.chunks[chunk].store(state, Ordering::Release);
        self.cv.notify_all();
    }
}

/// The arena, registered with the driver chunk by chunk; unregistered on drop.
pub(crate) struct PinnedArena {
    arena: Arc<Arena>,
    ctx: Arc<CudaContext>,
    state: Arc<PinState>,
    worker: Option<JoinHandle<()>>,
}

/// The span of chunk indices covering `[offset, offset + len)` (`len > 0`).
pub(crate) fn chunk_span(offset: u64, len: u64, chunk: u64) -> std::ops::RangeInclusive<usize> {
    let first = offset / chunk;
    let last = (offset + len.max(1) - 1) / chunk;
    first as usize..=last as usize
}

/// Registers `[offset, offset + len)` of the arena and checks it is addressable by its host
/// pointer on the device.
fn pin_chunk(base: *mut u8, offset: u64, len: u64) -> Result<(), DmaError> {
    let ptr = base.wrapping_add(offset as usize);
    let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
    // SAFETY: the span lies inside the arena's mapping (chunks are cut from `arena.len()`), which
    // outlives the registration: `PinnedArena` holds the arena and unregisters before dropping it.
    check(
        unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len as usize, flags) },
        || {
            format!(
                "cuMemHostRegister (pin arena bytes {offset}..{})",
                offset + len
            )
        },
    )?;
    let mut dptr: sys::CUdeviceptr = 0;
    // SAFETY: `ptr` was just registered; the call writes one device pointer.
    check(
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, ptr.cast(), 0) },
        || "cuMemHostGetDevicePointer (arena)".into(),
    )?;
    if dptr != ptr as u64 {
        return Err(DmaError::CudaUnavailable(format!(
            "the device maps pinned arena memory at {dptr:#x}, not at its host address {:p}; \
             this engine needs unified addressing",
            ptr
        )));
    }
    Ok(())
}

impl PinnedArena {
    /// Starts pinning `arena` in the background and returns at once.
    pub(crate) fn start(ctx: Arc<CudaContext>, arena: Arc<Arena>) -> Result<Self, DmaError> {
        let chunks = arena.len().div_ceil(PIN_CHUNK_BYTES) as usize;
        let state = Arc::new(PinState {
            chunks: (0..chunks).map(|_| AtomicU8::new(PENDING)).collect(),
            pinned_bytes: AtomicU64::new(0),
            all_pinned: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            failure: Mutex::new(None),
            changed: Mutex::new(()),
            cv: Condvar::new(),
        });
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_PIN_THREADS)
            .min(chunks);
        let worker = {
            let (ctx, arena, state) = (ctx.clone(), arena.clone(), state.clone());
            std::thread::Builder::new()
                .name("pegaflow-pin".into())
                .spawn(move || pin_all(&ctx, &arena, &state, threads))
                .map_err(|e| {
                    DmaError::CudaUnavailable(format!("cannot start pinning thread: {e}"))
                })?
        };
        Ok(PinnedArena {
            arena,
            ctx,
            state,
            worker: Some(worker),
        })
    }

    /// A snapshot of pinning progress.
    pub(crate) fn progress(&self) -> PinProgress {
        PinProgress {
            pinned_bytes: self.state.pinned_bytes.load(Ordering::Acquire),
            total_bytes: self.arena.len(),
            failure: self
                .state
                .failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Blocks until every chunk covering `[offset, offset + len)` is pinned, or returns the
    /// failure of one that could not be.
    pub(crate) fn wait_span(&self, offset: u64, len: u64) -> Result<(), DmaError> {
        if self.state.all_pinned.load(Ordering::Acquire) || len == 0 {
            return Ok(());
        }
        let span = chunk_span(offset, len, PIN_CHUNK_BYTES);
        let mut guard = self
            .state
            .changed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            let mut pending = false;
            for chunk in span.clone() {
                match self.state.chunks[chunk].load(Ordering::Acquire) {
                    PINNED => {}
                    FAILED => {
                        return Err(DmaError::CudaUnavailable(format!(
                            "arena chunk {chunk} could not be pinned: {}",
                            self.progress().failure.unwrap_or_default()
                        )))
                    }
                    _ => pending = true,
                }
            }
            if !pending {
                return Ok(());
            }
            guard = self
                .state
                .cv
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Blocks until pinning has finished (successfully or not) and returns the final progress.
    pub(crate) fn wait_all(&self) -> Result<PinProgress, DmaError> {
        self.wait_span(0, self.arena.len())?;
        Ok(self.progress())
    }
}

/// The background job: workers take chunks in ascending order until all are pinned.
fn pin_all(ctx: &CudaContext, arena: &Arena, state: &PinState, threads: usize) {
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let total = arena.len();
    let base = arena.base_ptr() as usize;
    let reported = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let bound = bind(ctx);
                loop {
                    let chunk = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if chunk >= state.chunks.len() || state.cancel.load(Ordering::Acquire) {
                        return;
                    }
                    let offset = chunk as u64 * PIN_CHUNK_BYTES;
                    let len = PIN_CHUNK_BYTES.min(total - offset);
                    let result = bound
                        .as_ref()
                        .map_err(ToString::to_string)
                        .and_then(|()| pin_chunk(base as *mut u8, offset, len).map_err(|e| e.to_string()));
                    match result {
                        Ok(()) => {
                            let done = state.pinned_bytes.fetch_add(len, Ordering::AcqRel) + len;
                            state.set(chunk, PINNED);
                            let tenth = done * 10 / total;
                            if reported.fetch_max(tenth, Ordering::Relaxed) < tenth {
                                tracing::info!(pinned_bytes = done, total_bytes = total, "pinning pool arena");
                            }
                        }
                        Err(why) => {
                            tracing::error!(chunk, offset, len, %why, "cannot pin pool arena chunk");
                            state
                                .failure
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get_or_insert(why);
                            state.set(chunk, FAILED);
                        }
                    }
                }
            });
        }
    });
    if state.pinned_bytes.load(Ordering::Acquire) == total {
        state.all_pinned.store(true, Ordering::Release);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            total_bytes = total,
            seconds = secs,
            gb_per_s = total as f64 / secs / 1e9,
            threads,
            "pool arena pinned"
        );
    }
}

impl Drop for PinnedArena {
    fn drop(&mut self) {
        self.state.cancel.store(true, Ordering::Release);
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("arena pinning thread panicked");
            }
        }
        if bind(&self.ctx).is_err() {
            return;
        }
        let base = self.arena.base_ptr();
        for (chunk, s) in self.state.chunks.iter().enumerate() {
            if s.load(Ordering::Acquire) == PINNED {
                let ptr = base.wrapping_add(chunk * PIN_CHUNK_BYTES as usize);
                // SAFETY: this chunk start was registered by `pin_chunk` and nothing uses it any
                // more: the engine synchronizes its streams before its `PinnedArena` drops.
                let status = unsafe { sys::cuMemHostUnregister(ptr.cast()) };
                if let Err(e) = check(status, || "cuMemHostUnregister (arena)".into()) {
                    tracing::warn!(chunk, %e, "cannot unpin pool arena chunk");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_spans_cover_the_bytes() {
        let c = 100;
        assert_eq!(chunk_span(0, 1, c), 0..=0);
        assert_eq!(chunk_span(0, 100, c), 0..=0);
        assert_eq!(chunk_span(0, 101, c), 0..=1);
        assert_eq!(chunk_span(99, 2, c), 0..=1);
        assert_eq!(chunk_span(250, 0, c), 2..=2);
        assert_eq!(chunk_span(1000, 1, c), 10..=10);
    }

    #[test]
    fn progress_completes_only_when_all_bytes_are_pinned() {
        let mut p = PinProgress {
            pinned_bytes: 10,
            total_bytes: 20,
            failure: None,
        };
        assert!(!p.is_complete());
        p.pinned_bytes = 20;
        assert!(p.is_complete());
    }
}
