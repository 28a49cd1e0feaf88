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
    /// lazily on first touch. `len` must be non-zero.
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
        let fd = memfd_create(name, MemfdFlags::CLOEXEC).map_err(|e| fail(e.into()))?;
        ftruncate(&fd, len).map_err(|e| fail(e.into()))?;
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(len as usize)
            .map_raw(&file)
            .map_err(fail)?;
        tracing::info!(name, len, "pool arena created");
        Ok(Arena { map, file, len })
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
        assert_eq!(stat.st_size, 8192);
        let flags = rustix::io::fcntl_getfd(arena.fd()).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn arena_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Arena>();
    }
}
