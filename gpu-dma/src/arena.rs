//! The pool arena: the memory that holds every cached KV page on this node.
//!
//! The arena is one anonymous shared-memory file (a memfd) mapped read-write. A file rather than
//! anonymous memory because the node must hand the same pages to others by fd: to CPU-only
//! connectors that map it and copy pages themselves, and later to the CUDA driver to pin it for DMA.
//! `ftruncate` only sets the size; the kernel allocates pages when they are first touched, so a
//! large pool costs nothing until it fills.
//!
//! # Concurrency contract
//! The arena is shared by `Arc` between the pool and the transfer actors, and disjoint pages are
//! read and written concurrently through `&Arena`. This is sound because the arena never hands out
//! `&mut` references and every access goes through raw pointers into the mapping, and because page
//! ownership is granted by the pool: a page is written only by the holder of its write lease (a save
//! in progress) and read only while no such lease exists. Two accesses to the same bytes where one
//! is a write, without a lease handing the page from one to the other, are a bug in the caller.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{ftruncate, memfd_create, MemfdFlags};

use crate::error::{check_span, DmaError};

/// Size of an explicit (hugetlbfs) huge page the arena uses: the x86-64 and arm64 default.
const HUGE_PAGE_BYTES: u64 = 2 << 20;

/// Where the kernel says how much memory there is, huge pages included.
const MEMINFO: &str = "/proc/meminfo";

/// Where the kernel says when shared memory gets transparent huge pages.
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// How the arena's pages are backed.
///
/// Huge pages matter twice for a pinned pool: `cuMemHostRegister` pins and maps per page, so 2 MiB
/// pages make pinning a large pool faster, and the GPU's DMA translations cover 512 times more
/// memory per entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    /// A `MFD_HUGETLB` memfd of explicit 2 MiB pages, its size rounded up to whole pages: used
    /// when the administrator reserved enough free ones (`vm.nr_hugepages`).
    Hugetlb {
        /// The memfd's and the mapping's size.
        map_len: u64,
    },
    /// A plain memfd with `madvise(MADV_HUGEPAGE)`: shared memory then gets transparent huge
    /// pages where `shmem_enabled` allows it (`advise`, `within_size` or `always`), small pages
    /// otherwise.
    Transparent,
}

/// Picks the backing of a `len`-byte arena from the text of `/proc/meminfo`: explicit huge pages
/// when the default huge page size is 2 MiB and enough are free and not reserved by another
/// mapping (`HugePages_Free - HugePages_Rsvd`), else transparent huge pages.
fn choose_backing(meminfo: &str, len: u64) -> Backing {
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(':')?;
            value.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let map_len = len.div_ceil(HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES;
    let page_kib = field("Hugepagesize");
    let free = field("HugePages_Free").unwrap_or(0);
    let reserved = field("HugePages_Rsvd").unwrap_or(0);
    let available = free
        .saturating_sub(reserved)
        .saturating_mul(HUGE_PAGE_BYTES);
    if page_kib == Some(HUGE_PAGE_BYTES >> 10) && available >= map_len {
        Backing::Hugetlb { map_len }
    } else {
        Backing::Transparent
    }
}

/// Pool memory: one shared-memory file (memfd) mapped read-write, so it can later be pinned for DMA
/// and passed to connectors by fd.
///
/// See the module docs for the concurrency contract that makes `&Arena` writes sound.
#[derive(Debug)]
pub struct Arena {
    /// The shared read-write mapping of the whole memfd; unmapped on drop.
    map: MmapRaw,
    /// Keeps the memfd open so it can be lent to connectors and the CUDA driver.
    file: File,
    len: u64,
}

impl Arena {
    /// Creates a `len`-byte arena backed by a memfd called `name` (the name only shows up in
    /// `/proc/<pid>/fd` and `/proc/<pid>/maps`, to make the pool recognisable when debugging).
    ///
    /// The memfd is close-on-exec so it never leaks into child processes. Pages are allocated
    /// lazily on first touch. `len` must be non-zero. Huge pages are used when present (see
    /// [`Backing`]); the choice is logged.
    pub fn new(len: u64, name: &str) -> Result<Arena, DmaError> {
        let fail = |source: std::io::Error| DmaError::Arena {
            name: name.to_owned(),
            len,
            source,
        };
        if len == 0 {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an arena must hold at least one byte",
            )));
        }
        let meminfo = std::fs::read_to_string(MEMINFO).unwrap_or_default();
        if let Backing::Hugetlb { map_len } = choose_backing(&meminfo, len) {
            match map_memfd(name, map_len, MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB) {
                Ok((file, map)) => {
                    tracing::info!(
                        name,
                        len,
                        map_len,
                        "pool arena created on explicit 2 MiB huge pages"
                    );
                    return Ok(Arena { map, file, len });
                }
                Err(e) => tracing::warn!(
                    name,
                    len,
                    error = %e,
                    "explicit huge pages looked free but could not be mapped; \
                     using transparent huge pages"
                ),
            }
        }
        let (file, map) = map_memfd(name, len, MemfdFlags::empty()).map_err(fail)?;
        // Advice only: it fails on kernels without THP, and the arena works without it.
        let advice = map
            .advise(memmap2::Advice::HugePage)
            .map_or_else(|e| format!("madvise failed: {e}"), |()| "advised".into());
        let shmem_enabled = std::fs::read_to_string(SHMEM_THP)
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
        tracing::info!(
            name,
            len,
            transparent_hugepages = %advice,
            %shmem_enabled,
            "pool arena created with transparent huge pages where shmem_enabled allows \
             (not enough free explicit 2 MiB pages)"
        );
        Ok(Arena { map, file, len })
    }

    /// Gives the arena's pages the `MPOL_PREFERRED` policy for NUMA `node`: pages touched from now
    /// on are allocated there while it has room. Call before pinning first touches them; pages
    /// already allocated stay where they are.
    pub fn prefer_numa_node(&self, node: u32) -> std::io::Result<()> {
        self.prefer_numa_node_for(0, self.map.len() as u64, node)
    }

    /// [`Arena::prefer_numa_node`] for the bytes `[offset, offset + len)` only (one pool's slice
    /// of an arena shared by the pools of several NUMA nodes). `offset` must be a multiple of the
    /// arena's page size (2 MiB on explicit huge pages, else 4 KiB).
    pub fn prefer_numa_node_for(&self, offset: u64, len: u64, node: u32) -> std::io::Result<()> {
        const MPOL_PREFERRED: libc::c_int = 1;
        /// Words of the node mask: 1024 nodes, the kernel's largest `MAX_NUMNODES`.
        const MASK_WORDS: usize = 16;
        const MASK_BITS: usize = MASK_WORDS * libc::c_ulong::BITS as usize;
        let node = node as usize;
        if node >= MASK_BITS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("NUMA node {node} is beyond {MASK_BITS}"),
            ));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.map.len() as u64)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bytes {offset}+{len} are not inside the arena"),
            ));
        }
        let word_bits = libc::c_ulong::BITS as usize;
        let mut mask: [libc::c_ulong; MASK_WORDS] = [0; MASK_WORDS];
        mask[node / word_bits] |= 1 << (node % word_bits);
        // SAFETY: mbind only changes the memory policy of part of our own mapping (checked
        // above), which stays mapped for the call; `mask` is a live array of `MASK_BITS` bits, and
        // `maxnode` is one more than that because the kernel ignores the last bit it is given.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                self.base_ptr().wrapping_add(offset as usize) as libc::c_ulong,
                len as libc::c_ulong,
                MPOL_PREFERRED,
                mask.as_ptr(),
                (MASK_BITS + 1) as libc::c_ulong,
                0 as libc::c_uint,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// The arena's size in bytes, fixed at creation.
    #[expect(
        clippy::len_without_is_empty,
        reason = "an arena is never empty: new() rejects len 0"
    )]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The memfd behind the arena, to pass to connectors (`SCM_RIGHTS`) or to pin for DMA.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Read access to `[offset, offset + len)`, for checksumming, spilling or sending a page.
    ///
    /// Returns [`DmaError::OutOfBounds`] (naming the arena) if the span does not fit.
    ///
    /// The caller must hold a lease on the pages it reads so that nobody writes them while the
    /// returned slice lives (see the module's concurrency contract); the arena cannot check this.
    pub fn read(&self, offset: u64, len: u64) -> Result<&[u8], DmaError> {
        let ptr = self.span_ptr(offset, len)?;
        // SAFETY: `span_ptr` checked that the span lies inside the mapping, which lives as long as
        // `&self`. No `&mut` to arena bytes ever exists, and by the lease contract no one writes
        // these bytes while the caller holds its lease, which outlives the returned borrow.
        Ok(unsafe { std::slice::from_raw_parts(ptr, len as usize) })
    }

    /// Copies `data` into the arena at `offset`, e.g. a page fetched from SSD or a peer.
    ///
    /// Returns [`DmaError::OutOfBounds`] (naming the arena) if the span does not fit; nothing is
    /// written then. The caller must hold the write lease on the pages it writes.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        let ptr = self.span_ptr(offset, data.len() as u64)?;
        // SAFETY: the span is inside the mapping (checked above); `data` is caller memory and
        // cannot be arena memory borrowed from a leased page being written (the lease contract
        // forbids reading a page while it is written), so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        Ok(())
    }

    /// The first byte of the mapping; the engines bounds-check against [`Arena::len`] and copy
    /// straight between a region and the arena with it.
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Bounds-checks `[offset, offset + len)` and returns a pointer to its first byte.
    fn span_ptr(&self, offset: u64, len: u64) -> Result<*mut u8, DmaError> {
        check_span("arena", offset, len, self.len)?;
        // `offset <= len`, the mapping's length, so the add stays in the allocation.
        Ok(self.base_ptr().wrapping_add(offset as usize))
    }
}

/// Creates a memfd of `len` bytes with `flags` (plus close-on-exec) and maps it shared read-write.
fn map_memfd(name: &str, len: u64, flags: MemfdFlags) -> std::io::Result<(File, MmapRaw)> {
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | flags)?;
    ftruncate(&fd, len)?;
    let file = File::from(fd);
    let map = MmapOptions::new().len(len as usize).map_raw(&file)?;
    Ok((file, map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_arena_reads_zero_and_round_trips() {
        let arena = Arena::new(1 << 20, "test-arena").unwrap();
        assert_eq!(arena.len(), 1 << 20);
        assert!(arena.read(4096, 16).unwrap().iter().all(|&b| b == 0));
        arena.write(4096, b"pegaflow").unwrap();
        assert_eq!(arena.read(4096, 8).unwrap(), b"pegaflow");
    }

    #[test]
    fn bounds_are_checked() {
        let arena = Arena::new(4096, "test-arena").unwrap();
        assert!(arena.read(0, 4096).is_ok());
        assert!(arena.read(4096, 0).is_ok());
        let err = arena.read(4000, 97).unwrap_err();
        assert!(
            matches!(
                err,
                DmaError::OutOfBounds {
                    what: "arena",
                    offset: 4000,
                    len: 97,
                    limit: 4096
                }
            ),
            "{err}"
        );
        assert!(arena.read(u64::MAX, 2).is_err());
        assert!(arena.write(4095, b"ab").is_err());
        // A rejected write leaves the arena untouched.
        assert_eq!(arena.read(4095, 1).unwrap(), &[0]);
    }

    #[test]
    fn zero_length_is_rejected() {
        let err = Arena::new(0, "empty").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn fd_is_the_sized_memfd() {
        let arena = Arena::new(8192, "test-arena").unwrap();
        let stat = rustix::fs::fstat(arena.fd()).unwrap();
        // Exactly the size on small pages; rounded up to 2 MiB where free huge pages exist.
        assert!(
            stat.st_size == 8192 || stat.st_size == 2 << 20,
            "{}",
            stat.st_size
        );
        let flags = rustix::io::fcntl_getfd(arena.fd()).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    const MEMINFO_FREE: &str = "MemTotal:       263855616 kB\n\
HugePages_Total:    1024\nHugePages_Free:      600\nHugePages_Rsvd:      88\n\
HugePages_Surp:        0\nHugepagesize:       2048 kB\nHugetlb:         2097152 kB\n";

    #[test]
    fn free_explicit_huge_pages_are_used_when_they_hold_the_pool() {
        // 600 free, 88 promised to other mappings: 512 pages = 1 GiB can be had.
        assert_eq!(
            choose_backing(MEMINFO_FREE, 1 << 30),
            Backing::Hugetlb { map_len: 1 << 30 }
        );
        assert_eq!(
            choose_backing(MEMINFO_FREE, 5 << 20),
            Backing::Hugetlb { map_len: 6 << 20 },
            "rounded up to whole 2 MiB pages"
        );
        assert_eq!(
            choose_backing(MEMINFO_FREE, (1 << 30) + 1),
            Backing::Transparent
        );
    }

    #[test]
    fn otherwise_transparent_huge_pages_are_asked_for() {
        let none = "HugePages_Total:       0\nHugePages_Free:        0\nHugePages_Rsvd:        0\n\
Hugepagesize:       2048 kB\n";
        assert_eq!(choose_backing(none, 4096), Backing::Transparent);
        let gigantic = MEMINFO_FREE.replace("2048 kB", "1048576 kB");
        assert_eq!(
            choose_backing(&gigantic, 4096),
            Backing::Transparent,
            "1 GiB default pages"
        );
        assert_eq!(
            choose_backing("", 4096),
            Backing::Transparent,
            "no /proc/meminfo"
        );
        assert_eq!(
            choose_backing("HugePages_Free: lots\nHugepagesize: 2048 kB\n", 4096),
            Backing::Transparent
        );
    }

    #[test]
    fn preferring_a_numa_node_is_accepted_or_refused_cleanly() {
        let arena = Arena::new(1 << 20, "test-arena").unwrap();
        // Node 0 exists everywhere (mbind may still be refused in a sandbox without NUMA).
        if let Err(e) = arena.prefer_numa_node(0) {
            assert_ne!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        }
        assert!(arena.prefer_numa_node(1 << 20).is_err());
        assert!(
            arena.prefer_numa_node_for(4096, 1 << 20, 0).is_err(),
            "past the end"
        );
        if let Err(e) = arena.prefer_numa_node_for(4096, 4096, 0) {
            assert_ne!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        }
        arena.write(0, b"still usable").unwrap();
    }

    #[test]
    fn arena_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Arena>();
    }
}
