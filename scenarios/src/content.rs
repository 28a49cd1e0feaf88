//! What a simulated engine writes into a KV block: bytes derived from the block's key alone.
//! Any engine can then check any load byte-exact without remembering what was saved, and a
//! corrupt or misplaced page (wrong key, wrong layer, stale bytes) shows as a mismatch.

use pegaflow_actors::keys::BlockKey;

use crate::workload::tokens::mix;

/// Fills `out` (one layer's segment of the block, `layer` 0-based) with the block's bytes.
pub fn fill(key: &BlockKey, layer: u32, out: &mut [u8]) {
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&key[..8]);
    let base = u64::from_le_bytes(seed) ^ (u64::from(layer) << 56);
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let word = mix(base.wrapping_add(i as u64)).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// Whether `data` is exactly what [`fill`] writes for this key and layer.
pub fn matches(key: &BlockKey, layer: u32, data: &[u8]) -> bool {
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&key[..8]);
    let base = u64::from_le_bytes(seed) ^ (u64::from(layer) << 56);
    data.chunks(8).enumerate().all(|(i, chunk)| {
        let word = mix(base.wrapping_add(i as u64)).to_le_bytes();
        chunk == &word[..chunk.len()]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_depends_on_key_and_layer() {
        let mut a = vec![0u8; 100];
        fill(&[1; 32], 0, &mut a);
        assert!(matches(&[1; 32], 0, &a));
        assert!(!matches(&[2; 32], 0, &a));
        assert!(!matches(&[1; 32], 1, &a));
        a[57] ^= 1;
        assert!(!matches(&[1; 32], 0, &a));
    }
}
