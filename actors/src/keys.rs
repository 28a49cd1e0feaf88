//! Block keys (docs/design.md §4): a namespace hash per model/layout/rank, then a chain of SHA-256
//! digests over the token ids of each full block, so equal prefixes give equal keys in every
//! engine and different models, dtypes, layouts or ranks can never collide.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes in one key (a SHA-256 digest).
pub const KEY_BYTES: usize = 32;

/// One block's key.
pub type BlockKey = [u8; KEY_BYTES];

/// Everything that makes KV bytes incompatible between two engines; hashed into the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceFields {
    pub model: String,
    pub dtype: String,
    pub layout: String,
    pub block_size: u32,
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub tp_rank: u32,
    pub tp_size: u32,
    pub pp_stage: u32,
}

impl NamespaceFields {
    /// The namespace digest every key of this engine is chained from.
    pub fn digest(&self) -> BlockKey {
        let mut hash = Sha256::new();
        hash.update(b"pegaflow-namespace-v1");
        for text in [&self.model, &self.dtype, &self.layout] {
            hash.update((text.len() as u32).to_le_bytes());
            hash.update(text.as_bytes());
        }
        for value in [
            self.block_size,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.tp_rank,
            self.tp_size,
            self.pp_stage,
        ] {
            hash.update(value.to_le_bytes());
        }
        hash.finalize().into()
    }
}

/// Keys of every full block of `tokens`; a trailing partial block has none.
pub fn chain_keys(namespace: &BlockKey, tokens: &[u32], block_size: usize) -> Vec<BlockKey> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut previous = [0u8; KEY_BYTES];
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let mut hash = Sha256::new();
            hash.update(namespace);
            hash.update(previous);
            for token in block {
                hash.update(token.to_le_bytes());
            }
            previous = hash.finalize().into();
            previous
        })
        .collect()
}

/// Hashes a [`BlockKey`] by its first 8 bytes: keys are already SHA-256 digests, so running
/// them through SipHash again only costs lookup latency.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, _length_prefix: usize) {}
}

/// Builds [`KeyHasher`]s for maps keyed by [`BlockKey`].
pub type KeyHash = std::hash::BuildHasherDefault<KeyHasher>;

/// Splits a wire `keys` field (`32 * n` bytes) into keys.
pub fn split_keys(raw: &[u8]) -> Option<Vec<BlockKey>> {
    if !raw.len().is_multiple_of(KEY_BYTES) {
        return None;
    }
    Some(
        raw.chunks_exact(KEY_BYTES)
            .map(|chunk| {
                let mut key = [0u8; KEY_BYTES];
                key.copy_from_slice(chunk);
                key
            })
            .collect(),
    )
}

/// Joins keys into the wire `keys` field.
pub fn join_keys(keys: &[BlockKey]) -> Vec<u8> {
    keys.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Vector {
        namespace_fields: NamespaceFields,
        namespace: String,
        tokens: Vec<u32>,
        keys: Vec<String>,
    }

    #[test]
    fn golden_vectors_match_python() {
        let raw = include_str!("../../connector/tests/golden/keys.json");
        let vectors: Vec<Vector> = serde_json::from_str(raw).expect("keys.json parses");
        assert!(!vectors.is_empty());
        for vector in vectors {
            let namespace = vector.namespace_fields.digest();
            assert_eq!(hex::encode(namespace), vector.namespace);
            let keys = chain_keys(
                &namespace,
                &vector.tokens,
                vector.namespace_fields.block_size as usize,
            );
            let hexed: Vec<String> = keys.iter().map(hex::encode).collect();
            assert_eq!(hexed, vector.keys);
        }
    }

    #[test]
    fn key_hasher_uses_the_digest_prefix() {
        use std::hash::BuildHasher;
        let hasher = KeyHash::default();
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&7u64.to_le_bytes());
        assert_eq!(hasher.hash_one(key), 7);
        key[31] = 1;
        assert_eq!(hasher.hash_one(key), 7, "only the prefix counts");
    }

    #[test]
    fn split_rejects_partial_keys_and_round_trips() {
        assert!(split_keys(&[0u8; 33]).is_none());
        let keys = vec![[1u8; 32], [2u8; 32]];
        assert_eq!(split_keys(&join_keys(&keys)), Some(keys));
    }
}
