//! Driving a whole save or load through a [`DmaEngine`]: the one order of calls the node and the
//! bench share, so what the bench measures is what the node does.
//!
//! Layers go in order, in groups of [`DmaEngine::layers_per_copy`] (one layer per group when the
//! job waits on the engine's events: a layer-wise save copies each layer as soon as the engine
//! wrote it, so its copies overlap the engine's compute instead of waiting for a group's last
//! layer): a group's waits on the engine's events first (a save's copies of layer `L` must not
//! start before the engine wrote it), then its copies in one [`DmaEngine::copy_layers`] call, then one
//! [`DmaEngine::end_layer`] per layer (a load's interprocess event when it has a slot). Once
//! everything is enqueued, [`finish_layers`] waits for the layers in order and reports how long
//! each took from its group's submission.

use std::ops::Range;
use std::time::{Duration, Instant};

use crate::engine::{CopyOp, Direction, DmaEngine};
use crate::error::DmaError;

/// A layer whose copies are enqueued.
pub struct EnqueuedLayer<End> {
    /// When the layer's batch (its group's, when layers are merged) was handed to the engine.
    pub submitted: Instant,
    /// How to learn when it landed.
    pub end: End,
}

/// Enqueues every layer of a job: `layers[i]`'s copies after the engine's event `wait_events[i]`
/// when given, and each layer ended with its event slot `event_slots[i]` when given; `ended(i)`
/// runs once layer `i`'s end is enqueued (the node arms the layer's progress word there).
/// Returns the layers in order, for [`finish_layers`].
pub fn enqueue_layers<E: DmaEngine>(
    engine: &E,
    region: &E::Region,
    direction: Direction,
    layers: &[Vec<CopyOp>],
    wait_events: &[u32],
    event_slots: &[u32],
    mut ended: impl FnMut(usize),
) -> Result<Vec<EnqueuedLayer<E::LayerEnd>>, DmaError> {
    let mut enqueued = Vec::with_capacity(layers.len());
    let per_group = match wait_events.is_empty() {
        true => engine.layers_per_copy(direction),
        false => 1,
    };
    for group in layer_groups(layers.len(), per_group) {
        for &slot in group.clone().filter_map(|layer| wait_events.get(layer)) {
            engine.wait_engine_event(region, slot)?;
        }
        let submitted = Instant::now();
        engine.copy_layers(region, direction, &layers[group.clone()])?;
        for layer in group {
            let end = engine.end_layer(region, direction, event_slots.get(layer).copied())?;
            enqueued.push(EnqueuedLayer { submitted, end });
            ended(layer);
        }
    }
    Ok(enqueued)
}

/// Waits for each enqueued layer in order, calls `landed` with the time from its submission until
/// its copies were known to have landed, then finishes the direction.
pub fn finish_layers<E: DmaEngine>(
    engine: &E,
    region: &E::Region,
    direction: Direction,
    enqueued: Vec<EnqueuedLayer<E::LayerEnd>>,
    mut landed: impl FnMut(Duration),
) -> Result<(), DmaError> {
    for layer in enqueued {
        let at = engine.wait_layer(region, layer.end)?;
        landed(at.saturating_duration_since(layer.submitted));
    }
    engine.finish(region, direction)
}

/// Consecutive ranges of at most `per` layers (at least 1) covering `0..layers`.
fn layer_groups(layers: usize, per: usize) -> impl Iterator<Item = Range<usize>> {
    let per = per.max(1);
    (0..layers)
        .step_by(per)
        .map(move |start| start..(start + per).min(layers))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::region::RegionSource;

    /// An engine that records the calls it gets and merges `per` layers.
    struct Recorder {
        per: usize,
        calls: Mutex<Vec<String>>,
    }

    impl Recorder {
        fn new(per: usize) -> Self {
            Recorder {
                per,
                calls: Mutex::new(Vec::new()),
            }
        }

        fn log(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl DmaEngine for Recorder {
        type Region = ();
        type LayerEnd = (Option<u32>, Instant);

        fn name(&self) -> &'static str {
            "recorder"
        }

        fn open_region(&self, _: &RegionSource) -> Result<(), DmaError> {
            Ok(())
        }

        fn layers_per_copy(&self, _: Direction) -> usize {
            self.per
        }

        fn copy_layer(&self, _: &(), _: Direction, ops: &[CopyOp]) -> Result<(), DmaError> {
            self.log(format!("copy {}", ops[0].len));
            Ok(())
        }

        fn copy_layers(
            &self,
            _: &(),
            _: Direction,
            layers: &[Vec<CopyOp>],
        ) -> Result<(), DmaError> {
            let lens: Vec<String> = layers.iter().map(|l| l[0].len.to_string()).collect();
            self.log(format!("copy {}", lens.join("+")));
            Ok(())
        }

        fn end_layer(
            &self,
            _: &(),
            _: Direction,
            slot: Option<u32>,
        ) -> Result<Self::LayerEnd, DmaError> {
            self.log(format!("end {slot:?}"));
            Ok((slot, Instant::now()))
        }

        fn wait_layer(&self, _: &(), end: Self::LayerEnd) -> Result<Instant, DmaError> {
            self.log(format!("wait {:?}", end.0));
            Ok(end.1)
        }

        fn wait_engine_event(&self, _: &(), slot: u32) -> Result<(), DmaError> {
            self.log(format!("after {slot}"));
            Ok(())
        }

        fn finish(&self, _: &(), _: Direction) -> Result<(), DmaError> {
            self.log("finish".into());
            Ok(())
        }
    }

    /// Five layers whose single op's length is the layer number, so calls show which layer.
    fn five_layers() -> Vec<Vec<CopyOp>> {
        (1..=5)
            .map(|len| {
                vec![CopyOp {
                    region_offset: 0,
                    arena_offset: 0,
                    len,
                }]
            })
            .collect()
    }

    #[test]
    fn groups_cover_every_layer_once_in_order() {
        let groups = |n, per| {
            layer_groups(n, per)
                .map(|g| (g.start, g.end))
                .collect::<Vec<_>>()
        };
        assert_eq!(groups(5, 2), [(0, 2), (2, 4), (4, 5)]);
        assert_eq!(groups(4, 8), [(0, 4)]);
        assert_eq!(
            groups(3, 0),
            [(0, 1), (1, 2), (2, 3)],
            "0 means one at a time"
        );
        assert!(groups(0, 4).is_empty());
    }

    #[test]
    fn a_load_copies_layer_by_layer_each_ended_with_its_event_slot() {
        let engine = Recorder::new(1);
        let layers = five_layers();
        let ended = |layer| engine.log(format!("ended {layer}"));
        let enqueued = enqueue_layers(
            &engine,
            &(),
            Direction::Load,
            &layers[..2],
            &[],
            &[7, 8],
            ended,
        )
        .unwrap();
        let mut took = Vec::new();
        finish_layers(&engine, &(), Direction::Load, enqueued, |d| took.push(d)).unwrap();
        assert_eq!(
            *engine.calls.lock().unwrap(),
            [
                "copy 1",
                "end Some(7)",
                "ended 0",
                "copy 2",
                "end Some(8)",
                "ended 1",
                "wait Some(7)",
                "wait Some(8)",
                "finish"
            ]
        );
        assert_eq!(took.len(), 2, "one observation per layer");
    }

    #[test]
    fn a_bulk_save_merges_layers_into_groups_sharing_their_submission() {
        let engine = Recorder::new(2);
        let enqueued = enqueue_layers(
            &engine,
            &(),
            Direction::Save,
            &five_layers(),
            &[],
            &[],
            |_| {},
        )
        .unwrap();
        assert_eq!(
            *engine.calls.lock().unwrap(),
            [
                "copy 1+2", "end None", "end None", "copy 3+4", "end None", "end None", "copy 5",
                "end None"
            ]
        );
        assert_eq!(enqueued.len(), 5);
        assert_eq!(enqueued[0].submitted, enqueued[1].submitted);
        let mut took = 0;
        finish_layers(&engine, &(), Direction::Save, enqueued, |_| took += 1).unwrap();
        assert_eq!(took, 5);
    }

    #[test]
    fn a_layer_wise_save_copies_each_layer_right_after_its_engine_event() {
        let engine = Recorder::new(2);
        let events = [10, 11, 12];
        enqueue_layers(
            &engine,
            &(),
            Direction::Save,
            &five_layers()[..3],
            &events,
            &[],
            |_| {},
        )
        .unwrap();
        assert_eq!(
            *engine.calls.lock().unwrap(),
            [
                "after 10", "copy 1", "end None", "after 11", "copy 2", "end None", "after 12",
                "copy 3", "end None"
            ]
        );
    }
}
