//! The CUDA copy engine: engine KV tensors opened by CUDA IPC, the pool arena pinned and mapped
//! for the GPU, and each layer's batch moved by one gather/scatter kernel launch.
//!
//! Modules: `driver` (finding the driver, the context, error mapping), `pinned` (background
//! registration of the arena), `kernel` (the copy kernel and its descriptors), `lane` (a
//! direction's stream and descriptor ring), `region` (IPC-opened or local GPU memory), `events`
//! (per-layer interprocess events and their ring).
//!
//! Everything is loaded at run time through cudarc's dynamic loading, so this code builds and its
//! CPU-side logic is tested on machines without CUDA; [`CudaDmaEngine::new`] then returns
//! [`DmaError::CudaUnavailable`] with the reason.

mod driver;
mod events;
mod kernel;
mod lane;
mod pinned;
mod region;

use std::sync::{Arc, PoisonError, RwLock};

use cudarc::driver::CudaContext;

use crate::arena::Arena;
use crate::engine::{CopyOp, Direction, DmaEngine};
use crate::error::{check_span, DmaError};
use crate::numa::{self, NumaPlacement};
use crate::region::RegionSource;

pub use events::{EventRing, EVENT_RING_SLOTS};
pub use kernel::KernelConfig;
pub use pinned::{PinProgress, PIN_CHUNK_BYTES};
pub use region::CudaRegion;

use driver::DeviceInfo;
use kernel::{build_descriptors, Kernel};
use lane::{Lane, Mover};
use pinned::PinnedArena;
use std::time::Instant;

/// How the engine moves a layer's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyPath {
    /// The NVRTC-compiled gather/scatter kernel (the default where NVRTC is present).
    Kernel(KernelConfig),
    /// `cuMemcpyBatchAsync` on the copy engines (driver >= 13.0), each batch split over `streams`
    /// streams (1 to 4) so several copy engines work on it.
    BatchedMemcpy {
        /// Streams one batch is spread over.
        streams: u32,
    },
    /// One `cuMemcpyAsync` per op (the fallback on older drivers).
    PerOpMemcpy,
}

/// The path's current mover: the kernel is compiled once when the path is chosen.
enum Active {
    Kernel(Kernel),
    BatchedMemcpy(usize),
    PerOpMemcpy,
}

/// Copies between IPC-opened engine GPU memory and the pinned pool arena.
///
/// Field order is drop order: the lanes drain their streams before the kernel module, the pinned
/// registration and the context go.
pub struct CudaDmaEngine {
    save: Lane,
    load: Lane,
    /// The mover of saves (`[0]`) and of loads (`[1]`).
    active: [RwLock<Active>; 2],
    pinned: PinnedArena,
    arena: Arc<Arena>,
    info: DeviceInfo,
    ordinal: usize,
    /// Why the kernel path is not in use, when it is not.
    fallback_reason: Option<String>,
    /// Where start-up time went, for the log (the node must serve within 2 s).
    startup: String,
    ctx: Arc<CudaContext>,
}

impl CudaDmaEngine {
    /// Opens device `ordinal`, starts pinning `arena` in the background, and picks the copy path:
    /// batched memcpy on the copy engines where the driver has it (CUDA 13), else the gather
    /// kernel compiled with NVRTC, else (no NVRTC; the reason is in [`CudaDmaEngine::describe`])
    /// one memcpy per op.
    ///
    /// Returns [`DmaError::CudaUnavailable`] when there is no usable driver or device, so the
    /// node can log why and use the host engine.
    pub fn new(ordinal: usize, arena: Arc<Arena>) -> Result<CudaDmaEngine, DmaError> {
        let started = Instant::now();
        let (ctx, info) = driver::open_device(ordinal)?;
        let context_s = started.elapsed().as_secs_f64();
        let save = Lane::new(&ctx)?;
        let load = Lane::new(&ctx)?;
        place_arena(&ctx, &arena);
        let pinned = PinnedArena::start(ctx.clone(), arena.clone())?;
        // Measured on an H100 (docs/benchmarks-gpu.md): the copy engines driven by
        // cuMemcpyBatchAsync reach 0.98x of contiguous cudaMemcpy on loads and 0.96-1.03x with
        // saves and loads at once, where the kernel's SM-issued PCIe traffic stops at 0.92x
        // (loads) and 0.68x (both at once). So the kernel is only the default where the driver has
        // no batched memcpy (CUDA 12), and is then compiled at start.
        let compile_started = Instant::now();
        let (path, fallback_reason) = if info.driver_version >= 13000 {
            (Active::BatchedMemcpy(DEFAULT_SPLIT), None)
        } else {
            match Kernel::compile(&ctx, &info, KernelConfig::default()) {
                Ok(kernel) => (Active::Kernel(kernel), None),
                Err(e) => {
                    tracing::warn!(%e, "copy kernel unavailable; using one memcpy per op");
                    (Active::PerOpMemcpy, Some(e.to_string()))
                }
            }
        };
        let startup = format!(
            "context {context_s:.2} s, copy path {:.2} s, total {:.2} s",
            compile_started.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        let (save_path, load_path) = match path {
            Active::Kernel(kernel) => (Active::Kernel(kernel.clone()), Active::Kernel(kernel)),
            Active::BatchedMemcpy(n) => (Active::BatchedMemcpy(n), Active::BatchedMemcpy(n)),
            Active::PerOpMemcpy => (Active::PerOpMemcpy, Active::PerOpMemcpy),
        };
        let engine = CudaDmaEngine {
            save,
            load,
            active: [RwLock::new(save_path), RwLock::new(load_path)],
            pinned,
            arena,
            info,
            ordinal,
            fallback_reason,
            startup,
            ctx,
        };
        tracing::info!(engine = %engine.describe(), "CUDA copy engine ready");
        Ok(engine)
    }

    /// One line for the start-up log: device, driver, copy path and why.
    pub fn describe(&self) -> String {
        let DeviceInfo {
            name,
            compute_capability: (major, minor),
            sm_count,
            driver_version,
        } = &self.info;
        let path = format!(
            "saves: {}, loads: {}",
            path_text(self.copy_path(Direction::Save)),
            path_text(self.copy_path(Direction::Load))
        );
        let why = self
            .fallback_reason
            .as_deref()
            .map(|r| format!(" (kernel unavailable: {r})"))
            .unwrap_or_default();
        format!(
            "device {} {name} (sm_{major}{minor}, {sm_count} SMs), driver {}.{}, {path}{why}; \
             start-up: {}",
            self.ordinal,
            driver_version / 1000,
            driver_version % 1000 / 10,
            self.startup
        )
    }

    /// The copy path `direction` uses.
    pub fn copy_path(&self, direction: Direction) -> CopyPath {
        match &*self.active[direction_index(direction)]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Active::Kernel(k) => CopyPath::Kernel(k.config),
            Active::BatchedMemcpy(n) => CopyPath::BatchedMemcpy { streams: *n as u32 },
            Active::PerOpMemcpy => CopyPath::PerOpMemcpy,
        }
    }

    /// Switches the copy path of `direction` (compiling the kernel for a new config); the bench
    /// compares paths and kernel shapes with it. Waits for that direction's copies first.
    pub fn set_copy_path(&self, direction: Direction, path: CopyPath) -> Result<(), DmaError> {
        let next = match path {
            CopyPath::Kernel(config) => {
                Active::Kernel(Kernel::compile(&self.ctx, &self.info, config)?)
            }
            CopyPath::BatchedMemcpy { .. } if self.info.driver_version < 13000 => {
                return Err(DmaError::CudaUnavailable(
                    "cuMemcpyBatchAsync needs a CUDA 13 driver".into(),
                ))
            }
            CopyPath::BatchedMemcpy { streams } => {
                Active::BatchedMemcpy((streams as usize).clamp(1, lane::MAX_SPLIT))
            }
            CopyPath::PerOpMemcpy => Active::PerOpMemcpy,
        };
        let mut active = self.active[direction_index(direction)]
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.lane(direction).synchronize()?;
        *active = next;
        Ok(())
    }

    /// How far pinning the arena has come.
    pub fn pin_progress(&self) -> PinProgress {
        self.pinned.progress()
    }

    /// Blocks until the whole arena is pinned (or a chunk failed).
    pub fn wait_pinned(&self) -> Result<PinProgress, DmaError> {
        self.pinned.wait_all()
    }

    /// Allocates `bytes` of device memory as a region, for benchmarks and tests (a process cannot
    /// IPC-open its own allocation).
    pub fn alloc_region(&self, bytes: u64) -> Result<CudaRegion, DmaError> {
        CudaRegion::alloc(&self.ctx, bytes)
    }

    /// The CUDA context, for benchmarks that time plain copies next to the engine.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn lane(&self, direction: Direction) -> &Lane {
        match direction {
            Direction::Save => &self.save,
            Direction::Load => &self.load,
        }
    }
}

/// Puts the arena's pages on the NUMA node of the device's PCIe root, before pinning touches them;
/// logs what was done and why. Failing to place is not an error: the pool works, only slower.
fn place_arena(ctx: &CudaContext, arena: &Arena) {
    let bus_id = match driver::pci_bus_id(ctx) {
        Ok(bus_id) => bus_id,
        Err(e) => {
            tracing::warn!(%e, "pool arena left to the default NUMA policy");
            return;
        }
    };
    match numa::placement(std::path::Path::new(numa::SYSFS_ROOT), &bus_id) {
        NumaPlacement::Prefer(node) => match arena.prefer_numa_node(node) {
            Ok(()) => tracing::info!(
                gpu = %bus_id,
                node,
                "pool arena pages preferred on the GPU's NUMA node (mbind MPOL_PREFERRED)"
            ),
            Err(e) => tracing::warn!(
                gpu = %bus_id,
                node,
                error = %e,
                "cannot prefer the GPU's NUMA node for the pool arena"
            ),
        },
        NumaPlacement::Skip(why) => tracing::info!(
            gpu = %bus_id,
            reason = %why,
            "pool arena left to the default NUMA policy"
        ),
    }
}

/// Streams a batched memcpy is split over by default: splitting over 2 or 4 measured no gain.
const DEFAULT_SPLIT: usize = 1;

/// Index of `direction` in per-direction arrays.
fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Save => 0,
        Direction::Load => 1,
    }
}

/// A copy path in words, for the start-up log.
fn path_text(path: CopyPath) -> String {
    match path {
        CopyPath::Kernel(k) => format!(
            "gather kernel ({} threads x {} blocks/SM, unroll {}, {} KiB chunks)",
            k.threads,
            k.blocks_per_sm,
            k.unroll,
            k.chunk_bytes >> 10
        ),
        CopyPath::BatchedMemcpy { streams } => {
            format!("cuMemcpyBatchAsync over {streams} stream(s)")
        }
        CopyPath::PerOpMemcpy => "one cuMemcpyAsync per op".into(),
    }
}

impl DmaEngine for CudaDmaEngine {
    type Region = CudaRegion;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn open_region(&self, source: &RegionSource) -> Result<CudaRegion, DmaError> {
        match source {
            RegionSource::CudaIpc {
                handle,
                offset,
                bytes,
                device: _,
                engine_events,
            } => CudaRegion::open_ipc(
                &self.ctx,
                self.ordinal,
                handle,
                *offset,
                *bytes,
                engine_events,
            ),
            RegionSource::SharedMemory { .. } => Err(DmaError::UnsupportedRegion {
                engine: "cuda",
                kind: source.kind(),
            }),
        }
    }

    fn copy_layer(
        &self,
        region: &CudaRegion,
        direction: Direction,
        ops: &[CopyOp],
    ) -> Result<(), DmaError> {
        let (mut lo, mut hi) = (u64::MAX, 0);
        for op in ops {
            check_span("region", op.region_offset, op.len, region.bytes())?;
            check_span("arena", op.arena_offset, op.len, self.arena.len())?;
            if op.len > 0 {
                lo = lo.min(op.arena_offset);
                hi = hi.max(op.arena_offset + op.len);
            }
        }
        if lo >= hi {
            return Ok(());
        }
        self.pinned.wait_span(lo, hi - lo)?;
        let active = self.active[direction_index(direction)]
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let (mover, chunk) = match &*active {
            Active::Kernel(k) => (Mover::Kernel(k), k.config.chunk_bytes),
            Active::BatchedMemcpy(n) => (Mover::BatchedMemcpy(*n), u64::MAX),
            Active::PerOpMemcpy => (Mover::PerOpMemcpy, u64::MAX),
        };
        let mut descs = Vec::with_capacity(ops.len());
        let arena_base = self.arena.base_ptr() as u64;
        build_descriptors(
            ops,
            direction,
            region.device_ptr(),
            arena_base,
            chunk,
            PIN_CHUNK_BYTES,
            &mut descs,
        );
        // SAFETY: every op was bounds-checked against the region and the arena above, the arena
        // span is pinned (device-mapped at its host address), and both outlive the copies: the
        // caller holds the region and calls `finish` (or drops the region, which drains the
        // context) before releasing it, and the engine drains its lanes before unpinning.
        unsafe { self.lane(direction).enqueue(&descs, &mover) }
    }

    fn finish(&self, _region: &CudaRegion, direction: Direction) -> Result<(), DmaError> {
        self.lane(direction).synchronize()
    }

    fn wait_engine_event(&self, region: &CudaRegion, slot: u32) -> Result<(), DmaError> {
        self.save.wait(region.engine_events.event(slot)?)
    }

    fn record_layer_event(&self, region: &CudaRegion, slot: u32) -> Result<(), DmaError> {
        self.load.record(region.events.event(slot)?)
    }

    fn layer_event_handles(&self, region: &CudaRegion) -> Vec<[u8; 64]> {
        region.events.handles().to_vec()
    }
}
