//! The gather/scatter copy kernel: its CUDA source, NVRTC compilation, and the descriptors a
//! layer's batch is turned into.
//!
//! One launch copies a whole layer: the host turns each [`CopyOp`] into absolute
//! `(src, dst, len)` descriptors, splitting ops longer than [`KernelConfig::chunk_bytes`] so the
//! grid's blocks get even shares, and each thread block takes descriptors in a grid-stride loop.
//! A descriptor is copied with 16-byte vector loads and stores (several in flight per thread,
//! because reads of host memory over PCIe take microseconds), a byte tail for lengths that are not
//! a multiple of 16, and a byte loop when either address is not 16-byte aligned. Arena pages are
//! addressed through their device-mapped host addresses, so the bytes cross PCIe inside the
//! kernel: one launch per layer instead of one `cudaMemcpy` per block, which costs ~6 GB/s at
//! 16 KiB blocks.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::cuda::driver::{cuda_err, DeviceInfo};
use crate::engine::{CopyOp, Direction};
use crate::error::DmaError;

/// The kernel's source; `PF_THREADS` and `PF_UNROLL` are set with `-D` at compile time.
const SOURCE: &str = r#"
struct PfDesc { unsigned long long src; unsigned long long dst; unsigned long long len; };

extern "C" __global__ void __launch_bounds__(PF_THREADS)
pf_copy(const PfDesc* __restrict__ descs, unsigned int n)
{
    __shared__ PfDesc cur;
    for (unsigned int i = blockIdx.x; i < n; i += gridDim.x) {
        if (threadIdx.x == 0) cur = descs[i];
        __syncthreads();
        const unsigned long long src = cur.src, dst = cur.dst, len = cur.len;
        __syncthreads();
        const unsigned char* s8 = reinterpret_cast<const unsigned char*>(src);
        unsigned char* d8 = reinterpret_cast<unsigned char*>(dst);
        if (((src | dst) & 15ull) == 0) {
            const uint4* s = reinterpret_cast<const uint4*>(src);
            uint4* d = reinterpret_cast<uint4*>(dst);
            const unsigned long long nv = len >> 4;
            for (unsigned long long base = threadIdx.x; base < nv;
                 base += (unsigned long long)PF_THREADS * PF_UNROLL) {
                uint4 v[PF_UNROLL];
#pragma unroll
                for (int u = 0; u < PF_UNROLL; ++u) {
                    const unsigned long long k = base + (unsigned long long)u * PF_THREADS;
                    if (k < nv) v[u] = s[k];
                }
#pragma unroll
                for (int u = 0; u < PF_UNROLL; ++u) {
                    const unsigned long long k = base + (unsigned long long)u * PF_THREADS;
                    if (k < nv) d[k] = v[u];
                }
            }
            const unsigned long long k = (nv << 4) + threadIdx.x;
            if (k < len) d8[k] = s8[k];
        } else {
            for (unsigned long long k = threadIdx.x; k < len; k += PF_THREADS) d8[k] = s8[k];
        }
    }
}
"#;

/// The kernel's entry point.
const ENTRY: &str = "pf_copy";

/// One contiguous copy between absolute device addresses, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Desc {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// Shape of the copy kernel's launches. On an H100 every shape the bench's sweep tried (256-1024
/// threads, unroll 2-8, 1024-2048 threads per SM, 16-64 KiB chunks) ran within 1 GB/s of the
/// default: the kernel is bound by PCIe efficiency of SM-issued traffic, not by its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// Threads per block.
    pub threads: u32,
    /// 16-byte vectors each thread loads before it stores them.
    pub unroll: u32,
    /// Blocks per multiprocessor in the grid.
    pub blocks_per_sm: u32,
    /// Most blocks in the grid, whatever `blocks_per_sm` gives; 0 for no cap. Fewer blocks issue
    /// fewer PCIe transactions at once, leaving room for the copy engines' traffic.
    pub max_blocks: u32,
    /// Ops longer than this are split into several descriptors.
    pub chunk_bytes: u64,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            threads: 512,
            unroll: 4,
            blocks_per_sm: 2,
            max_blocks: 0,
            chunk_bytes: 64 << 10,
        }
    }
}

/// Appends the descriptors of `ops` to `out`: absolute source and destination addresses for
/// `direction`, ops longer than `chunk` split into `chunk`-sized pieces, and pieces also split where
/// they cross a multiple of `arena_boundary` in the arena (the driver's memcpy refuses a span
/// that covers two separately pinned chunks), empty ops dropped.
pub(crate) fn build_descriptors(
    ops: &[CopyOp],
    direction: Direction,
    region_base: u64,
    arena_base: u64,
    chunk: u64,
    arena_boundary: u64,
    out: &mut Vec<Desc>,
) {
    let chunk = chunk.max(1);
    let boundary = arena_boundary.max(1);
    for op in ops {
        let region = region_base + op.region_offset;
        let arena = arena_base + op.arena_offset;
        let (src, dst) = match direction {
            Direction::Save => (region, arena),
            Direction::Load => (arena, region),
        };
        let mut done = 0;
        while done < op.len {
            let to_boundary = boundary - (op.arena_offset + done) % boundary;
            let len = chunk.min(op.len - done).min(to_boundary);
            out.push(Desc {
                src: src + done,
                dst: dst + done,
                len,
            });
            done += len;
        }
    }
}

/// The compiled kernel and the grid it launches with.
#[derive(Clone)]
pub(crate) struct Kernel {
    pub function: CudaFunction,
    pub config: KernelConfig,
    /// Blocks in the grid: `blocks_per_sm` per multiprocessor, at most `max_blocks`.
    pub grid: u32,
}

/// Why the kernel path is unavailable when NVRTC is missing, or `None` when it is present.
pub(crate) fn nvrtc_missing() -> Option<String> {
    // SAFETY: only tries to dlopen libnvrtc by its usual names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        None
    } else {
        Some("NVRTC (libnvrtc.so) is not installed or not on the loader path".into())
    }
}

impl Kernel {
    /// Compiles the kernel for this device with NVRTC and loads it into `ctx`.
    pub(crate) fn compile(
        ctx: &Arc<CudaContext>,
        device: &DeviceInfo,
        config: KernelConfig,
    ) -> Result<Kernel, DmaError> {
        if let Some(why) = nvrtc_missing() {
            return Err(DmaError::CudaUnavailable(why));
        }
        if config.threads == 0 || config.threads > 1024 || !config.threads.is_multiple_of(32) {
            return Err(DmaError::CudaUnavailable(format!(
                "kernel threads {} must be a multiple of 32 in 32..=1024",
                config.threads
            )));
        }
        let (major, minor) = device.compute_capability;
        let opts = CompileOptions {
            options: vec![
                format!("--gpu-architecture=compute_{major}{minor}"),
                format!("-DPF_THREADS={}", config.threads),
                format!("-DPF_UNROLL={}", config.unroll.max(1)),
            ],
            ..CompileOptions::default()
        };
        let ptx = compile_ptx_with_opts(SOURCE, opts).map_err(|e| DmaError::Cuda {
            op: "nvrtcCompileProgram (copy kernel)".into(),
            message: format!("{e:?}"),
        })?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| cuda_err("cuModuleLoadData (copy kernel)", e))?;
        let function = module
            .load_function(ENTRY)
            .map_err(|e| cuda_err("cuModuleGetFunction (copy kernel)", e))?;
        Ok(Kernel {
            function,
            config,
            grid: grid(device.sm_count, config),
        })
    }
}

/// Blocks in the grid of `config` on a device with `sm_count` multiprocessors.
fn grid(sm_count: u32, config: KernelConfig) -> u32 {
    let per_sm = sm_count * config.blocks_per_sm.max(1);
    match config.max_blocks {
        0 => per_sm,
        cap => per_sm.min(cap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_blocks_per_sm_capped_by_max_blocks() {
        let config = KernelConfig::default();
        assert_eq!(grid(132, config), 264);
        let capped = KernelConfig {
            max_blocks: 32,
            ..config
        };
        assert_eq!(grid(132, capped), 32);
        assert_eq!(grid(8, capped), 16, "the cap never raises the grid");
    }

    fn op(region_offset: u64, arena_offset: u64, len: u64) -> CopyOp {
        CopyOp {
            region_offset,
            arena_offset,
            len,
        }
    }

    #[test]
    fn descriptors_follow_the_direction() {
        let ops = [op(10, 20, 5)];
        let mut out = Vec::new();
        build_descriptors(&ops, Direction::Save, 1000, 5000, 64, 1 << 20, &mut out);
        build_descriptors(&ops, Direction::Load, 1000, 5000, 64, 1 << 20, &mut out);
        assert_eq!(
            out,
            [
                Desc {
                    src: 1010,
                    dst: 5020,
                    len: 5
                },
                Desc {
                    src: 5020,
                    dst: 1010,
                    len: 5
                },
            ]
        );
    }

    #[test]
    fn long_ops_are_chunked_and_empty_ops_dropped() {
        let ops = [op(0, 0, 250), op(7, 9, 0), op(1000, 2000, 100)];
        let mut out = Vec::new();
        build_descriptors(&ops, Direction::Save, 0, 0, 100, 1 << 20, &mut out);
        let lens: Vec<u64> = out.iter().map(|d| d.len).collect();
        assert_eq!(lens, [100, 100, 50, 100]);
        assert_eq!((out[1].src, out[1].dst), (100, 100));
        assert_eq!((out[2].src, out[2].dst), (200, 200));
        assert_eq!((out[3].src, out[3].dst), (1000, 2000));
        // Every byte is covered exactly once.
        assert_eq!(out.iter().map(|d| d.len).sum::<u64>(), 350);
    }

    #[test]
    fn pieces_never_cross_a_pinned_chunk_of_the_arena() {
        // Arena offset 90..390 crosses boundaries at 100, 200 and 300; region side is unaligned.
        let ops = [op(5, 90, 300)];
        let mut out = Vec::new();
        build_descriptors(&ops, Direction::Load, 0, 1000, u64::MAX, 100, &mut out);
        let spans: Vec<(u64, u64, u64)> = out.iter().map(|d| (d.src, d.dst, d.len)).collect();
        assert_eq!(
            spans,
            [
                (1090, 5, 10),
                (1100, 15, 100),
                (1200, 115, 100),
                (1300, 215, 90)
            ]
        );
    }

    #[test]
    fn descriptor_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<Desc>(), 24);
        assert!(SOURCE.contains("struct PfDesc { unsigned long long src; unsigned long long dst; unsigned long long len; }"));
    }
}
