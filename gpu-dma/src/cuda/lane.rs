//! A copy lane: one direction's CUDA stream and the descriptor slots its launches read.
//!
//! Saves and loads each have a lane, so a save and a load run on different streams and overlap
//! (PCIe is full duplex). A launch reads its descriptors straight from pinned, device-mapped host
//! memory, so no upload precedes it; the buffer is a ring of slots, and a slot is rewritten only
//! after the event recorded behind the launch that last read it has completed. The lane's mutex
//! serialises enqueues from concurrent jobs of the same direction; their copies then run in
//! enqueue order on the stream.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{result, sys, CudaContext, CudaStream, LaunchConfig, PushKernelArg};

use crate::cuda::driver::{bind, check, cuda_err};
use crate::cuda::events::OwnedEvent;
use crate::cuda::kernel::{Desc, Kernel};
use crate::cuda::strided::StridedDesc;
use crate::error::DmaError;

/// Most streams one batched memcpy is spread over; see [`Mover::BatchedMemcpy`].
pub(crate) const MAX_SPLIT: usize = 4;

/// Descriptor slots per lane: enough for two 32-layer jobs in flight without waiting.
const SLOTS: usize = 64;

/// Descriptors per slot; a layer with more is split into several launches (4096 x 64 KiB chunks
/// is 256 MiB, far above one layer of a 10K-token request).
pub(crate) const SLOT_DESCS: usize = 4096;

/// How a lane moves a batch.
pub(crate) enum Mover<'a> {
    /// The gather/scatter kernel.
    Kernel(&'a Kernel),
    /// `cuMemcpyBatchAsync` (driver >= 13.0): the copy engines, the batch split over this many
    /// streams (1..=[`MAX_SPLIT`]) joined back into the lane's stream, so several copy engines
    /// share the per-copy overhead of small blocks.
    BatchedMemcpy(usize),
    /// One `cuMemcpyAsync` per descriptor: the last resort, ~6 GB/s at 16 KiB.
    PerOpMemcpy,
}

/// How a lane issues strided copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Strided {
    /// `cuMemcpy3DBatchAsync`, [`SLOT_DESCS`] copies per call.
    Batch,
    /// One `cuMemcpy2DAsync` per copy: slower to enqueue, but each copy is certainly one 2D
    /// copy-engine launch, which tells whether the batched call keeps them whole.
    PerCopy,
}

/// Slot bookkeeping guarded by the lane's mutex.
struct Slots {
    next: usize,
    /// Whether the slot's event was recorded (a launch may still read the slot).
    recorded: [bool; SLOTS],
}

/// A direction's stream with its descriptor ring.
pub(crate) struct Lane {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Extra streams for split batched memcpys, each with the event that joins it back.
    extra: Vec<(Arc<CudaStream>, sys::CUevent)>,
    /// Recorded on the lane's stream before a split batch, so the extra streams start only after
    /// everything queued before it (earlier layers, a save's wait on the engine's event).
    fork: sys::CUevent,
    /// `SLOTS * SLOT_DESCS` descriptors of pinned, device-mapped host memory.
    host: *mut Desc,
    /// The device address of `host`.
    device: u64,
    events: Vec<sys::CUevent>,
    slots: Mutex<Slots>,
}

// SAFETY: the raw pointers are a driver allocation and driver events owned by the lane; all
// mutation of the slot memory happens under `slots`' mutex, and driver handles may be used from
// any thread once the context is bound (every method binds it).
unsafe impl Send for Lane {}
// SAFETY: as above; shared access goes through the mutex or through thread-safe driver calls.
unsafe impl Sync for Lane {}

impl Lane {
    /// A new non-blocking stream with its descriptor ring.
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<Lane, DmaError> {
        bind(ctx)?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("cuStreamCreate", e))?;
        let bytes = SLOTS * SLOT_DESCS * std::mem::size_of::<Desc>();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: allocates `bytes` of pinned host memory; freed in `Drop`.
        let host = unsafe { result::malloc_host(bytes, flags) }
            .map_err(|e| cuda_err("cuMemHostAlloc (descriptor ring)", e))?
            .cast::<Desc>();
        let mut lane = Lane {
            ctx: ctx.clone(),
            stream,
            extra: Vec::new(),
            fork: std::ptr::null_mut(),
            host,
            device: 0,
            events: Vec::with_capacity(SLOTS),
            slots: Mutex::new(Slots {
                next: 0,
                recorded: [false; SLOTS],
            }),
        };
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a live DEVICEMAP allocation; writes one device pointer.
        check(
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host.cast(), 0) },
            || "cuMemHostGetDevicePointer (descriptor ring)".into(),
        )?;
        lane.device = device;
        lane.fork = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| cuda_err("cuEventCreate (stream fork)", e))?;
        for _ in 1..MAX_SPLIT {
            let extra = ctx
                .new_stream()
                .map_err(|e| cuda_err("cuStreamCreate", e))?;
            let join = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| cuda_err("cuEventCreate (stream join)", e))?;
            lane.extra.push((extra, join));
        }
        for _ in 0..SLOTS {
            let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| cuda_err("cuEventCreate (descriptor slot)", e))?;
            lane.events.push(event);
        }
        Ok(lane)
    }

    /// Enqueues the copies of `descs` on the lane's stream with `mover`.
    ///
    /// # Safety
    /// Every descriptor must name device-accessible memory that stays valid until the stream has
    /// run past these copies (the caller bounds-checked the ops against the region and arena, and
    /// synchronizes the stream before either goes away).
    pub(crate) unsafe fn enqueue(&self, descs: &[Desc], mover: &Mover<'_>) -> Result<(), DmaError> {
        bind(&self.ctx)?;
        let stream = self.stream.cu_stream();
        match mover {
            Mover::Kernel(kernel) => {
                let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
                for piece in descs.chunks(SLOT_DESCS) {
                    let slot = slots.next;
                    slots.next = (slot + 1) % SLOTS;
                    if slots.recorded[slot] {
                        // SAFETY: the event is live (destroyed only in Drop).
                        check(
                            unsafe { sys::cuEventSynchronize(self.events[slot]) },
                            || "cuEventSynchronize (descriptor slot)".into(),
                        )?;
                    }
                    // SAFETY: slot `slot` lies inside the ring, and no launch reads it any more
                    // (its last event completed above, or it was never used).
                    unsafe {
                        let dst = self.host.add(slot * SLOT_DESCS);
                        std::ptr::copy_nonoverlapping(piece.as_ptr(), dst, piece.len());
                    }
                    let dptr =
                        self.device + (slot * SLOT_DESCS * std::mem::size_of::<Desc>()) as u64;
                    let n = piece.len() as u32;
                    let cfg = LaunchConfig {
                        grid_dim: (kernel.grid.min(n).max(1), 1, 1),
                        block_dim: (kernel.config.threads, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: the kernel takes (const PfDesc*, unsigned int); `dptr` holds `n`
                    // descriptors just written, and the caller guarantees what they point at.
                    unsafe {
                        self.stream
                            .launch_builder(&kernel.function)
                            .arg(&dptr)
                            .arg(&n)
                            .launch(cfg)
                    }
                    .map_err(|e| cuda_err("cuLaunchKernel (copy kernel)", e))?;
                    // SAFETY: live event and stream.
                    check(
                        unsafe { sys::cuEventRecord(self.events[slot], stream) },
                        || "cuEventRecord (descriptor slot)".into(),
                    )?;
                    slots.recorded[slot] = true;
                }
                Ok(())
            }
            Mover::BatchedMemcpy(split) => {
                let split = (*split).clamp(1, MAX_SPLIT);
                let per = descs.len().div_ceil(split).max(1);
                if descs.len() > per {
                    // SAFETY: live event and stream.
                    check(unsafe { sys::cuEventRecord(self.fork, stream) }, || {
                        "cuEventRecord (fork)".into()
                    })?;
                }
                for (i, part) in descs.chunks(per).enumerate() {
                    let on = if i == 0 {
                        stream
                    } else {
                        let extra = self.extra[i - 1].0.cu_stream();
                        // SAFETY: live event and streams; the part starts after the fork point.
                        check(
                            unsafe { sys::cuStreamWaitEvent(extra, self.fork, 0) },
                            || "cuStreamWaitEvent (fork)".into(),
                        )?;
                        extra
                    };
                    for piece in part.chunks(SLOT_DESCS) {
                        // SAFETY: forwarded from the caller.
                        unsafe { batch_memcpy(piece, on) }?;
                    }
                    if i > 0 {
                        let join = self.extra[i - 1].1;
                        // SAFETY: live event and streams; the lane's stream waits for the part.
                        check(unsafe { sys::cuEventRecord(join, on) }, || {
                            "cuEventRecord (join)".into()
                        })?;
                        check(unsafe { sys::cuStreamWaitEvent(stream, join, 0) }, || {
                            "cuStreamWaitEvent (join)".into()
                        })?;
                    }
                }
                Ok(())
            }
            Mover::PerOpMemcpy => {
                for d in descs {
                    // SAFETY: addresses are valid per the caller; the copy is stream-ordered.
                    check(
                        unsafe { sys::cuMemcpyAsync(d.dst, d.src, d.len as usize, stream) },
                        || "cuMemcpyAsync".into(),
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Enqueues the strided copies of `descs` on the lane's stream, issued as `how` says
    /// (batched: driver >= 13.0).
    ///
    /// # Safety
    /// As [`Lane::enqueue`]: every row of every descriptor names device-accessible memory that
    /// stays valid until the stream has run past these copies.
    pub(crate) unsafe fn enqueue_strided(
        &self,
        descs: &[StridedDesc],
        how: Strided,
    ) -> Result<(), DmaError> {
        bind(&self.ctx)?;
        let stream = self.stream.cu_stream();
        match how {
            Strided::Batch => descs.chunks(SLOT_DESCS).try_for_each(|piece| {
                // SAFETY: forwarded from the caller.
                unsafe { batch_memcpy_3d(piece, stream) }
            }),
            Strided::PerCopy => descs.iter().try_for_each(|d| {
                // SAFETY: forwarded from the caller.
                unsafe { memcpy_2d(d, stream) }
            }),
        }
    }

    /// Records a new event of the lane's own after everything enqueued so far, to learn when
    /// those copies have landed.
    pub(crate) fn mark(&self) -> Result<OwnedEvent, DmaError> {
        let event = OwnedEvent::new(&self.ctx)?;
        self.record(event.raw())?;
        Ok(event)
    }

    /// Blocks until everything enqueued on the lane has run.
    pub(crate) fn synchronize(&self) -> Result<(), DmaError> {
        bind(&self.ctx)?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("cuStreamSynchronize (copy lane)", e))
    }

    /// Makes everything enqueued on the lane after this wait for `event` (a save waiting on the
    /// engine's per-layer event, a load on the region's earlier saves), GPU-side.
    pub(crate) fn wait(&self, event: sys::CUevent) -> Result<(), DmaError> {
        bind(&self.ctx)?;
        // SAFETY: the caller passes a live event (opened in this context); the stream is live.
        check(
            unsafe { sys::cuStreamWaitEvent(self.stream.cu_stream(), event, 0) },
            || "cuStreamWaitEvent (copy lane)".into(),
        )
    }

    /// Records `event` on the lane's stream (the end of a layer).
    pub(crate) fn record(&self, event: sys::CUevent) -> Result<(), DmaError> {
        bind(&self.ctx)?;
        // SAFETY: the caller passes a live event of this context; the stream is live.
        check(
            unsafe { sys::cuEventRecord(event, self.stream.cu_stream()) },
            || "cuEventRecord (layer event)".into(),
        )
    }
}

/// No location hint: the hints only matter for managed memory.
const NO_HINT: sys::CUmemLocation = sys::CUmemLocation {
    type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_INVALID,
    id: 0,
};

/// One `cuMemcpyBatchAsync` of `piece` on `stream`.
///
/// # Safety
/// As [`Lane::enqueue`].
unsafe fn batch_memcpy(piece: &[Desc], stream: sys::CUstream) -> Result<(), DmaError> {
    let mut srcs: Vec<u64> = piece.iter().map(|d| d.src).collect();
    let mut dsts: Vec<u64> = piece.iter().map(|d| d.dst).collect();
    let mut sizes: Vec<usize> = piece.iter().map(|d| d.len as usize).collect();
    let mut attrs = sys::CUmemcpyAttributes {
        srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
        srcLocHint: NO_HINT,
        dstLocHint: NO_HINT,
        flags: 0,
    };
    let mut attr_idx = 0usize;
    // SAFETY: the arrays hold `piece.len()` entries and live across the call (the driver reads
    // them before returning); the addresses are valid per the caller.
    check(
        unsafe {
            sys::cuMemcpyBatchAsync_v2(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                piece.len(),
                &mut attrs,
                &mut attr_idx,
                1,
                stream,
            )
        },
        || "cuMemcpyBatchAsync".into(),
    )
}

/// One `cuMemcpy3DBatchAsync` of `piece` on `stream`: each descriptor is a pointer-to-pointer
/// copy of `rows` rows of `len` bytes (element size 1, depth 1), each side at its own pitch.
///
/// # Safety
/// As [`Lane::enqueue_strided`].
unsafe fn batch_memcpy_3d(piece: &[StridedDesc], stream: sys::CUstream) -> Result<(), DmaError> {
    let operand = |ptr: u64, pitch: u64, rows: u64| sys::CUmemcpy3DOperand {
        type_: sys::CUmemcpy3DOperandType::CU_MEMCPY_OPERAND_TYPE_POINTER,
        op: sys::CUmemcpy3DOperand_st__bindgen_ty_1 {
            ptr: sys::CUmemcpy3DOperand_st__bindgen_ty_1__bindgen_ty_1 {
                ptr,
                rowLength: pitch as usize,
                layerHeight: rows as usize,
                locHint: NO_HINT,
            },
        },
    };
    let mut ops: Vec<sys::CUDA_MEMCPY3D_BATCH_OP> = piece
        .iter()
        .map(|d| sys::CUDA_MEMCPY3D_BATCH_OP {
            src: operand(d.src, d.src_pitch, d.rows),
            dst: operand(d.dst, d.dst_pitch, d.rows),
            extent: sys::CUextent3D {
                width: d.len as usize,
                height: d.rows as usize,
                depth: 1,
            },
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            flags: 0,
        })
        .collect();
    // SAFETY: `ops` holds `ops.len()` entries and lives across the call (the driver reads it
    // before returning); the addresses are valid per the caller.
    check(
        unsafe { sys::cuMemcpy3DBatchAsync_v2(ops.len(), ops.as_mut_ptr(), 0, stream) },
        || "cuMemcpy3DBatchAsync".into(),
    )
}

/// One `cuMemcpy2DAsync` of `d` on `stream`, both sides addressed as unified pointers.
///
/// # Safety
/// As [`Lane::enqueue_strided`].
unsafe fn memcpy_2d(d: &StridedDesc, stream: sys::CUstream) -> Result<(), DmaError> {
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED,
        srcHost: std::ptr::null(),
        srcDevice: d.src,
        srcArray: std::ptr::null_mut(),
        srcPitch: d.src_pitch as usize,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED,
        dstHost: std::ptr::null_mut(),
        dstDevice: d.dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: d.dst_pitch as usize,
        WidthInBytes: d.len as usize,
        Height: d.rows as usize,
    };
    // SAFETY: `copy` lives across the call; the addresses are valid per the caller.
    check(unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream) }, || {
        "cuMemcpy2DAsync".into()
    })
}

impl Drop for Lane {
    fn drop(&mut self) {
        if bind(&self.ctx).is_err() {
            return;
        }
        if let Err(e) = self.stream.synchronize() {
            tracing::warn!(error = ?e, "copy lane did not drain before closing");
        }
        for (extra, join) in &self.extra {
            if let Err(e) = extra.synchronize() {
                tracing::warn!(error = ?e, "copy lane did not drain before closing");
            }
            // SAFETY: created in `new`, not used after the stream drained.
            unsafe { sys::cuEventDestroy_v2(*join) };
        }
        if !self.fork.is_null() {
            // SAFETY: created in `new`, not used after the streams drained.
            unsafe { sys::cuEventDestroy_v2(self.fork) };
        }
        for &event in &self.events {
            // SAFETY: created in `new`, not used after the stream drained.
            unsafe { sys::cuEventDestroy_v2(event) };
        }
        // SAFETY: allocated by `malloc_host` in `new`; the stream no longer reads it.
        if let Err(e) = unsafe { result::free_host(self.host.cast::<c_void>()) } {
            tracing::warn!(error = ?e, "cannot free descriptor ring");
        }
    }
}
