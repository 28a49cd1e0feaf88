//! Per-layer completion events: a load's interprocess CUDA events in a ring per region, the
//! engine's own events that saves wait on, and the node's private end-of-layer events.
//!
//! When the node has copied layer `L` of a load into the engine's KV tensor it records an event on
//! the load stream; the engine's stream waits on it (`cudaStreamWaitEvent`, GPU-side) before layer
//! `L`'s attention, so compute on layer `L` overlaps the copy of layer `L + 1` and no CPU thread in
//! the engine blocks. The events are created once, when the region is registered, with
//! `CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING`, and their `cuIpcGetEventHandle` handles go
//! to the connector, which opens each once.
//!
//! Which slots a load uses is decided by an [`EventRing`], plain CPU bookkeeping the session keeps
//! per registered engine: a load of `n` layers reserves `n` consecutive slots (wrapping) and
//! releases them when the connector confirms its stream has issued the waits. A slot is never
//! handed out twice while reserved, because `cudaStreamWaitEvent` waits for the most recent record
//! at the time of the wait call: re-recording a slot before the engine issued its wait would make
//! it wait for the wrong copy.
//!
//! Saves go the other way: the engine records its own interprocess event after writing each
//! layer and sends their handles at register ([`EngineEvents`], opened here once); a save names
//! one slot per layer and the save stream waits on it before copying that layer. The engine
//! re-recording a slot before the node's wait was issued only makes the save wait for a later
//! point of the same engine stream, never too little.
//!
//! To learn when each layer of a job has landed (the per-layer latency metric), the node waits on
//! the layer's end ([`CudaLayerEnd`]): a load's ring event when it has one, else an event of its
//! own recorded after the layer ([`OwnedEvent`]).

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use crate::cuda::driver::{bind, check};
use crate::error::DmaError;

/// Events per registered region: two loads of a 128-layer model, or eight of a 32-layer one.
pub const EVENT_RING_SLOTS: u32 = 256;

/// Hands out ranges of event slots for loads and takes them back; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRing {
    slots: u32,
    next: u32,
    /// Reserved ranges as `(first slot, count)`, oldest first.
    reserved: std::collections::VecDeque<(u32, u32)>,
}

impl EventRing {
    /// A ring over `slots` events (the length of the region's event handle list).
    pub fn new(slots: u32) -> EventRing {
        EventRing {
            slots,
            next: 0,
            reserved: std::collections::VecDeque::new(),
        }
    }

    /// Slots currently reserved.
    pub fn in_use(&self) -> u32 {
        self.reserved.iter().map(|&(_, n)| n).sum()
    }

    /// Reserves `layers` consecutive slots (wrapping) for one load and returns the first: layer
    /// `L`'s event is slot `(first + L) % slots`. `None` if that many are not free now.
    pub fn reserve(&mut self, layers: u32) -> Option<u32> {
        if layers == 0 || self.in_use() + layers > self.slots {
            return None;
        }
        let first = self.next;
        self.next = (first + layers) % self.slots;
        self.reserved.push_back((first, layers));
        Some(first)
    }

    /// Releases the range that [`EventRing::reserve`] returned `first` for. Ranges may be released
    /// in any order; slots become reusable once every older range is released too, because slots
    /// are handed out in ring order. Returns false for a range that is not reserved.
    pub fn release(&mut self, first: u32) -> bool {
        match self.reserved.iter().position(|&(f, _)| f == first) {
            Some(i) => {
                if i == 0 {
                    self.reserved.pop_front();
                } else {
                    // Keep the slots blocked until older ranges go: mark as released in place.
                    self.reserved[i].0 = u32::MAX;
                }
                while self.reserved.front().is_some_and(|&(f, _)| f == u32::MAX) {
                    self.reserved.pop_front();
                }
                true
            }
            None => false,
        }
    }

    /// The slot of layer `layer` in the range starting at `first`.
    pub fn slot(&self, first: u32, layer: u32) -> u32 {
        (first + layer) % self.slots
    }
}

/// A region's interprocess events and their IPC handles; destroyed on drop.
pub(crate) struct LayerEvents {
    ctx: Arc<CudaContext>,
    events: Vec<sys::CUevent>,
    handles: Vec<[u8; 64]>,
}

// SAFETY: the events are driver handles owned by this value; recording and destroying them is
// thread-safe once the context is bound, which every user does.
unsafe impl Send for LayerEvents {}
// SAFETY: as above; `&LayerEvents` only reads the handle list and passes events to the driver.
unsafe impl Sync for LayerEvents {}

impl LayerEvents {
    /// Creates `slots` interprocess events and exports their handles.
    pub(crate) fn new(ctx: &Arc<CudaContext>, slots: u32) -> Result<LayerEvents, DmaError> {
        bind(ctx)?;
        let mut ring = LayerEvents {
            ctx: ctx.clone(),
            events: Vec::with_capacity(slots as usize),
            handles: Vec::with_capacity(slots as usize),
        };
        let flags = sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32
            | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        for _ in 0..slots {
            let mut event: sys::CUevent = std::ptr::null_mut();
            // SAFETY: writes one event handle; the event is destroyed in Drop.
            check(unsafe { sys::cuEventCreate(&mut event, flags) }, || {
                "cuEventCreate (interprocess layer event)".into()
            })?;
            ring.events.push(event);
            let mut handle = sys::CUipcEventHandle { reserved: [0; 64] };
            // SAFETY: `event` is a live interprocess event; writes one 64-byte handle.
            check(
                unsafe { sys::cuIpcGetEventHandle(&mut handle, event) },
                || "cuIpcGetEventHandle (layer event)".into(),
            )?;
            ring.handles.push(handle.reserved.map(|b| b as u8));
        }
        Ok(ring)
    }

    /// The event of `slot`, or an error naming the ring size.
    pub(crate) fn event(&self, slot: u32) -> Result<sys::CUevent, DmaError> {
        self.events
            .get(slot as usize)
            .copied()
            .ok_or(DmaError::OutOfBounds {
                what: "event ring",
                offset: u64::from(slot),
                len: 1,
                limit: self.events.len() as u64,
            })
    }

    /// The exported handles, slot by slot.
    pub(crate) fn handles(&self) -> &[[u8; 64]] {
        &self.handles
    }
}

impl Drop for LayerEvents {
    fn drop(&mut self) {
        if bind(&self.ctx).is_err() {
            return;
        }
        for &event in &self.events {
            // SAFETY: created in `new`; the region is going away, so nothing records it again.
            unsafe { sys::cuEventDestroy_v2(event) };
        }
    }
}

/// An engine's own per-layer events, opened from its interprocess handles; closed on drop.
pub(crate) struct EngineEvents {
    ctx: Arc<CudaContext>,
    events: Vec<sys::CUevent>,
}

// SAFETY: the events are driver handles owned by this value; waiting on and destroying them is
// thread-safe once the context is bound, which every user does.
unsafe impl Send for EngineEvents {}
// SAFETY: as above; `&EngineEvents` only passes the events to the driver.
unsafe impl Sync for EngineEvents {}

impl EngineEvents {
    /// Opens every handle (`cuIpcOpenEventHandle`); on a failure the ones opened so far close.
    pub(crate) fn open(ctx: &Arc<CudaContext>, handles: &[[u8; 64]]) -> Result<Self, DmaError> {
        bind(ctx)?;
        let mut opened = EngineEvents {
            ctx: ctx.clone(),
            events: Vec::with_capacity(handles.len()),
        };
        for (slot, handle) in handles.iter().enumerate() {
            let handle = sys::CUipcEventHandle {
                reserved: handle.map(|b| b as std::ffi::c_char),
            };
            let mut event: sys::CUevent = std::ptr::null_mut();
            // SAFETY: writes one event handle; it is destroyed in Drop.
            check(
                unsafe { sys::cuIpcOpenEventHandle(&mut event, handle) },
                || format!("cuIpcOpenEventHandle (engine event {slot})"),
            )?;
            opened.events.push(event);
        }
        Ok(opened)
    }

    /// The event of `slot`, or an error naming how many the engine sent.
    pub(crate) fn event(&self, slot: u32) -> Result<sys::CUevent, DmaError> {
        self.events
            .get(slot as usize)
            .copied()
            .ok_or(DmaError::OutOfBounds {
                what: "engine events",
                offset: u64::from(slot),
                len: 1,
                limit: self.events.len() as u64,
            })
    }
}

impl Drop for EngineEvents {
    fn drop(&mut self) {
        if self.events.is_empty() || bind(&self.ctx).is_err() {
            return;
        }
        for &event in &self.events {
            // SAFETY: opened in `open`; the region owning these drains the context before its
            // fields drop, so no stream still waits on them. Destroying an opened IPC event
            // closes this process's reference only.
            unsafe { sys::cuEventDestroy_v2(event) };
        }
    }
}

/// An event the engine creates for itself (`DISABLE_TIMING`), destroyed on drop.
pub(crate) struct OwnedEvent {
    ctx: Arc<CudaContext>,
    event: sys::CUevent,
}

// SAFETY: a driver handle owned by this value; recording, waiting on and destroying it are
// thread-safe once the context is bound, which every user does.
unsafe impl Send for OwnedEvent {}

impl OwnedEvent {
    /// A new event in `ctx`.
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<OwnedEvent, DmaError> {
        bind(ctx)?;
        let mut event: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: writes one event handle; it is destroyed in Drop.
        check(unsafe { sys::cuEventCreate(&mut event, flags) }, || {
            "cuEventCreate (layer end)".into()
        })?;
        Ok(OwnedEvent {
            ctx: ctx.clone(),
            event,
        })
    }

    /// The driver handle, for recording and waiting.
    pub(crate) fn raw(&self) -> sys::CUevent {
        self.event
    }
}

impl Drop for OwnedEvent {
    fn drop(&mut self) {
        if bind(&self.ctx).is_ok() {
            // SAFETY: created in `new`; destroying an event still pending on a stream is allowed
            // (the driver releases it once the stream passes it).
            unsafe { sys::cuEventDestroy_v2(self.event) };
        }
    }
}

/// Where one layer of a job ends on its lane, for [`crate::DmaEngine::wait_layer`].
pub struct CudaLayerEnd(pub(crate) End);

/// What a [`CudaLayerEnd`] waits on.
pub(crate) enum End {
    /// Slot of the region's interprocess ring that a load recorded after the layer.
    Ring(u32),
    /// An event of the engine's own, recorded after the layer.
    Own(OwnedEvent),
}

/// Blocks until `event` has completed.
pub(crate) fn synchronize(event: sys::CUevent) -> Result<(), DmaError> {
    // SAFETY: the caller passes a live event; the calling thread has the context bound.
    check(unsafe { sys::cuEventSynchronize(event) }, || {
        "cuEventSynchronize (layer end)".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_wrap_and_never_overlap() {
        let mut ring = EventRing::new(10);
        assert_eq!(ring.reserve(4), Some(0));
        assert_eq!(ring.reserve(4), Some(4));
        assert_eq!(ring.reserve(4), None, "only 2 slots are free");
        assert!(ring.release(0));
        assert_eq!(ring.reserve(4), Some(8));
        assert_eq!(ring.slot(8, 0), 8);
        assert_eq!(ring.slot(8, 3), 1, "wraps around");
        assert_eq!(ring.in_use(), 8);
    }

    #[test]
    fn out_of_order_release_keeps_older_slots_blocked() {
        let mut ring = EventRing::new(6);
        assert_eq!(ring.reserve(3), Some(0));
        assert_eq!(ring.reserve(3), Some(3));
        assert!(ring.release(3));
        // Slots 3..6 are released, but handing them out again must wait for slots 0..3:
        // reservations are accounted for as one contiguous window.
        assert_eq!(ring.reserve(3), None);
        assert!(ring.release(0));
        assert_eq!(ring.in_use(), 0);
        assert_eq!(ring.reserve(6), Some(0));
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut ring = EventRing::new(4);
        assert_eq!(ring.reserve(0), None);
        assert_eq!(ring.reserve(5), None);
        assert!(!ring.release(2));
    }
}
