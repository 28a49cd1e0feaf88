//! Engine KV regions: where an engine's KV bytes live, and opening the shared-memory kind.
//!
//! On GPU hosts the region is CUDA memory opened by IPC. On hosts without a GPU (CI, vLLM CPU)
//! the connector creates a POSIX shared-memory file under `/dev/shm` holding the engine's KV
//! cache and sends its name and size at register time; the host engine maps it here.
//!
//! The name comes from another process, so it is validated before it touches a path: it must name
//! a single entry directly in the shm root. The file is opened without following symlinks and must
//! be a regular file, so a planted link cannot make the node write somewhere else.
//!
//! The engine owns the file and can shrink it at any time (`ftruncate`); touching a mapped
//! page past the new end raises `SIGBUS`. Every mapping of a client's file is therefore
//! guarded (`fault`): such a fault detaches the mapping from the file, and the copy that hit it
//! fails with [`DmaError::RegionShrunk`] naming the region, instead of killing the node.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{fstat, open, FileType, Mode, OFlags};

use crate::error::DmaError;
use crate::fault::Guarded;

/// Where an engine's KV bytes live, as the connector described them at register time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionSource {
    /// A POSIX shared-memory object `name` (a file in `/dev/shm`) of which the first `bytes` bytes
    /// are the engine's KV cache.
    SharedMemory {
        /// The shm object's name, without the leading `/` of `shm_open`.
        name: String,
        /// How many bytes of the object the engine uses; the file may be larger.
        bytes: u64,
    },
    /// GPU memory of the engine process exported with CUDA IPC (`cudaIpcGetMemHandle`).
    ///
    /// The handle names a whole `cudaMalloc` block, while the engine's KV tensor may start inside
    /// it: torch's caching allocator carves tensors out of larger segments, and
    /// `untyped_storage()._share_cuda_()` returns the storage's byte offset inside the block next to
    /// the handle. The region is `[offset, offset + bytes)` of the opened block. torch prefixes the
    /// 64 handle bytes with a version byte and a type byte (`'c'` for a cudaMalloc block); the
    /// connector strips those two and sends the raw `cudaIpcMemHandle_t`.
    CudaIpc {
        /// The raw `cudaIpcMemHandle_t` of the allocation holding the tensor.
        handle: [u8; 64],
        /// The storage's byte offset inside that allocation.
        offset: u64,
        /// The region's size in bytes (the storage's `nbytes()`).
        bytes: u64,
        /// Interprocess event handles (`cudaIpcGetEventHandle`) of the engine's own per-layer
        /// events, a ring the engine created once; a save waits GPU-side on one slot per layer
        /// ([`crate::DmaEngine::wait_engine_event`]) instead of the engine synchronizing its stream
        /// before asking. Empty when the engine sends none.
        engine_events: Vec<[u8; 64]>,
    },
}

impl RegionSource {
    /// A short name of the region kind, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            RegionSource::SharedMemory { .. } => "shared-memory",
            RegionSource::CudaIpc { .. } => "CUDA IPC",
        }
    }
}

/// An engine's shared-memory KV region, mapped read-write into the node and guarded.
///
/// The mapping is unmapped when the region is dropped (when the session unregisters the engine).
/// The engine process maps the same file and writes it concurrently; copies from a region are
/// only meaningful for blocks the engine has finished writing, which the session guarantees by
/// ordering.
#[derive(Debug)]
pub struct HostRegion {
    name: String,
    /// Declared before `map`, so it leaves the guard table before the mapping goes.
    guard: Guarded,
    map: MmapRaw,
    bytes: u64,
}

impl HostRegion {
    /// Opens `root/<name>` and maps its first `bytes` bytes shared read-write, guarded.
    pub(crate) fn open(root: &Path, name: &str, bytes: u64) -> Result<HostRegion, DmaError> {
        let (map, guard) = map_guarded(open_shm_file(root, name, bytes)?, name, bytes)?;
        tracing::debug!(region = name, bytes, "mapped shared-memory region");
        Ok(HostRegion {
            name: name.to_owned(),
            guard,
            map,
            bytes,
        })
    }

    /// The region's shared-memory name, for logs and error messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The mapped size in bytes (the size the connector declared).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The first byte of the mapping; the engines bounds-check against [`HostRegion::bytes`].
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Fails with [`DmaError::RegionShrunk`] once a copy touched a page the engine cut off its
    /// file: the mapping holds zeros now, not the engine's bytes, for good.
    pub(crate) fn check_intact(&self) -> Result<(), DmaError> {
        if self.guard.faulted() {
            return Err(DmaError::RegionShrunk {
                name: self.name.clone(),
                declared: self.bytes,
            });
        }
        Ok(())
    }
}

/// Maps the first `bytes` bytes of `fd` shared read-write and lists the mapping in the
/// `SIGBUS` guard; `name` is for errors.
pub(crate) fn map_guarded(
    fd: OwnedFd,
    name: &str,
    bytes: u64,
) -> Result<(MmapRaw, Guarded), DmaError> {
    let map = MmapOptions::new()
        .len(bytes as usize)
        .map_raw(&File::from(fd))
        .map_err(|source| DmaError::RegionMap {
            name: name.to_owned(),
            bytes,
            source,
        })?;
    let guard = Guarded::new(map.as_mut_ptr(), map.len(), name)?;
    Ok((map, guard))
}

/// Opens the shared-memory object `root/<name>` read-write after validating the name, and checks
/// that it is a regular file of at least `bytes` (non-zero) bytes.
pub(crate) fn open_shm_file(root: &Path, name: &str, bytes: u64) -> Result<OwnedFd, DmaError> {
    validate_name(name)?;
    if bytes == 0 {
        return Err(DmaError::EmptyRegion {
            name: name.to_owned(),
        });
    }
    let path = root.join(name);
    let open_err = |source: std::io::Error| DmaError::RegionOpen {
        name: name.to_owned(),
        path: path.clone(),
        source,
    };
    let fd = open(
        &path,
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| open_err(e.into()))?;
    let stat = fstat(&fd).map_err(|e| open_err(e.into()))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(DmaError::RegionNotFile {
            name: name.to_owned(),
        });
    }
    // A regular file's size is never negative.
    let actual = stat.st_size.max(0) as u64;
    if actual < bytes {
        return Err(DmaError::RegionTooSmall {
            name: name.to_owned(),
            actual,
            needed: bytes,
        });
    }
    Ok(fd)
}

/// Where POSIX shared-memory objects live on Linux: `shm_open("/x")` creates `/dev/shm/x`.
pub(crate) const DEFAULT_SHM_ROOT: &str = "/dev/shm";

/// Checks that `name` names exactly one entry directly inside the shm root.
fn validate_name(name: &str) -> Result<(), DmaError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > 255 {
        "it is longer than 255 bytes"
    } else if name.contains('/') {
        "it contains '/'"
    } else if name.contains('\0') {
        "it contains a NUL byte"
    } else if name == "." || name == ".." {
        "it is '.' or '..'"
    } else {
        return Ok(());
    };
    Err(DmaError::BadRegionName {
        name: name.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for good in ["a", "pegaflow-kv-1234", "x.y", "...", &"n".repeat(255)] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
        for (bad, why) in [
            ("", "empty"),
            (&"n".repeat(256) as &str, "255"),
            ("a/b", "'/'"),
            ("/kv", "'/'"),
            ("a\0b", "NUL"),
            (".", "'.'"),
            ("..", "'..'"),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn open_checks_size_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kv"), [7u8; 100]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();

        let region = HostRegion::open(dir.path(), "kv", 64).unwrap();
        assert_eq!((region.name(), region.bytes()), ("kv", 64));

        assert!(matches!(
            HostRegion::open(dir.path(), "kv", 0),
            Err(DmaError::EmptyRegion { .. })
        ));
        assert!(matches!(
            HostRegion::open(dir.path(), "kv", 101),
            Err(DmaError::RegionTooSmall {
                actual: 100,
                needed: 101,
                ..
            })
        ));
        // Opening a directory read-write fails in open(2) already (EISDIR).
        assert!(HostRegion::open(dir.path(), "sub", 1).is_err());
    }

    #[test]
    fn symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("target"), [0u8; 16]).unwrap();
        std::os::unix::fs::symlink(dir.path().join("target"), dir.path().join("link")).unwrap();
        let err = HostRegion::open(dir.path(), "link", 16).unwrap_err();
        assert!(matches!(err, DmaError::RegionOpen { .. }), "{err}");
    }

    #[test]
    fn fifo_is_not_a_region() {
        let dir = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = HostRegion::open(dir.path(), "fifo", 16).unwrap_err();
        assert!(matches!(err, DmaError::RegionNotFile { .. }), "{err}");
    }
}
