//! Engine KV memory on the GPU: opened from another process by CUDA IPC, or allocated here (for
//! the bench and tests, which cannot IPC-open their own allocations).
//!
//! An IPC handle names a whole `cudaMalloc` block; the region is `[offset, offset + bytes)` of it,
//! checked against the block's real size (`cuMemGetAddressRange`) and device at open. The handle
//! is opened once per registered engine and closed when the region drops, after the context has
//! drained, so no copy still in flight can touch unmapped memory.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

use crate::cuda::driver::{bind, check, cuda_err};
use crate::cuda::events::{EngineEvents, LayerEvents, OwnedEvent, EVENT_RING_SLOTS};
use crate::error::DmaError;

/// Where a region's bytes come from; released on drop.
enum Memory {
    /// `cuIpcOpenMemHandle` of another process's allocation; base of the whole block.
    Ipc(sys::CUdeviceptr),
    /// `cuMemAlloc` in this process.
    Owned(sys::CUdeviceptr),
}

/// An engine's KV memory on the GPU, with its ring of per-layer load events and the engine's own
/// per-layer events that saves wait on.
pub struct CudaRegion {
    ctx: Arc<CudaContext>,
    memory: Memory,
    /// First byte of the region (block base + offset).
    device_ptr: u64,
    bytes: u64,
    pub(crate) events: LayerEvents,
    pub(crate) engine_events: EngineEvents,
    /// Recorded on the save stream after each save layer's copies: a load into the region waits
    /// on it first, so it never overwrites a block an earlier save still reads.
    pub(crate) saves_queued: OwnedEvent,
}

// SAFETY: the device pointers are plain addresses owned by this value; driver calls on them are
// thread-safe once the context is bound, which every method does.
unsafe impl Send for CudaRegion {}
// SAFETY: `&CudaRegion` exposes only the addresses and the event ring (itself Sync).
unsafe impl Sync for CudaRegion {}

impl std::fmt::Debug for CudaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRegion")
            .field("device_ptr", &format_args!("{:#x}", self.device_ptr))
            .field("bytes", &self.bytes)
            .field("ipc", &matches!(self.memory, Memory::Ipc(_)))
            .finish()
    }
}

impl CudaRegion {
    /// Opens `handle` and checks that `[offset, offset + bytes)` lies in the block, on `ordinal`;
    /// opens the engine's `engine_events` too.
    pub(crate) fn open_ipc(
        ctx: &Arc<CudaContext>,
        ordinal: usize,
        handle: &[u8; 64],
        offset: u64,
        bytes: u64,
        engine_events: &[[u8; 64]],
    ) -> Result<CudaRegion, DmaError> {
        bind(ctx)?;
        if bytes == 0 {
            return Err(DmaError::EmptyRegion {
                name: "CUDA IPC region".into(),
            });
        }
        let handle = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        let mut base: sys::CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: writes one device pointer; the mapping is closed in Drop.
        check(
            unsafe { sys::cuIpcOpenMemHandle_v2(&mut base, handle, flags) },
            || "cuIpcOpenMemHandle (engine KV region)".into(),
        )?;
        // From here on, `region` owns the mapping and closes it on any error below.
        let mut region = CudaRegion {
            ctx: ctx.clone(),
            memory: Memory::Ipc(base),
            device_ptr: base,
            bytes,
            events: LayerEvents::new(ctx, 0)?,
            engine_events: EngineEvents::open(ctx, &[])?,
            saves_queued: OwnedEvent::new(ctx)?,
        };
        let (mut block, mut size) = (0, 0usize);
        // SAFETY: `base` is a live mapping; writes its allocation's base and size.
        check(
            unsafe { sys::cuMemGetAddressRange_v2(&mut block, &mut size, base) },
            || "cuMemGetAddressRange (engine KV region)".into(),
        )?;
        let end = offset.checked_add(bytes);
        if end.is_none_or(|end| end > size as u64) {
            return Err(DmaError::OutOfBounds {
                what: "CUDA IPC allocation",
                offset,
                len: bytes,
                limit: size as u64,
            });
        }
        let mut on: i32 = -1;
        // SAFETY: `base` is a live device pointer; writes one int.
        check(
            unsafe {
                sys::cuPointerGetAttribute(
                    (&mut on as *mut i32).cast(),
                    sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                    base,
                )
            },
            || "cuPointerGetAttribute (region device)".into(),
        )?;
        if on != ordinal as i32 {
            return Err(DmaError::CudaUnavailable(format!(
                "the region lives on device {on}, but this engine copies for device {ordinal}"
            )));
        }
        region.device_ptr = base + offset;
        region.events = LayerEvents::new(ctx, EVENT_RING_SLOTS)?;
        region.engine_events = EngineEvents::open(ctx, engine_events)?;
        tracing::debug!(
            offset,
            bytes,
            block_bytes = size,
            engine_events = engine_events.len(),
            "opened CUDA IPC region"
        );
        Ok(region)
    }

    /// Allocates `bytes` of device memory as a region (bench and tests).
    pub(crate) fn alloc(ctx: &Arc<CudaContext>, bytes: u64) -> Result<CudaRegion, DmaError> {
        bind(ctx)?;
        // SAFETY: plain device allocation, freed in Drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(1) as usize) }
            .map_err(|e| cuda_err("cuMemAlloc (region)", e))?;
        let mut region = CudaRegion {
            ctx: ctx.clone(),
            memory: Memory::Owned(ptr),
            device_ptr: ptr,
            bytes,
            events: LayerEvents::new(ctx, 0)?,
            engine_events: EngineEvents::open(ctx, &[])?,
            saves_queued: OwnedEvent::new(ctx)?,
        };
        region.events = LayerEvents::new(ctx, EVENT_RING_SLOTS)?;
        Ok(region)
    }

    /// The device address of the region's first byte.
    pub fn device_ptr(&self) -> u64 {
        self.device_ptr
    }

    /// The region's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for CudaRegion {
    fn drop(&mut self) {
        if bind(&self.ctx).is_err() {
            return;
        }
        // Copies into or out of this region may still be queued on the engine's streams.
        if let Err(e) = self.ctx.synchronize() {
            tracing::warn!(error = ?e, "context did not drain before closing a region");
        }
        match self.memory {
            Memory::Ipc(base) => {
                // SAFETY: opened by cuIpcOpenMemHandle in `open_ipc`, no work uses it any more.
                let status = unsafe { sys::cuIpcCloseMemHandle(base) };
                if let Err(e) = check(status, || "cuIpcCloseMemHandle".into()) {
                    tracing::warn!(%e, "cannot close CUDA IPC region");
                }
            }
            Memory::Owned(ptr) => {
                // SAFETY: allocated by cuMemAlloc in `alloc`, no work uses it any more.
                if let Err(e) = unsafe { result::free_sync(ptr) } {
                    tracing::warn!(error = ?e, "cannot free region memory");
                }
            }
        }
    }
}
