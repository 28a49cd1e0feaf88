//! PegaFlow copy engines: moving KV-cache bytes between an inference engine and the node's pool.
//!
//! The node keeps KV blocks in one pool [`Arena`] and copies bytes between an engine's KV region
//! and arena pages, one layer at a time, as a batch of scattered contiguous copies ([`CopyOp`]).
//! The transfer actors are generic over the [`DmaEngine`] trait, which has two implementations:
//!
//! - [`HostDmaEngine`] (here): the region is a POSIX shared-memory file the connector created under
//!   `/dev/shm`, copies are `memcpy`. For machines without a GPU (CI, vLLM CPU).
//! - [`CudaDmaEngine`]: the region is engine GPU memory opened by CUDA IPC, the arena is pinned
//!   and mapped for the GPU, and a layer's batch (or a save's group of layers) is one batched
//!   copy on the copy engines or one gather/scatter kernel launch on the direction's stream.
//!   Loaded at run time; without a driver `new` says why.
//!
//! Modules hold one concept each: [`arena`](Arena) (pool memory), `region` (what a region is and
//! how a shared-memory one is opened), `engine` (the trait and its op types), `job` (the order in
//! which a whole save or load drives an engine), `progress` (the board that lets a load be
//! answered before its layers are enqueued), `fault` (the guard that turns a client shrinking a
//! mapped file into an error instead of `SIGBUS`), `host` (the host engine), `cuda` (the CUDA
//! engine, itself split by concept), `numa` (where the arena's pages go), `topology` (the host's
//! NUMA nodes and GPUs), `error`.

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
compile_error!(
    "pegaflow-gpu-dma supports 64-bit Linux only (memfd, /dev/shm, u64 offsets as usize)"
);

mod arena;
mod cuda;
mod engine;
mod error;
mod fault;
mod host;
mod job;
mod numa;
mod progress;
mod region;
mod topology;

pub use arena::Arena;
pub use cuda::{
    CopyPath, CudaDmaEngine, CudaLayerEnd, CudaRegion, EventRing, KernelConfig, PinProgress,
    EVENT_RING_SLOTS, PIN_CHUNK_BYTES,
};
pub use engine::{CopyOp, Direction, DmaEngine};
pub use error::DmaError;
pub use host::HostDmaEngine;
pub use job::{enqueue_layers, finish_layers, EnqueuedLayer};
pub use progress::{ProgressBoard, FAILED as PROGRESS_FAILED};
pub use region::{HostRegion, RegionSource};
pub use topology::{canonical_gpu_uuid, discover_gpus, numa_nodes, GpuDevice};
