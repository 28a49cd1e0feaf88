//! One file per op, each turning a typed request into a reply body (docs/protocol.md).

pub mod hello;
pub mod load;
pub mod lookup;
pub mod queued;
pub mod register;
pub mod release;
pub mod save;
pub mod stats;

use std::sync::Arc;

use super::{Engine, SessionState};
use crate::context::NodeContext;
use crate::keys::{split_keys, BlockKey, KEY_BYTES};
use crate::limits::Held;
use crate::protocol::{BlocksRequest, ErrorCode, ProtoError};

/// Splits a `keys` field, naming the field when its length is not whole keys.
pub fn parse_keys(raw: &[u8]) -> Result<Vec<BlockKey>, ProtoError> {
    split_keys(raw).ok_or_else(|| {
        ProtoError::new(
            ErrorCode::BadKey,
            format!(
                "field `keys`: {} bytes is not a multiple of the {KEY_BYTES}-byte key length",
                raw.len()
            ),
        )
    })
}

/// A validated `save` or `load`, ready to run off the session's message loop.
pub struct BlocksJob {
    pub ctx: Arc<NodeContext>,
    pub engine: Arc<Engine>,
    pub keys: Vec<BlockKey>,
    pub block_ids: Vec<u32>,
    /// `save` only: reply once the blocks are durable on SSD.
    pub persist: bool,
    /// `save` only: per layer, the engine event slot the copy of that layer waits on (empty: none).
    pub after_events: Vec<u32>,
    /// `save` only: answer once the copies are queued (GPU engines), not once they are done.
    pub answer_when_queued: bool,
}

/// The checks `save` and `load` share, run in order with the session's other ops: a
/// registered engine, whole keys, one block id per key, every block id inside the region, and
/// room under `limits.max_in_flight_per_session` (the returned [`Held`] is that room, to keep
/// until the reply is sent).
pub fn prepare_blocks(
    state: &SessionState,
    req: BlocksRequest,
) -> Result<(BlocksJob, Held), ProtoError> {
    let engine = state.engines.get(&req.engine).cloned().ok_or_else(|| {
        ProtoError::new(
            ErrorCode::NotRegistered,
            format!(
                "field `engine`: engine {} is not registered on this connection",
                req.engine
            ),
        )
    })?;
    let keys = parse_keys(&req.keys)?;
    if keys.len() != req.block_ids.len() {
        return Err(ProtoError::new(
            ErrorCode::BadKey,
            format!(
                "field `keys`: {} keys for {} block_ids; expected one key per block id",
                keys.len(),
                req.block_ids.len()
            ),
        ));
    }
    engine.layout.check_blocks(&req.block_ids)?;
    check_after_events(&engine, &req.after_events)?;
    let running = state.limits.in_flight.take(1)?;
    let job = BlocksJob {
        ctx: state.ctx.clone(),
        engine,
        keys,
        block_ids: req.block_ids,
        persist: req.persist,
        after_events: req.after_events,
        answer_when_queued: req.answer_when_queued,
    };
    Ok((job, running))
}

/// `after_events` is absent, or names one registered engine event per layer.
fn check_after_events(engine: &Engine, after_events: &[u32]) -> Result<(), ProtoError> {
    let layers = engine.layout.layers.len();
    if !after_events.is_empty() && after_events.len() != layers {
        return Err(ProtoError::new(
            ErrorCode::BadField,
            format!(
                "field `after_events`: {} slots for {layers} layers; give one per layer or none",
                after_events.len()
            ),
        ));
    }
    match after_events
        .iter()
        .position(|&slot| slot >= engine.engine_events)
    {
        Some(i) => Err(ProtoError::new(
            ErrorCode::OutOfRange,
            format!(
                "field `after_events[{i}]`: slot {} is not below the {} `engine_events` registered",
                after_events[i], engine.engine_events
            ),
        )),
        None => Ok(()),
    }
}
