//! The guard that keeps a client's shared memory from killing the node with `SIGBUS`.
//!
//! The node maps files that engines own (KV regions, load progress boards). An engine can shrink
//! its file at any time (`ftruncate`), and touching a mapped page past the new end raises
//! `SIGBUS`, whose default action kills the node and every other engine's cache service with it.
//! The file cannot be sealed (a file in `/dev/shm` opened by name takes no seals), and copying
//! through `preadv`/`pwritev` instead of mapping cost 2.5-4x of the copy bandwidth on tmpfs
//! (docs/benchmarks.md). So the node maps, and guards each mapping here, as Wayland compositors
//! do with their clients' buffers: every guarded mapping is listed in a fixed table; a `SIGBUS`
//! inside one replaces the whole mapping with private zero pages (`mmap(MAP_FIXED |
//! MAP_ANONYMOUS)`), marks it faulted and returns, so the faulting copy finishes harmlessly; the
//! copy's owner then sees [`Guarded::faulted`] and fails the request with an error naming the
//! region. A faulted mapping stays detached from the engine's file: every later copy fails too.
//! A `SIGBUS` anywhere else goes to the handler that was installed before (Rust's, or the
//! default action), exactly as without the guard.
//!
//! The handler only reads atomics and calls `mmap`, both safe in a signal handler.

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

use crate::error::DmaError;

/// Mappings guarded at once: at least a region and a progress board for each of
/// `limits.max_regions` (default 1024) engines, with room to spare.
const SLOTS: usize = 8192;

/// One guarded mapping; `start == 0` marks a free slot.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(
    clippy::declare_interior_mutable_const,
    reason = "array initializer only"
)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// The signature of an `SA_SIGINFO` handler.
type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// The `SIGBUS` action in place before ours, called for faults outside guarded mappings.
static mut PREVIOUS: Option<libc::sigaction> = None;
static INSTALL: Once = Once::new();

/// A mapping listed in the guard table; removed from it on drop, which must happen before the
/// mapping is unmapped (declare it before the mapping in a struct, or drop it first).
#[derive(Debug)]
pub(crate) struct Guarded {
    slot: usize,
}

impl Guarded {
    /// Lists `[start, start + len)` (a whole mapping, page-aligned) in the table.
    pub(crate) fn new(start: *mut u8, len: usize, name: &str) -> Result<Guarded, DmaError> {
        install();
        let start = start as usize;
        for (slot, entry) in TABLE.iter().enumerate() {
            if entry.len.load(Ordering::Acquire) != 0 {
                continue;
            }
            // Claim the slot by its length first; the start published last makes it live.
            if entry
                .len
                .compare_exchange(0, len, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                entry.faulted.store(false, Ordering::Release);
                entry.start.store(start, Ordering::Release);
                return Ok(Guarded { slot });
            }
        }
        Err(DmaError::TooManyMappings {
            name: name.to_owned(),
            most: SLOTS,
        })
    }

    /// Whether a `SIGBUS` hit this mapping: its file was shrunk under it, and the mapping now
    /// holds private zero pages instead of the file.
    pub(crate) fn faulted(&self) -> bool {
        TABLE[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let entry = &TABLE[self.slot];
        entry.start.store(0, Ordering::Release);
        entry.len.store(0, Ordering::Release);
    }
}

/// Installs the handler once per process, remembering the action it replaces.
fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed `sigaction` is a valid value; the handler has the `SA_SIGINFO`
        // signature; `PREVIOUS` is written here once, before the handler can run (it is
        // installed by this very call), and only read afterwards.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            let handler: Handler = on_sigbus;
            action.sa_sigaction = handler as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
                PREVIOUS = Some(previous);
            } else {
                tracing::error!(
                    error = %std::io::Error::last_os_error(),
                    "cannot install the SIGBUS guard; a client shrinking its shared memory can \
                     kill the node"
                );
            }
        }
    });
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel hands a valid siginfo for SA_SIGINFO handlers; SIGBUS carries si_addr.
    let addr = unsafe { (*info).si_addr() } as usize;
    for entry in &TABLE {
        let start = entry.start.load(Ordering::Acquire);
        let len = entry.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: `[start, start + len)` is a live mapping of ours (listed until just before it
        // is unmapped, and a copy that faults in it keeps it alive); replacing it with private
        // anonymous pages of the same size keeps every pointer into it valid.
        let replaced = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if replaced != libc::MAP_FAILED {
            entry.faulted.store(true, Ordering::Release);
            return;
        }
        break;
    }
    // SAFETY: `PREVIOUS` was set before this handler was installed and never changes after.
    let previous = unsafe { ptr::addr_of!(PREVIOUS).read() };
    match previous {
        Some(previous) if previous.sa_sigaction == libc::SIG_IGN => {}
        Some(previous) if previous.sa_sigaction != libc::SIG_DFL => {
            // SAFETY: calling the handler that was installed for SIGBUS, with its own signature.
            unsafe {
                if previous.sa_flags & libc::SA_SIGINFO != 0 {
                    let handler: extern "C" fn(
                        libc::c_int,
                        *mut libc::siginfo_t,
                        *mut libc::c_void,
                    ) = std::mem::transmute(previous.sa_sigaction);
                    handler(signal, info, context);
                } else {
                    let handler: extern "C" fn(libc::c_int) =
                        std::mem::transmute(previous.sa_sigaction);
                    handler(signal);
                }
            }
        }
        _ => {
            // The default action: restore it and return, so the faulting access raises SIGBUS
            // again and the process ends as it would have without the guard.
            // SAFETY: a zeroed sigaction with SIG_DFL (0) is the default action.
            unsafe {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, ptr::null_mut());
            }
        }
    }
}
