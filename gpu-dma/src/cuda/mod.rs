//! The CUDA copy engine: engine KV tensors opened by CUDA IPC, the pool arena pinned and mapped
//! for the GPU, and each layer's batch (or a save's group of layers) moved by one batched copy
//! on the copy engines or one gather/scatter kernel launch, per direction as chosen.
//!
//! Modules: `driver` (finding the driver, the context, error mapping), `pinned` (background
//! registration of the arena), `kernel` (the copy kernel and its descriptors), `strided`
//! (merging a block's copies over layers into one strided copy), `lane` (a direction's stream
//! and descriptor ring), `region` (IPC-opened or local GPU memory), `events` (per-layer
//! interprocess events and their ring, and the ends of layers).
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
mod strided;

use std::sync::{Arc, PoisonError, RwLock};

use cudarc::driver::CudaContext;

use crate::arena::Arena;
use crate::engine::{CopyOp, Direction, DmaEngine};
use crate::error::{check_span, DmaError};
use crate::numa::{self, NumaPlacement};
use crate::region::RegionSource;

pub use events::{CudaLayerEnd, EventRing, EVENT_RING_SLOTS};
pub use kernel::KernelConfig;
pub use pinned::{PinProgress, PIN_CHUNK_BYTES};
pub use region::CudaRegion;

pub(crate) use driver::pci_bus_id_of;
use driver::{bind, DeviceInfo};
use events::End;
use kernel::{build_descriptors, Kernel};
use lane::{Lane, Mover, Strided};
use pinned::PinnedArena;
use std::time::Instant;
use strided::{merge_layers, strided_descriptors};

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
    /// `cuMemcpy3DBatchAsync` on the copy engines (driver >= 13.0) over groups of `layers`
    /// consecutive layers of a job: each block's copies in those layers become one strided copy
    /// (`strided.rs`), so the copy engines launch one copy per block and group instead of one per
    /// block and layer. A group's copies start once its last layer is ready.
    StridedBatch {
        /// Consecutive layers merged into one copy per block (at least 1).
        layers: u32,
    },
    /// The strided copies of [`CopyPath::StridedBatch`], each issued as its own
    /// `cuMemcpy2DAsync`: for the bench, to tell whether the batched call keeps 2D copies whole.
    StridedPerCopy {
        /// Consecutive layers merged into one copy per block (at least 1).
        layers: u32,
    },
    /// One `cuMemcpyAsync` per op (the fallback on older drivers).
    PerOpMemcpy,
}

/// How a new engine gets its arena pinned.
enum Pinning {
    /// Prefer the GPU's NUMA node for the arena's pages, then pin it.
    PlaceAndPin,
    /// Pin it where the caller placed it.
    Pin,
    /// Another engine of the process pinned it (portable to every context).
    Shared(Arc<PinnedArena>),
}

/// The path's current mover: the kernel is compiled once when the path is chosen.
enum Active {
    Kernel(Kernel),
    BatchedMemcpy(usize),
    /// Layers per strided copy, and how the copies are issued.
    Strided(usize, Strided),
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
    /// Shared by every engine of the process: the registration is portable to all contexts.
    pinned: Arc<PinnedArena>,
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
    /// Opens device `ordinal`, starts pinning `arena` in the background, and picks the copy path
    /// of each direction: where the driver has batched memcpy (CUDA 13), strided batches of
    /// `DEFAULT_SAVE_LAYERS` (32) layers for saves and batched memcpy for loads, both on the copy
    /// engines; else the gather kernel compiled with NVRTC both ways, else (no NVRTC; the reason
    /// is in [`CudaDmaEngine::describe`]) one memcpy per op.
    ///
    /// Returns [`DmaError::CudaUnavailable`] when there is no usable driver or device, so the
    /// node can log why and use the host engine.
    pub fn new(ordinal: usize, arena: Arc<Arena>) -> Result<CudaDmaEngine, DmaError> {
        Self::open(ordinal, arena, Pinning::PlaceAndPin)
    }

    /// [`CudaDmaEngine::new`] for an arena whose NUMA placement the caller chose (the node puts
    /// each NUMA node's pool on its node): pins it without giving it the GPU's node.
    pub fn over_placed(ordinal: usize, arena: Arc<Arena>) -> Result<CudaDmaEngine, DmaError> {
        Self::open(ordinal, arena, Pinning::Pin)
    }

    /// Opens device `ordinal` copying into the arena `first` copies into, without pinning it
    /// again: the arena is registered once, portable to every context of the process
    /// (`CU_MEMHOSTREGISTER_PORTABLE`), so each GPU's engine addresses the same pinned pages.
    pub fn alongside(ordinal: usize, first: &CudaDmaEngine) -> Result<CudaDmaEngine, DmaError> {
        let pinned = Pinning::Shared(first.pinned.clone());
        Self::open(ordinal, first.arena.clone(), pinned)
    }

    fn open(
        ordinal: usize,
        arena: Arc<Arena>,
        pinning: Pinning,
    ) -> Result<CudaDmaEngine, DmaError> {
        let started = Instant::now();
        let (ctx, info) = driver::open_device(ordinal)?;
        let context_s = started.elapsed().as_secs_f64();
        let save = Lane::new(&ctx)?;
        let load = Lane::new(&ctx)?;
        let pinned = match pinning {
            Pinning::Shared(pinned) => pinned,
            Pinning::PlaceAndPin => {
                place_arena(&ctx, &arena);
                Arc::new(PinnedArena::start(ctx.clone(), arena.clone())?)
            }
            Pinning::Pin => Arc::new(PinnedArena::start(ctx.clone(), arena.clone())?),
        };
        let compile_started = Instant::now();
        let (save_path, load_path, fallback_reason) = default_paths(&ctx, &info)?;
        let startup = format!(
            "context {context_s:.2} s, copy path {:.2} s, total {:.2} s",
            compile_started.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
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
            ..
        } = &self.info;
        let path = format!(
            "saves: {}, loads: {}",
            self.copy_path(Direction::Save),
            self.copy_path(Direction::Load)
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
            Active::Strided(n, Strided::Batch) => CopyPath::StridedBatch { layers: *n as u32 },
            Active::Strided(n, Strided::PerCopy) => CopyPath::StridedPerCopy { layers: *n as u32 },
            Active::PerOpMemcpy => CopyPath::PerOpMemcpy,
        }
    }

    /// Switches the copy path of `direction` (compiling the kernel for a new config); the bench
    /// compares paths and kernel shapes with it. Waits for that direction's copies first; the
    /// path in use already is left as it is.
    pub fn set_copy_path(&self, direction: Direction, path: CopyPath) -> Result<(), DmaError> {
        if self.copy_path(direction) == path {
            return Ok(());
        }
        let next = prepare(&self.ctx, &self.info, path)?;
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

    /// Bounds-checks every op of `layers` against the region and the arena before anything is
    /// enqueued; returns the arena span `(start, end)` the non-empty ones touch, if any.
    fn check_ops(
        &self,
        region: &CudaRegion,
        layers: &[&[CopyOp]],
    ) -> Result<Option<(u64, u64)>, DmaError> {
        let (mut lo, mut hi) = (u64::MAX, 0);
        for op in layers.iter().copied().flatten() {
            check_span("region", op.region_offset, op.len, region.bytes())?;
            check_span("arena", op.arena_offset, op.len, self.arena.len())?;
            if op.len > 0 {
                lo = lo.min(op.arena_offset);
                hi = hi.max(op.arena_offset + op.len);
            }
        }
        Ok((lo < hi).then_some((lo, hi)))
    }

    /// Enqueues the copies of consecutive `layers` in `direction` with the direction's path: one
    /// batch of strided copies on the strided path, else all layers' descriptors in one enqueue.
    fn submit(
        &self,
        region: &CudaRegion,
        direction: Direction,
        layers: &[&[CopyOp]],
    ) -> Result<(), DmaError> {
        // What makes the enqueues below sound: every op was bounds-checked against the region and
        // the arena here, the arena span is pinned (device-mapped at its host address), and both
        // outlive the copies: the caller holds the region and calls `finish` (or drops the
        // region, which drains the context) before releasing it, and the engine drains its lanes
        // before unpinning.
        let Some((lo, hi)) = self.check_ops(region, layers)? else {
            return Ok(());
        };
        self.pinned.wait_span(lo, hi - lo)?;
        let active = self.active[direction_index(direction)]
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let (region_base, arena_base) = (region.device_ptr(), self.arena.base_ptr() as u64);
        let lane = self.lane(direction);
        let (mover, chunk) = match &*active {
            // One layer has nothing to merge, and plain batched copies are cheaper to issue.
            Active::Strided(..) if layers.len() == 1 => {
                (Mover::BatchedMemcpy(DEFAULT_SPLIT as usize), u64::MAX)
            }
            Active::Strided(_, how) => {
                let mut descs = Vec::new();
                strided_descriptors(
                    &merge_layers(layers, self.info.max_pitch),
                    direction,
                    region_base,
                    arena_base,
                    PIN_CHUNK_BYTES,
                    &mut descs,
                );
                // SAFETY: see the note at the top of this function.
                return unsafe { lane.enqueue_strided(&descs, *how) };
            }
            Active::Kernel(k) => (Mover::Kernel(k), k.config.chunk_bytes),
            Active::BatchedMemcpy(n) => (Mover::BatchedMemcpy(*n), u64::MAX),
            Active::PerOpMemcpy => (Mover::PerOpMemcpy, u64::MAX),
        };
        let mut descs = Vec::with_capacity(layers.iter().map(|ops| ops.len()).sum());
        for ops in layers {
            build_descriptors(
                ops,
                direction,
                region_base,
                arena_base,
                chunk,
                PIN_CHUNK_BYTES,
                &mut descs,
            );
        }
        // SAFETY: see the note at the top of this function.
        unsafe { lane.enqueue(&descs, &mover) }
    }
}

/// The mover of `path` (compiling the kernel for a kernel path), or why this driver cannot run it.
fn prepare(ctx: &Arc<CudaContext>, info: &DeviceInfo, path: CopyPath) -> Result<Active, DmaError> {
    Ok(match path {
        CopyPath::Kernel(config) => Active::Kernel(Kernel::compile(ctx, info, config)?),
        CopyPath::BatchedMemcpy { .. } | CopyPath::StridedBatch { .. }
            if info.driver_version < BATCHED_MEMCPY_DRIVER =>
        {
            return Err(DmaError::CudaUnavailable(
                "cuMemcpyBatchAsync and cuMemcpy3DBatchAsync need a CUDA 13 driver".into(),
            ))
        }
        CopyPath::BatchedMemcpy { streams } => {
            Active::BatchedMemcpy((streams as usize).clamp(1, lane::MAX_SPLIT))
        }
        CopyPath::StridedBatch { layers } => {
            Active::Strided((layers as usize).max(1), Strided::Batch)
        }
        CopyPath::StridedPerCopy { layers } => {
            Active::Strided((layers as usize).max(1), Strided::PerCopy)
        }
        CopyPath::PerOpMemcpy => Active::PerOpMemcpy,
    })
}

/// The first driver version (CUDA 13.0) with the batched memcpy calls used here.
const BATCHED_MEMCPY_DRIVER: i32 = 13000;

/// The default paths of saves and of loads on the copy engines, where the driver has batched
/// memcpy; `None` below it, where the gather kernel is the default both ways.
///
/// Measured on an H100 (docs/benchmarks.md, GPU copy engine): the copy engines driven by
/// `cuMemcpyBatchAsync` reach 0.98x of contiguous `cudaMemcpy` on loads and 0.96-1.03x with saves
/// and loads at once, where the kernel's SM-issued PCIe traffic stops at 0.92x (loads) and 0.68x
/// (both at once). Saves pay a per-copy cost on the copy engines (0.87x with 64 KiB copies), which
/// merging each block's layers into one strided copy removes.
fn copy_engine_defaults(driver_version: i32) -> Option<(CopyPath, CopyPath)> {
    (driver_version >= BATCHED_MEMCPY_DRIVER).then_some((
        CopyPath::StridedBatch {
            layers: DEFAULT_SAVE_LAYERS,
        },
        CopyPath::BatchedMemcpy {
            streams: DEFAULT_SPLIT,
        },
    ))
}

/// The movers of saves and loads on a new engine, and why the kernel is not in use when NVRTC is
/// missing on a driver that needs it (then one memcpy per op). The kernel, where it is the
/// default, is compiled at start.
fn default_paths(
    ctx: &Arc<CudaContext>,
    info: &DeviceInfo,
) -> Result<(Active, Active, Option<String>), DmaError> {
    if let Some((save, load)) = copy_engine_defaults(info.driver_version) {
        return Ok((prepare(ctx, info, save)?, prepare(ctx, info, load)?, None));
    }
    Ok(match Kernel::compile(ctx, info, KernelConfig::default()) {
        Ok(kernel) => (Active::Kernel(kernel.clone()), Active::Kernel(kernel), None),
        Err(e) => {
            tracing::warn!(%e, "copy kernel unavailable; using one memcpy per op");
            (
                Active::PerOpMemcpy,
                Active::PerOpMemcpy,
                Some(e.to_string()),
            )
        }
    })
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
const DEFAULT_SPLIT: u32 = 1;

/// Layers a bulk save merges into one strided copy per block by default. Measured on the H100
/// (docs/benchmarks.md): each strided copy costs more to issue than a plain one, so merging 4 or
/// 8 layers of 64 KiB pages ran at 0.66x / 0.80x of contiguous `cudaMemcpy`, below one plain
/// copy per layer (0.87x); 32 layers (a whole Llama-3.1-8B block) reached 0.94x / 0.97x / 0.97x
/// at 16 / 32 / 64-token blocks. Layer-wise saves (with engine events) copy one layer at a time
/// with plain batched copies instead ([`crate::job`]).
const DEFAULT_SAVE_LAYERS: u32 = 32;

/// Index of `direction` in per-direction arrays.
fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Save => 0,
        Direction::Load => 1,
    }
}

/// A copy path in words, for the start-up log and the bench.
impl std::fmt::Display for CopyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyPath::Kernel(k) => {
                write!(
                    f,
                    "gather kernel ({} threads x {} blocks/SM",
                    k.threads, k.blocks_per_sm
                )?;
                if k.max_blocks > 0 {
                    write!(f, " up to {} blocks", k.max_blocks)?;
                }
                write!(
                    f,
                    ", unroll {}, {} KiB chunks)",
                    k.unroll,
                    k.chunk_bytes >> 10
                )
            }
            CopyPath::BatchedMemcpy { streams } => {
                write!(f, "cuMemcpyBatchAsync over {streams} stream(s)")
            }
            CopyPath::StridedBatch { layers } => write!(
                f,
                "cuMemcpy3DBatchAsync, each block's copies of {layers} layers as one"
            ),
            CopyPath::StridedPerCopy { layers } => write!(
                f,
                "one cuMemcpy2DAsync per block's copies of {layers} layers"
            ),
            CopyPath::PerOpMemcpy => f.write_str("one cuMemcpyAsync per op"),
        }
    }
}

impl DmaEngine for CudaDmaEngine {
    type Region = CudaRegion;
    type LayerEnd = CudaLayerEnd;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn open_region(&self, source: &RegionSource) -> Result<CudaRegion, DmaError> {
        match source {
            RegionSource::CudaIpc {
                handle,
                offset,
                bytes,
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

    fn layers_per_copy(&self, direction: Direction) -> usize {
        match &*self.active[direction_index(direction)]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Active::Strided(layers, _) => *layers,
            _ => 1,
        }
    }

    fn copy_layer(
        &self,
        region: &CudaRegion,
        direction: Direction,
        ops: &[CopyOp],
    ) -> Result<(), DmaError> {
        self.submit(region, direction, &[ops])
    }

    fn copy_layers(
        &self,
        region: &CudaRegion,
        direction: Direction,
        layers: &[Vec<CopyOp>],
    ) -> Result<(), DmaError> {
        let layers: Vec<&[CopyOp]> = layers.iter().map(Vec::as_slice).collect();
        self.submit(region, direction, &layers)
    }

    fn end_layer(
        &self,
        region: &CudaRegion,
        direction: Direction,
        event_slot: Option<u32>,
    ) -> Result<CudaLayerEnd, DmaError> {
        let lane = self.lane(direction);
        let end = match event_slot {
            Some(slot) => {
                lane.record(region.events.event(slot)?)?;
                End::Ring(slot)
            }
            None => End::Own(lane.mark()?),
        };
        if direction == Direction::Save {
            lane.record(region.saves_queued.raw())?;
        }
        Ok(CudaLayerEnd(end))
    }

    fn wait_layer(&self, region: &CudaRegion, end: CudaLayerEnd) -> Result<Instant, DmaError> {
        bind(&self.ctx)?;
        match end.0 {
            End::Ring(slot) => events::synchronize(region.events.event(slot)?)?,
            End::Own(event) => events::synchronize(event.raw())?,
        }
        Ok(Instant::now())
    }

    fn finish(&self, _region: &CudaRegion, direction: Direction) -> Result<(), DmaError> {
        self.lane(direction).synchronize()
    }

    fn begin_job(&self, region: &CudaRegion, direction: Direction) -> Result<(), DmaError> {
        match direction {
            Direction::Load => self.load.wait(region.saves_queued.raw()),
            Direction::Save => Ok(()),
        }
    }

    fn wait_engine_event(&self, region: &CudaRegion, slot: u32) -> Result<(), DmaError> {
        self.save.wait(region.engine_events.event(slot)?)
    }

    fn layer_event_handles(&self, region: &CudaRegion) -> Vec<[u8; 64]> {
        region.events.handles().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_13_saves_strided_and_loads_batched_older_drivers_use_the_kernel() {
        assert_eq!(
            copy_engine_defaults(13000),
            Some((
                CopyPath::StridedBatch { layers: 32 },
                CopyPath::BatchedMemcpy { streams: 1 }
            ))
        );
        assert_eq!(copy_engine_defaults(13020), copy_engine_defaults(13000));
        assert_eq!(copy_engine_defaults(12090), None);
    }

    #[test]
    fn paths_name_themselves_for_the_log() {
        let kernel = CopyPath::Kernel(KernelConfig {
            max_blocks: 32,
            ..KernelConfig::default()
        });
        assert_eq!(
            kernel.to_string(),
            "gather kernel (512 threads x 2 blocks/SM up to 32 blocks, unroll 4, 64 KiB chunks)"
        );
        assert_eq!(
            CopyPath::StridedBatch { layers: 8 }.to_string(),
            "cuMemcpy3DBatchAsync, each block's copies of 8 layers as one"
        );
    }
}
