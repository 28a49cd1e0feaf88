//! The copy-engine abstraction the transfer actors are generic over.
//!
//! A save or load of one layer is a batch of scattered contiguous copies between an engine's KV
//! region and arena pages: one op per (block, K or V) in vLLM's layout. The batch is the unit of
//! work because that is what a GPU engine hands to a stream at once (one batched copy or one
//! kernel launch); the host engine simply runs the ops with `memcpy`.

use std::time::Instant;

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
/// Implemented by the host engine (shared memory, `memcpy`) and the CUDA engine (IPC memory,
/// copy engines or a gather/scatter kernel on a stream), so the transfer actor is written once;
/// [`crate::enqueue_layers`] and [`crate::finish_layers`] drive a whole job through it.
pub trait DmaEngine: Send + Sync + 'static {
    /// An opened engine region: a mapping (host) or an IPC-opened device pointer (CUDA). Closing
    /// happens on drop.
    type Region: Send + Sync + 'static;

    /// What [`DmaEngine::end_layer`] returns: how to learn when a layer's copies have landed.
    type LayerEnd: Send;

    /// Short name reported to clients and logs (`"host"`, `"cuda"`).
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

    /// How many consecutive layers of a job in `direction` the engine wants per
    /// [`DmaEngine::copy_layers`] call, so it can merge their copies (the CUDA engine's strided
    /// path turns each block's rows of those layers into one copy). 1 by default: one layer at a
    /// time, each signalled on its own.
    fn layers_per_copy(&self, direction: Direction) -> usize {
        let _ = direction;
        1
    }

    /// Copies several consecutive layers' batches in `direction`, with the same checks and
    /// enqueue-only semantics as [`DmaEngine::copy_layer`]. The default copies layer by layer.
    fn copy_layers(
        &self,
        region: &Self::Region,
        direction: Direction,
        layers: &[Vec<CopyOp>],
    ) -> Result<(), DmaError> {
        layers
            .iter()
            .try_for_each(|ops| self.copy_layer(region, direction, ops))
    }

    /// Marks the end of one layer's copies in `direction` (enqueued by the last
    /// `copy_layer`/`copy_layers` call). For a load given `event_slot`, the CUDA engine records
    /// that interprocess event of the region's ring on the load stream, so the engine's stream can
    /// wait on it GPU-side; otherwise it records an event of its own. The host engine, whose
    /// copies are done when `copy_layer` returns, notes the time.
    fn end_layer(
        &self,
        region: &Self::Region,
        direction: Direction,
        event_slot: Option<u32>,
    ) -> Result<Self::LayerEnd, DmaError>;

    /// Blocks until the copies before `end` have landed and returns when that became known (for
    /// the host engine, when its copy returned). `region` is the one `end` was made for.
    fn wait_layer(&self, region: &Self::Region, end: Self::LayerEnd) -> Result<Instant, DmaError>;

    /// Waits until every copy enqueued by [`DmaEngine::copy_layer`] in `direction` has landed.
    ///
    /// The default is for engines whose `copy_layer` is synchronous (the host engine).
    fn finish(&self, region: &Self::Region, direction: Direction) -> Result<(), DmaError> {
        let _ = (region, direction);
        Ok(())
    }

    /// Called once per job, before its first copy, in the order the node received the jobs.
    /// A load's copies into `region` then start only after every save layer of `region`
    /// enqueued so far has read its blocks, so after every save already answered: the engine
    /// may hand a saved block to another request as soon as the save was answered
    /// (docs/protocol.md, `answer_when_queued`), and that request's load must not overwrite it
    /// while the save still reads it. The CUDA engine makes the load stream wait on the event
    /// its saves record after each layer; a wait, never a block.
    ///
    /// The default does nothing: the host engine's saves are done before they are answered.
    fn begin_job(&self, region: &Self::Region, direction: Direction) -> Result<(), DmaError> {
        let _ = (region, direction);
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
