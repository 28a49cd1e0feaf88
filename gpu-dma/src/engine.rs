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
    ///
    /// An engine may only enqueue the copies (the CUDA engine launches them on the direction's
    /// stream and returns); the bytes are in place once [`DmaEngine::finish`] returns. Callers must
    /// call `finish` before reading saved arena pages (checksums) or acknowledging a load. `ops`
    /// may be dropped as soon as this returns.
    fn copy_layer(
        &self,
        region: &Self::Region,
        direction: Direction,
        ops: &[CopyOp],
    ) -> Result<(), DmaError>;

    /// Waits until every copy enqueued by [`DmaEngine::copy_layer`] in `direction` has landed.
    ///
    /// The default is for engines whose `copy_layer` is synchronous (the host engine).
    fn finish(&self, region: &Self::Region, direction: Direction) -> Result<(), DmaError> {
        let _ = (region, direction);
        Ok(())
    }

    /// Marks the end of one layer of a load: the CUDA engine records interprocess event `slot` of
    /// the region's event ring on the load stream, so the engine's stream can wait on it GPU-side.
    ///
    /// The default does nothing: without a GPU there is no stream to signal, and the host engine's
    /// copies are complete when `copy_layer` returns.
    fn record_layer_event(&self, region: &Self::Region, slot: u32) -> Result<(), DmaError> {
        let _ = (region, slot);
        Ok(())
    }

    /// Makes the copies of a save enqueued after this call wait until the engine's event `slot`
    /// (one of the `engine_events` the region was opened with) has fired: the CUDA engine issues
    /// `cuStreamWaitEvent` on the save stream, so the engine records an event after writing a
    /// layer and asks for the save without synchronizing its stream, and no thread blocks.
    ///
    /// The default does nothing: the host engine's regions are written by the engine's CPU before
    /// it sends the save.
    fn wait_engine_event(&self, region: &Self::Region, slot: u32) -> Result<(), DmaError> {
        let _ = (region, slot);
        Ok(())
    }

    /// The interprocess event handles (`cuIpcGetEventHandle`) of the region's event ring, slot by
    /// slot, for the connector to open; empty for engines without events.
    fn layer_event_handles(&self, region: &Self::Region) -> Vec<[u8; 64]> {
        let _ = region;
        Vec::new()
    }
}
