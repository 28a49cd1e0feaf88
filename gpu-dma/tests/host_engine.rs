//! The host engine through the public API: regions in a shm root, saves and loads through the arena.

use std::path::Path;
use std::sync::Arc;

use pegaflow_gpu_dma::{
    Arena, CopyOp, Direction, DmaEngine, DmaError, HostDmaEngine, RegionSource,
};
use rand::{Rng, RngCore};

/// Creates `root/name` holding `bytes` random bytes and returns them.
fn random_region_file(root: &Path, name: &str, bytes: usize) -> Vec<u8> {
    let mut data = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(root.join(name), &data).unwrap();
    data
}

fn shm(name: &str, bytes: u64) -> RegionSource {
    RegionSource::SharedMemory {
        name: name.to_owned(),
        bytes,
    }
}

fn engine_in(root: &Path, arena_len: u64) -> (Arc<Arena>, HostDmaEngine) {
    let arena = Arc::new(Arena::new(arena_len, "test-arena").unwrap());
    let engine = HostDmaEngine::with_shm_root(arena.clone(), root.to_owned());
    (arena, engine)
}

/// Saves scattered blocks from one region into the arena and loads them into a second region at
/// other offsets; every byte must arrive exactly, and bytes outside the ops must stay untouched.
fn round_trip(block: u64, blocks: u64) {
    let dir = tempfile::tempdir().unwrap();
    let region_len = block * blocks * 2;
    let (arena, engine) = engine_in(dir.path(), block * blocks * 3);
    let src_bytes = random_region_file(dir.path(), "src", region_len as usize);
    let dst_before = random_region_file(dir.path(), "dst", region_len as usize);
    let src = engine.open_region(&shm("src", region_len)).unwrap();
    let dst = engine.open_region(&shm("dst", region_len)).unwrap();

    // Even source blocks go to arena pages in reverse order, with gaps between pages.
    let save: Vec<CopyOp> = (0..blocks)
        .map(|i| CopyOp {
            region_offset: 2 * i * block,
            arena_offset: (3 * (blocks - 1 - i) + 1) * block,
            len: block,
        })
        .collect();
    engine.copy_layer(&src, Direction::Save, &save).unwrap();
    for op in &save {
        let expect = &src_bytes[op.region_offset as usize..][..block as usize];
        assert_eq!(arena.read(op.arena_offset, block).unwrap(), expect);
    }

    // Load the pages into the odd blocks of the second region.
    let load: Vec<CopyOp> = save
        .iter()
        .map(|op| CopyOp {
            region_offset: op.region_offset + block,
            ..*op
        })
        .collect();
    engine.copy_layer(&dst, Direction::Load, &load).unwrap();
    drop((src, dst));

    let dst_after = std::fs::read(dir.path().join("dst")).unwrap();
    for i in 0..2 * blocks {
        let at = (i * block) as usize..((i + 1) * block) as usize;
        if i % 2 == 1 {
            assert_eq!(
                dst_after[at.clone()],
                src_bytes[at.start - block as usize..at.end - block as usize]
            );
        } else {
            assert_eq!(
                dst_after[at.clone()],
                dst_before[at],
                "block {i} was not in the load"
            );
        }
    }
}

#[test]
fn round_trip_is_byte_exact() {
    round_trip(4096 + 7, 33);
}

#[test]
fn round_trip_of_a_large_batch_is_byte_exact() {
    // 9 MiB per batch: above the threshold where the host engine splits the batch across threads.
    round_trip(64 << 10, 144);
}

#[test]
fn bad_op_copies_nothing_and_names_the_side() {
    let dir = tempfile::tempdir().unwrap();
    let (arena, engine) = engine_in(dir.path(), 8192);
    random_region_file(dir.path(), "kv", 8192);
    let region = engine.open_region(&shm("kv", 4096)).unwrap();
    let good = CopyOp {
        region_offset: 0,
        arena_offset: 0,
        len: 1024,
    };
    let past_region = CopyOp {
        region_offset: 4000,
        arena_offset: 2048,
        len: 100,
    };
    let past_arena = CopyOp {
        region_offset: 0,
        arena_offset: 8190,
        len: 4,
    };
    let overflow = CopyOp {
        region_offset: u64::MAX,
        arena_offset: 0,
        len: 2,
    };

    for (bad, side) in [
        (past_region, "region"),
        (past_arena, "arena"),
        (overflow, "region"),
    ] {
        let err = engine
            .copy_layer(&region, Direction::Save, &[good, bad])
            .unwrap_err();
        assert!(
            matches!(err, DmaError::OutOfBounds { what, .. } if what == side),
            "{err}"
        );
        assert!(err.to_string().contains(side), "{err}");
        // The good op before the bad one did not run either.
        assert!(arena.read(0, 8192).unwrap().iter().all(|&b| b == 0));
    }

    // Nor does a rejected load touch the region.
    arena.write(0, &[0xAB; 1024]).unwrap();
    let before = std::fs::read(dir.path().join("kv")).unwrap();
    assert!(engine
        .copy_layer(&region, Direction::Load, &[good, past_arena])
        .is_err());
    assert_eq!(std::fs::read(dir.path().join("kv")).unwrap(), before);
}

#[test]
fn region_names_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let (_arena, engine) = engine_in(dir.path(), 4096);
    let long = "x".repeat(256);
    for bad in ["", "..", ".", "a/b", "../etc", "a\0b", long.as_str()] {
        match engine.open_region(&shm(bad, 16)) {
            Err(DmaError::BadRegionName { name, .. }) => assert_eq!(name, bad),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

#[test]
fn region_smaller_than_declared_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_arena, engine) = engine_in(dir.path(), 4096);
    random_region_file(dir.path(), "short", 1000);
    let err = engine.open_region(&shm("short", 1001)).unwrap_err();
    assert!(
        matches!(err, DmaError::RegionTooSmall { ref name, actual: 1000, needed: 1001 } if name == "short"),
        "{err}"
    );
    assert!(err.to_string().contains("short"), "{err}");
    assert!(matches!(
        engine.open_region(&shm("short", 0)),
        Err(DmaError::EmptyRegion { .. })
    ));
}

#[test]
fn missing_region_names_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_arena, engine) = engine_in(dir.path(), 4096);
    let err = engine.open_region(&shm("no-such-region", 16)).unwrap_err();
    match &err {
        DmaError::RegionOpen { name, source, .. } => {
            assert_eq!(name, "no-such-region");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("no-such-region"), "{err}");
}

/// Removes a `/dev/shm` file when the test ends, pass or fail.
struct ShmFile(std::path::PathBuf);

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn real_dev_shm_region() {
    let root = Path::new("/dev/shm");
    if !root.is_dir() {
        eprintln!("skipping: no /dev/shm on this host");
        return;
    }
    let name = format!("pegaflow-test-{:016x}", rand::rng().random::<u64>());
    let _guard = ShmFile(root.join(&name));
    let data = random_region_file(root, &name, 8192);

    let arena = Arc::new(Arena::new(8192, "test-arena").unwrap());
    let engine = HostDmaEngine::new(arena.clone());
    assert_eq!(engine.name(), "host");
    let region = engine.open_region(&shm(&name, 8192)).unwrap();
    assert_eq!((region.name(), region.bytes()), (name.as_str(), 8192));
    let op = CopyOp {
        region_offset: 100,
        arena_offset: 4096,
        len: 4000,
    };
    engine.copy_layer(&region, Direction::Save, &[op]).unwrap();
    assert_eq!(arena.read(4096, 4000).unwrap(), &data[100..4100]);
}

/// An engine that shrinks its registered file (`ftruncate`) fails its own copies with an error
/// naming the region; the node's process survives the SIGBUS, and a region left intact still
/// copies. Before the guard this test died of SIGBUS.
#[test]
fn a_shrunk_region_fails_copies_without_a_signal() {
    let root = Path::new("/dev/shm");
    let dir = tempfile::tempdir().unwrap();
    // The real tmpfs where it exists (where SIGBUS came from), else any directory.
    let root = if root.is_dir() { root } else { dir.path() };
    let name = format!("pegaflow-test-{:016x}", rand::rng().random::<u64>());
    let _guard = ShmFile(root.join(&name));
    let bytes = 9 << 20;
    random_region_file(root, &name, bytes as usize);
    let intact_data = random_region_file(dir.path(), "intact", bytes as usize);

    let arena = Arc::new(Arena::new(2 * bytes, "test-arena").unwrap());
    let engine = HostDmaEngine::with_shm_root(arena.clone(), root.to_owned());
    let region = engine.open_region(&shm(&name, bytes)).unwrap();
    let other = HostDmaEngine::with_shm_root(arena.clone(), dir.path().to_owned());
    let intact = other.open_region(&shm("intact", bytes)).unwrap();

    std::fs::OpenOptions::new()
        .write(true)
        .open(root.join(&name))
        .unwrap()
        .set_len(0)
        .unwrap();
    // 9 MiB in 64 KiB ops: a batch split over threads, each of which faults.
    let ops: Vec<CopyOp> = (0..144)
        .map(|i| CopyOp {
            region_offset: i * (64 << 10),
            arena_offset: i * (64 << 10),
            len: 64 << 10,
        })
        .collect();
    for direction in [Direction::Save, Direction::Load] {
        let err = engine.copy_layer(&region, direction, &ops).unwrap_err();
        assert!(
            matches!(&err, DmaError::RegionShrunk { name: n, declared, .. } if *n == name && *declared == bytes),
            "{direction:?}: {err}"
        );
        assert!(err.is_region_fault());
        assert!(err.to_string().contains(&name), "{err}");
    }
    // The failed load did not grow the file back.
    assert_eq!(std::fs::metadata(root.join(&name)).unwrap().len(), 0);

    // Another engine's region, untouched, still copies exactly.
    let intact_ops: Vec<CopyOp> = (0..16)
        .map(|i| CopyOp {
            region_offset: i * 4096,
            arena_offset: i * 4096,
            len: 4096,
        })
        .collect();
    other
        .copy_layer(&intact, Direction::Save, &intact_ops)
        .unwrap();
    assert_eq!(arena.read(0, 16 * 4096).unwrap(), &intact_data[..16 * 4096]);
}
