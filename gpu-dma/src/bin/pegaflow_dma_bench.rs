//! `pegaflow-dma-bench`: the CUDA copy engine against plain pinned `cudaMemcpy`, on one GPU.
//!
//! Prints, in one run, for H2D (load), D2H (save) and both at once: one contiguous pinned
//! `cuMemcpy` of a large buffer (the ceiling), then each candidate pair of save and load paths
//! (see [`candidates`]: the former default, kernel saves, strided saves of 4/8/32 layers, the
//! engine's default), on the vLLM layout of Llama-3.1-8B (32 layers, 8 KV heads, head dim 128,
//! bf16: one page of `block_size * 8 * 256 * 2` bytes per layer and block) for 10K-token requests
//! at block sizes 16, 32 and 64, with scattered random block ids in a 6 GiB KV buffer. Jobs run as
//! the node runs them ([`enqueue_layers`], [`finish_layers`]). Each result is GB/s and its ratio to
//! the contiguous baseline of the same direction. Every candidate is checked byte for byte first
//! (odd, unaligned ops over several layers, then round trips); one that fails is reported, left
//! out of the timings, and makes the run exit with status 1 after the table.
//!
//! `--sweep` first times kernel shapes at block size 16; `--ipc-selftest FILE` instead opens a
//! torch tensor exported by `gpu-dma/tests/gpu/ipc_roundtrip.py` and round-trips its blocks.
//! Without a usable GPU it prints why and exits with status 3.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys;
use pegaflow_gpu_dma::{
    enqueue_layers, finish_layers, Arena, CopyOp, CopyPath, CudaDmaEngine, CudaRegion, Direction,
    DmaEngine, DmaError, KernelConfig, RegionSource, PIN_CHUNK_BYTES,
};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

const LAYERS: u64 = 32;
const KV_HEADS: u64 = 8;
const HEAD_DIM: u64 = 128;
const DTYPE_BYTES: u64 = 2;
const TOKENS: u64 = 10_000;
const GIB: u64 = 1 << 30;
/// Seed of the region's pseudo-random contents (word `w` holds `mix(REGION_SEED + w)`).
const REGION_SEED: u64 = 0x5eed_0001;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// splitmix64: cheap, stateless pseudo-random words, so expected bytes can be recomputed anywhere.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The expected bytes of `[offset, offset + len)` of the region.
fn region_bytes(offset: u64, len: u64) -> Vec<u8> {
    let first = offset / 8;
    let last = (offset + len).div_ceil(8);
    let words: Vec<u8> = (first..last)
        .flat_map(|w| mix(REGION_SEED + w).to_le_bytes())
        .collect();
    let skip = (offset - first * 8) as usize;
    words[skip..skip + len as usize].to_vec()
}

/// Fills `out` (8-byte multiple) with words `mix(seed + first_word + i)` on all cores.
fn fill_words(out: &mut [u8], seed: u64, first_word: u64) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = (out.len() / 8).div_ceil(threads).max(1) * 8;
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(per).enumerate() {
            s.spawn(move || {
                let base = first_word + (i * per / 8) as u64;
                for (j, w) in part.chunks_exact_mut(8).enumerate() {
                    w.copy_from_slice(&mix(seed + base + j as u64).to_le_bytes());
                }
            });
        }
    });
}

fn check(status: sys::CUresult, what: &str) -> BenchResult<()> {
    status.result().map_err(|e| format!("{what}: {e:?}").into())
}

/// Fills the whole arena with pseudo-random words (never time on zeros), a pinned chunk at a time.
fn fill_arena(arena: &Arena) -> BenchResult<()> {
    let mut buf = vec![0u8; PIN_CHUNK_BYTES.min(arena.len()) as usize];
    let mut off = 0;
    while off < arena.len() {
        let len = (arena.len() - off).min(buf.len() as u64) as usize;
        fill_words(&mut buf[..len], 0xa5e4a, off / 8);
        arena.write(off, &buf[..len])?;
        off += len as u64;
    }
    Ok(())
}

/// Fills the region with its pseudo-random contents, 256 MiB at a time.
fn fill_region(engine: &CudaDmaEngine, region: &CudaRegion) -> BenchResult<()> {
    let mut staging = vec![0u8; PIN_CHUNK_BYTES as usize];
    let mut off = 0;
    while off < region.bytes() {
        let len = PIN_CHUNK_BYTES.min(region.bytes() - off);
        let staging = &mut staging[..len as usize];
        fill_words(staging, REGION_SEED, off / 8);
        engine.context().bind_to_thread()?;
        // SAFETY: both spans are in bounds; the copy is synchronous.
        check(
            unsafe {
                sys::cuMemcpyHtoD_v2(
                    region.device_ptr() + off,
                    staging.as_ptr().cast(),
                    len as usize,
                )
            },
            "cuMemcpyHtoD (fill region)",
        )?;
        off += len;
    }
    Ok(())
}

/// Reads `[offset, offset + len)` of the region back to the host.
fn read_region(
    engine: &CudaDmaEngine,
    region: &CudaRegion,
    offset: u64,
    len: u64,
) -> BenchResult<Vec<u8>> {
    engine.context().bind_to_thread()?;
    let mut out = vec![0u8; len as usize];
    // SAFETY: the span is in bounds of the region; the copy is synchronous.
    check(
        unsafe {
            sys::cuMemcpyDtoH_v2(
                out.as_mut_ptr().cast(),
                region.device_ptr() + offset,
                len as usize,
            )
        },
        "cuMemcpyDtoH (verify)",
    )?;
    Ok(out)
}

/// The vLLM layout at one block size: all layers in one buffer, layer-major, one page per block.
#[derive(Clone, Copy)]
struct Layout {
    block_size: u64,
    page: u64,
    num_blocks: u64,
}

impl Layout {
    fn new(block_size: u64, kv_bytes: u64) -> Layout {
        let page = block_size * KV_HEADS * HEAD_DIM * 2 * DTYPE_BYTES;
        Layout {
            block_size,
            page,
            num_blocks: kv_bytes / (LAYERS * page),
        }
    }

    /// Blocks of one 10K-token request.
    fn request_blocks(&self) -> u64 {
        TOKENS.div_ceil(self.block_size)
    }

    /// Per layer, the ops moving `blocks[i]` to/from arena page slot `pages[i]` (a stored page
    /// holds every layer of a block, layer by layer, as the node lays it out).
    fn plan(&self, blocks: &[u64], pages: &[u64]) -> Vec<Vec<CopyOp>> {
        (0..LAYERS)
            .map(|l| {
                blocks
                    .iter()
                    .zip(pages)
                    .map(|(&b, &p)| CopyOp {
                        region_offset: (l * self.num_blocks + b) * self.page,
                        arena_offset: p * LAYERS * self.page + l * self.page,
                        len: self.page,
                    })
                    .collect()
            })
            .collect()
    }
}

/// Runs one job the way the node does (all layers enqueued, grouped as the engine asks, then each
/// layer waited for, then finish) and returns the bytes moved.
fn run_job(
    engine: &CudaDmaEngine,
    region: &CudaRegion,
    direction: Direction,
    plan: &[Vec<CopyOp>],
) -> Result<u64, DmaError> {
    let layers = enqueue_layers(engine, region, direction, plan, &[], &[], |_| {})?;
    finish_layers(engine, region, direction, layers, |_| {})?;
    Ok(plan.iter().flatten().map(|op| op.len).sum())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A random request: distinct block ids and distinct arena page slots.
fn random_request(rng: &mut impl Rng, layout: &Layout, page_slots: u64) -> (Vec<u64>, Vec<u64>) {
    let n = layout.request_blocks() as usize;
    let blocks = sample(rng, layout.num_blocks as usize, n)
        .into_iter()
        .map(|b| b as u64)
        .collect();
    let pages = sample(rng, page_slots as usize, n)
        .into_iter()
        .map(|p| p as u64)
        .collect();
    (blocks, pages)
}

/// Median GB/s of `reps` jobs in one direction, each on a fresh random request.
fn time_direction(
    engine: &CudaDmaEngine,
    region: &CudaRegion,
    layout: &Layout,
    page_slots: u64,
    direction: Direction,
    reps: usize,
    rng: &mut impl Rng,
) -> BenchResult<f64> {
    let mut rates = Vec::new();
    for _ in 0..reps + 1 {
        let (blocks, pages) = random_request(rng, layout, page_slots);
        let plan = layout.plan(&blocks, &pages);
        let t = Instant::now();
        let bytes = run_job(engine, region, direction, &plan)?;
        rates.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    rates.remove(0); // warm-up
    Ok(median(rates))
}

/// Median GB/s (both directions' bytes together) of a save and a load of different requests at
/// once, each on its own thread and stream.
fn time_both(
    engine: &CudaDmaEngine,
    region: &CudaRegion,
    layout: &Layout,
    page_slots: u64,
    reps: usize,
    rng: &mut impl Rng,
) -> BenchResult<f64> {
    let mut rates = Vec::new();
    for _ in 0..reps + 1 {
        let (sb, sp) = random_request(rng, layout, page_slots / 2);
        let (lb, lp) = random_request(rng, layout, page_slots / 2);
        let lp: Vec<u64> = lp.iter().map(|p| p + page_slots / 2).collect();
        let (save, load) = (layout.plan(&sb, &sp), layout.plan(&lb, &lp));
        let t = Instant::now();
        let bytes = std::thread::scope(|s| {
            let a = s.spawn(|| run_job(engine, region, Direction::Save, &save));
            let b = run_job(engine, region, Direction::Load, &load);
            let a = a
                .join()
                .map_err(|_| DmaError::CudaUnavailable("save thread panicked".into()))?;
            Ok::<u64, DmaError>(a? + b?)
        })?;
        rates.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    rates.remove(0);
    Ok(median(rates))
}

/// Contiguous pinned copies of `len` bytes: H2D, D2H, and both at once on two streams.
fn contiguous_baseline(
    engine: &CudaDmaEngine,
    arena: &Arena,
    region: &CudaRegion,
    len: u64,
    reps: usize,
) -> BenchResult<[f64; 3]> {
    let ctx = engine.context();
    ctx.bind_to_thread()?;
    let s1 = ctx.new_stream()?;
    let s2 = ctx.new_stream()?;
    let host = arena.read(0, 2 * len)?.as_ptr() as u64;
    let dev = region.device_ptr();
    let mut out = [0.0; 3];
    for (k, out) in out.iter_mut().enumerate() {
        let mut rates = Vec::new();
        for _ in 0..reps + 1 {
            let t = Instant::now();
            // SAFETY: all spans lie in the pinned arena and the region; synchronized below.
            unsafe {
                // One memcpy per pinned chunk (a memcpy may not span two registrations), back to
                // back on the stream: the copy engine streams them without gaps.
                let mut at = 0;
                while at < len {
                    let n = PIN_CHUNK_BYTES.min(len - at) as usize;
                    if k != 1 {
                        check(
                            sys::cuMemcpyHtoDAsync_v2(
                                dev + at,
                                (host + at) as *const _,
                                n,
                                s1.cu_stream(),
                            ),
                            "cuMemcpyHtoDAsync",
                        )?;
                    }
                    if k != 0 {
                        check(
                            sys::cuMemcpyDtoHAsync_v2(
                                (host + len + at) as *mut _,
                                dev + len + at,
                                n,
                                s2.cu_stream(),
                            ),
                            "cuMemcpyDtoHAsync",
                        )?;
                    }
                    at += n as u64;
                }
            }
            s1.synchronize()?;
            s2.synchronize()?;
            let bytes = if k == 2 { 2 * len } else { len };
            rates.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        rates.remove(0);
        *out = median(rates);
    }
    Ok(out)
}

/// Saves a request, loads it into other blocks, and compares every byte of every layer, on all
/// cores.
fn verify_round_trip(
    engine: &CudaDmaEngine,
    region: &CudaRegion,
    layout: &Layout,
    page_slots: u64,
    rng: &mut impl Rng,
) -> BenchResult<()> {
    let n = layout.request_blocks() as usize;
    let ids = sample(rng, layout.num_blocks as usize, 2 * n).into_vec();
    let (src, dst): (Vec<u64>, Vec<u64>) = (
        ids[..n].iter().map(|&b| b as u64).collect(),
        ids[n..].iter().map(|&b| b as u64).collect(),
    );
    let pages: Vec<u64> = sample(rng, page_slots as usize, n)
        .into_iter()
        .map(|p| p as u64)
        .collect();
    run_job(engine, region, Direction::Save, &layout.plan(&src, &pages))?;
    run_job(engine, region, Direction::Load, &layout.plan(&dst, &pages))?;
    let at = |l: u64, b: u64| (l * layout.num_blocks + b) * layout.page;
    let checks: Vec<(u64, u64, u64)> = (0..LAYERS)
        .flat_map(|l| src.iter().zip(&dst).map(move |(&s, &d)| (l, s, d)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let workers: Vec<_> = checks
            .chunks(checks.len().div_ceil(threads).max(1))
            .map(|part| {
                scope.spawn(move || -> Result<(), String> {
                    for &(l, s, d) in part {
                        let want = region_bytes(at(l, s), layout.page);
                        let got = read_region(engine, region, at(l, d), layout.page)
                            .map_err(|e| e.to_string())?;
                        if want != got {
                            return Err(format!(
                                "round trip MISMATCH: layer {l} block {s} -> {d} (block size {})",
                                layout.block_size
                            ));
                        }
                        // Put the generated contents back so later checks hold.
                        write_region(
                            engine,
                            region,
                            at(l, d),
                            &region_bytes(at(l, d), layout.page),
                        )
                        .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| "verify thread panicked".to_string())?)
    })?;
    Ok(())
}

/// Writes `bytes` into the region at `offset`, synchronously.
fn write_region(
    engine: &CudaDmaEngine,
    region: &CudaRegion,
    offset: u64,
    bytes: &[u8],
) -> BenchResult<()> {
    engine.context().bind_to_thread()?;
    // SAFETY: callers pass spans inside the region; the copy is synchronous.
    check(
        unsafe {
            sys::cuMemcpyHtoD_v2(
                region.device_ptr() + offset,
                bytes.as_ptr().cast(),
                bytes.len(),
            )
        },
        "cuMemcpyHtoD (restore)",
    )
}

/// Layers of the odd-op check, and the region bytes between a load's layers in the scratch tail.
const ODD_LAYERS: u64 = 4;
const ODD_BAND: u64 = 16 << 20;
/// The region's tail the odd-op check loads into; the timed layouts stay below it.
const SCRATCH_BYTES: u64 = ODD_LAYERS * ODD_BAND;

/// One op of the odd-op check: `len` bytes, at `arena + l * arena_pitch` in the arena for layer
/// `l`, saved from `from + l * (ODD_BAND + 13)` and loaded to `scratch + l * ODD_BAND + band_at`.
struct OddOp {
    from: u64,
    band_at: u64,
    len: u64,
    arena_pitch: u64,
    arena: u64,
}

/// Odd ops over several layers: unaligned offsets and lengths that are not multiples of 16, each
/// op at a fixed (odd) stride from one layer to the next on both sides, so strided paths merge
/// them, and laid out in the arena across a pinned-chunk boundary. Saved from the region, loaded
/// back into its scratch tail, compared, and the scratch tail restored.
fn verify_odd_ops(
    engine: &CudaDmaEngine,
    region: &CudaRegion,
    arena: &Arena,
    rng: &mut impl Rng,
) -> BenchResult<()> {
    let scratch = region.bytes() - SCRATCH_BYTES;
    let region_pitch = ODD_BAND + 13;
    let mut ops: Vec<OddOp> = Vec::new();
    let mut band_at = 0;
    for _ in 0..100 {
        let len = rng.random_range(1..70_000u64);
        ops.push(OddOp {
            from: rng.random_range(0..scratch - ODD_LAYERS * region_pitch),
            band_at: band_at + 5,
            len,
            arena_pitch: len + rng.random_range(0..64),
            arena: 0,
        });
        band_at += 5 + len + rng.random_range(0..64);
    }
    // Arena spans back to back, centred on a pinned-chunk boundary.
    let span = |o: &OddOp| 3 + (ODD_LAYERS - 1) * o.arena_pitch + o.len;
    let spans: u64 = ops.iter().map(span).sum();
    let mut arena_at = (arena.len() / 2 / PIN_CHUNK_BYTES * PIN_CHUNK_BYTES).max(spans) - spans / 2;
    for o in &mut ops {
        o.arena = arena_at + 3;
        arena_at += span(o);
    }
    let plan = |region_of: &dyn Fn(u64, &OddOp) -> u64| -> Vec<Vec<CopyOp>> {
        (0..ODD_LAYERS)
            .map(|l| {
                ops.iter()
                    .map(|o| CopyOp {
                        region_offset: region_of(l, o),
                        arena_offset: o.arena + l * o.arena_pitch,
                        len: o.len,
                    })
                    .collect()
            })
            .collect()
    };
    let save = plan(&|l, o| o.from + l * region_pitch);
    let load = plan(&|l, o| scratch + l * ODD_BAND + o.band_at);
    run_job(engine, region, Direction::Save, &save)?;
    run_job(engine, region, Direction::Load, &load)?;
    for (saved, loaded) in save.iter().flatten().zip(load.iter().flatten()) {
        let want = region_bytes(saved.region_offset, saved.len);
        if read_region(engine, region, loaded.region_offset, loaded.len)? != want {
            return Err(format!(
                "odd-op round trip MISMATCH at region offset {} ({} bytes, arena offset {})",
                loaded.region_offset, loaded.len, loaded.arena_offset
            )
            .into());
        }
    }
    // Put the scratch tail back to its generated contents for later checks.
    let tail = region_bytes(scratch, region.bytes() - scratch);
    write_region(engine, region, scratch, &tail)
}

/// Sets the path of both directions.
fn set_paths(engine: &CudaDmaEngine, (save, load): (CopyPath, CopyPath)) -> Result<(), DmaError> {
    engine.set_copy_path(Direction::Save, save)?;
    engine.set_copy_path(Direction::Load, load)
}

struct Args {
    sweep: bool,
    ipc_selftest: Option<String>,
    kv_gib: u64,
    arena_gib: u64,
    reps: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sweep: false,
        ipc_selftest: None,
        kv_gib: 6,
        arena_gib: 4,
        reps: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match a.as_str() {
            "--sweep" => args.sweep = true,
            "--kv-gib" => args.kv_gib = num("--kv-gib")?,
            "--arena-gib" => args.arena_gib = num("--arena-gib")?,
            "--reps" => args.reps = num("--reps")?.max(1) as usize,
            "--ipc-selftest" => {
                args.ipc_selftest = Some(it.next().ok_or("--ipc-selftest needs a file")?)
            }
            other => return Err(format!("unknown argument {other:?}; see the module docs")),
        }
    }
    Ok(args)
}

fn sweep(
    engine: &CudaDmaEngine,
    region: &CudaRegion,
    page_slots: u64,
    reps: usize,
    rng: &mut impl Rng,
) -> BenchResult<()> {
    let layout = Layout::new(16, region.bytes() - SCRATCH_BYTES);
    println!(
        "\nkernel sweep, block size 16 (GB/s):\n{:>7} {:>6} {:>7} {:>8} {:>8} {:>8}",
        "threads", "unroll", "blk/SM", "chunkKiB", "H2D", "D2H"
    );
    for threads in [256u32, 512, 1024] {
        for unroll in [2u32, 4, 8] {
            for per_sm_threads in [1024u32, 2048] {
                for chunk_kib in [16u64, 64] {
                    let cfg = KernelConfig {
                        threads,
                        unroll,
                        blocks_per_sm: per_sm_threads / threads,
                        max_blocks: 0,
                        chunk_bytes: chunk_kib << 10,
                    };
                    set_paths(engine, (CopyPath::Kernel(cfg), CopyPath::Kernel(cfg)))?;
                    let h2d = time_direction(
                        engine,
                        region,
                        &layout,
                        page_slots,
                        Direction::Load,
                        reps,
                        rng,
                    )?;
                    let d2h = time_direction(
                        engine,
                        region,
                        &layout,
                        page_slots,
                        Direction::Save,
                        reps,
                        rng,
                    )?;
                    println!(
                        "{threads:>7} {unroll:>6} {:>7} {chunk_kib:>8} {h2d:>8.1} {d2h:>8.1}",
                        cfg.blocks_per_sm
                    );
                }
            }
        }
    }
    Ok(())
}

fn bench(args: &Args) -> BenchResult<()> {
    let arena = Arc::new(Arena::new(args.arena_gib * GIB, "pegaflow-bench-arena")?);
    let t = Instant::now();
    let engine = CudaDmaEngine::new(0, arena.clone())?;
    let ready = t.elapsed().as_secs_f64();
    let pinned = engine.wait_pinned()?;
    let pin_s = t.elapsed().as_secs_f64();
    println!("engine: {}", engine.describe());
    println!(
        "arena: {} GiB; engine ready after {:.3} s, pinned after {:.2} s ({:.1} GB/s)",
        args.arena_gib,
        ready,
        pin_s,
        pinned.total_bytes as f64 / pin_s / 1e9
    );
    let region = engine.alloc_region(args.kv_gib * GIB)?;
    fill_region(&engine, &region)?;
    fill_arena(&arena)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let kv = region.bytes() - SCRATCH_BYTES; // the tail is scratch for the odd-op check

    let candidates = candidates(&engine);
    let verified = verify_candidates(&engine, &region, &arena, &candidates, kv, &mut rng);

    if args.sweep {
        let layout = Layout::new(16, kv);
        sweep(
            &engine,
            &region,
            arena.len() / (LAYERS * layout.page),
            args.reps,
            &mut rng,
        )?;
    }

    let base = contiguous_baseline(
        &engine,
        &arena,
        &region,
        GIB.min(arena.len() / 2),
        args.reps,
    )?;
    let table = Table { base };
    table.header(args);
    for bs in [16u64, 32, 64] {
        let layout = Layout::new(bs, kv);
        let slots = arena.len() / (LAYERS * layout.page);
        for c in candidates
            .iter()
            .zip(&verified)
            .filter_map(|(c, ok)| ok.then_some(c))
        {
            set_paths(&engine, (c.save, c.load))?;
            let mut time = |direction| {
                time_direction(
                    &engine, &region, &layout, slots, direction, args.reps, &mut rng,
                )
            };
            let (h2d, d2h) = (time(Direction::Load)?, time(Direction::Save)?);
            let both = time_both(&engine, &region, &layout, slots, args.reps, &mut rng)?;
            let page_kib = (layout.page >> 10).to_string();
            table.row(&bs.to_string(), &page_kib, c.name, [h2d, d2h, both]);
        }
    }
    match verified.iter().filter(|ok| !**ok).count() {
        0 => Ok(()),
        n => Err(format!("{n} path(s) failed verification (see above)").into()),
    }
}

/// One row of the comparison: a name and the copy path of saves and of loads.
struct Candidate {
    name: &'static str,
    save: CopyPath,
    load: CopyPath,
}

/// The paths one run compares. With batched memcpy (CUDA 13): the former default (copy engines
/// both ways, one copy per block and layer), then for saves the gather kernel (full grid, and
/// throttled to 32 blocks so it leaves PCIe room for the loads' copy engines), strided batches
/// merging 4, 8 and 32 layers, and 8-layer strided copies issued one `cuMemcpy2DAsync` each (to
/// tell whether the batched call keeps 2D copies whole), all with loads on batched memcpy; last
/// the engine's default.
/// Without it (CUDA 12): one memcpy per block, the kernel both ways, and the default.
fn candidates(engine: &CudaDmaEngine) -> Vec<Candidate> {
    let default = Candidate {
        name: "engine default",
        save: engine.copy_path(Direction::Save),
        load: engine.copy_path(Direction::Load),
    };
    let kernel = CopyPath::Kernel(KernelConfig::default());
    let batch = CopyPath::BatchedMemcpy { streams: 1 };
    if engine.set_copy_path(Direction::Save, batch).is_err() {
        let per_op = CopyPath::PerOpMemcpy;
        return vec![
            Candidate {
                name: "memcpy per block",
                save: per_op,
                load: per_op,
            },
            Candidate {
                name: "gather kernel",
                save: kernel,
                load: kernel,
            },
            default,
        ];
    }
    let throttled = CopyPath::Kernel(KernelConfig {
        threads: 1024,
        unroll: 8,
        blocks_per_sm: 1,
        max_blocks: 32,
        ..KernelConfig::default()
    });
    let strided = |layers| CopyPath::StridedBatch { layers };
    let saves = [
        ("batch memcpy", batch),
        ("kernel saves", kernel),
        ("kernel saves, 32 CTAs", throttled),
        ("strided saves x4", strided(4)),
        ("strided saves x8", strided(8)),
        ("strided saves x32", strided(32)),
        (
            "strided x8, 2D calls",
            CopyPath::StridedPerCopy { layers: 8 },
        ),
    ];
    let mut out: Vec<Candidate> = saves
        .into_iter()
        .map(|(name, save)| Candidate {
            name,
            save,
            load: batch,
        })
        .collect();
    out.push(default);
    out
}

/// Checks every candidate byte for byte (odd ops, then round trips at 16/32/64) and says so;
/// returns whether each passed. A failing candidate is reported and left out of the timings, and
/// the region is filled afresh (a failed check may leave wrong bytes), so one run still compares
/// the others.
fn verify_candidates(
    engine: &CudaDmaEngine,
    region: &CudaRegion,
    arena: &Arena,
    candidates: &[Candidate],
    kv: u64,
    rng: &mut impl Rng,
) -> Vec<bool> {
    let mut verified: Vec<bool> = Vec::with_capacity(candidates.len());
    for (i, c) in candidates.iter().enumerate() {
        println!("path {:?}: saves: {}; loads: {}", c.name, c.save, c.load);
        let same = candidates[..i]
            .iter()
            .position(|d| (d.save, d.load) == (c.save, c.load));
        if let Some(j) = same {
            verified.push(verified[j]);
            continue;
        }
        let checked = set_paths(engine, (c.save, c.load))
            .map_err(Into::into)
            .and_then(|()| verify_odd_ops(engine, region, arena, rng))
            .and_then(|()| {
                [16, 32, 64].into_iter().try_for_each(|bs| {
                    let layout = Layout::new(bs, kv);
                    let slots = arena.len() / (LAYERS * layout.page);
                    verify_round_trip(engine, region, &layout, slots, rng)
                })
            });
        match &checked {
            Ok(()) => println!("  byte-exact round trips (vLLM layout at 16/32/64, odd ops)"),
            Err(e) => {
                println!("  FAILED, left out of the timings: {e}");
                if let Err(e) = fill_region(engine, region) {
                    println!("  cannot refill the region, later checks may fail too: {e}");
                }
            }
        }
        verified.push(checked.is_ok());
    }
    verified
}

/// The comparison, printed row by row as measured (so a run cut short still shows its rows): GB/s
/// and the ratio to the contiguous baseline `base` (H2D, D2H, both) of the same run.
struct Table {
    base: [f64; 3],
}

impl Table {
    fn header(&self, args: &Args) {
        println!(
            "\nLlama-3.1-8B vLLM layout, 10K-token requests, {} GiB KV buffer, {} GiB pinned arena; median of {} (GB/s, x contiguous)",
            args.kv_gib, args.arena_gib, args.reps
        );
        println!(
            "{:>5} {:>8} {:<22} {:>15} {:>15} {:>15}",
            "block", "page KiB", "path", "H2D (load)", "D2H (save)", "both"
        );
        self.row("-", "1 GiB", "contiguous cuMemcpy", self.base);
    }

    fn row(&self, block: &str, page_kib: &str, path: &str, gbps: [f64; 3]) {
        let cell = |k: usize| format!("{:6.1} ({:.2}x)", gbps[k], gbps[k] / self.base[k]);
        println!(
            "{block:>5} {page_kib:>8} {path:<22} {:>15} {:>15} {:>15}",
            cell(0),
            cell(1),
            cell(2)
        );
    }
}

/// The tensor `ipc_roundtrip.py` exported, read from its `key=value` file.
struct Exported {
    handle: [u8; 64],
    offset: u64,
    bytes: u64,
    device: u32,
    layers: u64,
    num_blocks: u64,
    page: u64,
    src: Vec<u64>,
    dst: Vec<u64>,
}

fn read_exported(path: &str) -> BenchResult<Exported> {
    let text = std::fs::read_to_string(path)?;
    let get = |key: &str| -> BenchResult<&str> {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .ok_or_else(|| format!("{path}: missing {key}").into())
    };
    let num = |key: &str| -> BenchResult<u64> { Ok(get(key)?.trim().parse()?) };
    let list = |key: &str| -> BenchResult<Vec<u64>> {
        get(key)?
            .split(',')
            .map(|v| Ok(v.trim().parse()?))
            .collect()
    };
    let hex = get("handle")?.trim();
    let mut handle = [0u8; 64];
    if hex.len() != 128 {
        return Err(format!("handle must be 128 hex digits, got {}", hex.len()).into());
    }
    for (i, b) in handle.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(Exported {
        handle,
        offset: num("offset")?,
        bytes: num("bytes")?,
        device: num("device")? as u32,
        layers: num("layers")?,
        num_blocks: num("num_blocks")?,
        page: num("page")?,
        src: list("src")?,
        dst: list("dst")?,
    })
}

/// Opens the exported tensor, saves blocks `src` into the arena and loads them into blocks `dst`,
/// recording one layer event per layer; the Python side then checks the bytes.
fn ipc_selftest(path: &str) -> BenchResult<()> {
    let x = read_exported(path)?;
    let page_bytes = x.layers * x.page;
    let arena = Arc::new(Arena::new(
        page_bytes * x.src.len() as u64,
        "pegaflow-ipc-selftest",
    )?);
    let engine = CudaDmaEngine::new(x.device as usize, arena)?;
    engine.wait_pinned()?;
    println!("engine: {}", engine.describe());
    let region = engine.open_region(&RegionSource::CudaIpc {
        handle: x.handle,
        offset: x.offset,
        bytes: x.bytes,
        engine_events: Vec::new(),
    })?;
    let plan = |blocks: &[u64]| -> Vec<Vec<CopyOp>> {
        (0..x.layers)
            .map(|l| {
                blocks
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| CopyOp {
                        region_offset: (l * x.num_blocks + b) * x.page,
                        arena_offset: i as u64 * page_bytes + l * x.page,
                        len: x.page,
                    })
                    .collect()
            })
            .collect()
    };
    run_job(&engine, &region, Direction::Save, &plan(&x.src))?;
    let handles = engine.layer_event_handles(&region);
    let layers = plan(&x.dst);
    let slots: Vec<u32> = (0..layers.len() as u32).collect();
    let enqueued = enqueue_layers(
        &engine,
        &region,
        Direction::Load,
        &layers,
        &[],
        &slots,
        |_| {},
    )?;
    finish_layers(&engine, &region, Direction::Load, enqueued, |_| {})?;
    println!(
        "ipc selftest: opened {} bytes at offset {}, saved {} blocks, loaded them into other blocks, {} layer events recorded ({} handles exported)",
        x.bytes,
        x.offset,
        x.src.len(),
        x.layers,
        handles.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pegaflow-dma-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &args.ipc_selftest {
        Some(path) => ipc_selftest(path),
        None => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let unavailable = e
                .downcast_ref::<DmaError>()
                .is_some_and(|d| matches!(d, DmaError::CudaUnavailable(_)));
            eprintln!("pegaflow-dma-bench: {e}");
            if unavailable {
                eprintln!("pegaflow-dma-bench: cannot run without a CUDA GPU");
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
