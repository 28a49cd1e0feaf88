//! The crate's error type.
//!
//! Every variant names the thing at fault (the region by its shared-memory name, or which side of a
//! copy ran out of bounds), because these errors travel back to the connector as reply messages and
//! must be actionable without the node's logs.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while creating the arena, opening an engine's region, or copying.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The connector sent a shared-memory name that cannot safely name a file in the shm root.
    #[error("shared-memory region name {name:?} is invalid: {reason}")]
    BadRegionName {
        /// The name as received.
        name: String,
        /// Which rule it broke.
        reason: &'static str,
    },

    /// The connector declared a zero-byte region; there is nothing to map or copy.
    #[error(
        "shared-memory region {name:?} declares 0 bytes; a region must hold at least one byte"
    )]
    EmptyRegion {
        /// The region's shared-memory name.
        name: String,
    },

    /// The region's file could not be opened or inspected (missing, permission, symlink, ...).
    #[error("cannot open shared-memory region {name:?} at {}: {source}", path.display())]
    RegionOpen {
        /// The region's shared-memory name.
        name: String,
        /// The full path that was opened.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },

    /// The region's name resolves to something other than a regular file (a directory, a FIFO).
    #[error("shared-memory region {name:?} is not a regular file")]
    RegionNotFile {
        /// The region's shared-memory name.
        name: String,
    },

    /// The region's file is shorter than the size the connector declared; mapping it would fault.
    #[error("shared-memory region {name:?} holds {actual} bytes but {needed} were declared")]
    RegionTooSmall {
        /// The region's shared-memory name.
        name: String,
        /// The file's size.
        actual: u64,
        /// The declared size.
        needed: u64,
    },

    /// The region's file opened but could not be mapped.
    #[error("cannot map shared-memory region {name:?} ({bytes} bytes): {source}")]
    RegionMap {
        /// The region's shared-memory name.
        name: String,
        /// The declared size that was being mapped.
        bytes: u64,
        /// What the OS said.
        source: io::Error,
    },

    /// The engine shrank its region's file below the size it declared at register while the
    /// node had it mapped; a copy touched the lost pages. The node stays up; the mapping no
    /// longer shows the engine's file, so this and every later copy of the region fail.
    #[error(
        "shared-memory region {name:?} was shrunk below its declared {declared} bytes while \
         registered; the engine must not truncate a registered region (register it again)"
    )]
    RegionShrunk {
        /// The region's shared-memory name.
        name: String,
        /// The size declared at register.
        declared: u64,
    },

    /// The node guards every client file it maps against `SIGBUS`, in a table of fixed size,
    /// and the table is full.
    #[error("cannot map shared-memory region {name:?}: the node already guards {most} mappings")]
    TooManyMappings {
        /// The region's shared-memory name.
        name: String,
        /// The table's size.
        most: usize,
    },

    /// A copy (or an arena read/write) reaches past the end of the region or of the arena.
    #[error("{len} bytes at offset {offset} run past the end of the {what} ({limit} bytes)")]
    OutOfBounds {
        /// `"region"` or `"arena"`: the side whose bounds were broken.
        what: &'static str,
        /// Start of the rejected span.
        offset: u64,
        /// Length of the rejected span.
        len: u64,
        /// Size of the side that was overrun.
        limit: u64,
    },

    /// This engine cannot open this kind of region (a CUDA IPC region on the host engine, or a
    /// shared-memory region on the CUDA engine): the connector registered with the wrong engine.
    #[error(
        "the {engine} copy engine cannot open a {kind} region; the node runs the {engine} engine"
    )]
    UnsupportedRegion {
        /// The engine's name (`"host"`, `"cuda"`).
        engine: &'static str,
        /// The region kind that was asked for.
        kind: &'static str,
    },

    /// No usable CUDA driver or device: the reason is meant for the node's start-up log.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),

    /// A CUDA driver call failed; `op` names the call and what it was for.
    #[error("CUDA {op} failed: {message}")]
    Cuda {
        /// The driver call and its purpose, e.g. `"cuIpcOpenMemHandle (open engine region)"`.
        op: String,
        /// The driver's error name and description.
        message: String,
    },

    /// The pool arena could not be created (memfd, size, or mapping failed).
    #[error("cannot create the {len}-byte pool arena {name:?}: {source}")]
    Arena {
        /// The arena's memfd name.
        name: String,
        /// The requested size.
        len: u64,
        /// What the OS said.
        source: io::Error,
    },
}

impl DmaError {
    /// Whether the error is the engine's region failing under a copy (its file shrunk) rather
    /// than the node: the reply then says the region is unavailable, not `internal`.
    pub fn is_region_fault(&self) -> bool {
        matches!(self, DmaError::RegionShrunk { .. })
    }
}

/// Checks that `[offset, offset + len)` lies within `[0, limit)` of the side named `what`.
///
/// Shared by the arena and the engines so that every bounds failure reads the same way.
pub(crate) fn check_span(
    what: &'static str,
    offset: u64,
    len: u64,
    limit: u64,
) -> Result<(), DmaError> {
    match offset.checked_add(len) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(DmaError::OutOfBounds {
            what,
            offset,
            len,
            limit,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_checks_end_and_overflow() {
        assert!(check_span("arena", 0, 10, 10).is_ok());
        assert!(check_span("arena", 10, 0, 10).is_ok());
        assert!(check_span("arena", 1, 10, 10).is_err());
        let err = check_span("region", u64::MAX, 2, 10).unwrap_err();
        assert!(err.to_string().contains("region"), "{err}");
    }
}
