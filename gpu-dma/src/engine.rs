//! The copy-engine abstraction the transfer actors are generic over.
//!
//! A save or load of one layer is a batch of scattered contiguous copies between an engine's KV
//! region and arena pages: one op per (block, K or V) in vLLM's layout. The batch is the unit of
//! work because that is what a GPU engine launches as one gather/scatter kernel on a stream; the
//! host engine simply runs the ops with `memcpy`.

use crate::error::DmaError;
use crate::region::RegionSource;

/// Which way a copy moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Region -> arena: the engine computed KV that the pool keeps.
    Save,
    /// Arena -> region: cached KV goes back into the engine instead of being recomputed.
    Load,
}

/// One contiguous copy of `len` bytes between a region and the arena.
///
/// The direction is not part of the op: a whole layer's batch goes the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyOp {
    /// Byte offset in the engine's region.
    pub region_offset: u64,
    /// Byte offset in the pool arena.
    pub arena_offset: u64,
    /// Number of bytes to copy.
    pub len: u64,
}

/// A way to move KV bytes between engine regions and the pool arena.
///
/// Implemented by the host engine (shared memory, `memcpy`) and later by the CUDA engine (IPC
/// memory, a gather/scatter kernel on a stream), so the transfer actor is written once.
pub trait DmaEngine: Send + Sync + 'static {
    /// An opened engine region: a mapping (host) or an IPC-opened device pointer (CUDA). Closing
    /// happens on drop.
    type Region: Send + Sync + 'static;

    /// Short name reported to clients and logs (`"host"`, later `"cuda"`).
    fn name(&self) -> &'static str;

    /// Opens the region a connector described at register time.
    fn open_region(&self, source: &RegionSource) -> Result<Self::Region, DmaError>;

    /// Copies one layer's batch of `ops` in `direction`.
    ///
    /// Every op is bounds-checked against both the region and the arena before any byte moves, so
    /// a bad op list copies nothing and returns [`DmaError::OutOfBounds`] naming the side at fault.
    /// Ops whose destinations overlap leave those bytes unspecified.
    fn copy_layer(
        &self,
        region: &Self::Region,
        direction: Direction,
        ops: &[CopyOp],
    ) -> Result<(), DmaError>;
}
