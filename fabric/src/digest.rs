//! The block-availability digest a node gossips: which keys it holds, as a Bloom filter.
//!
//! # Shape
//! The filter is split into shards of [`SHARD_BITS`] bits. A key picks one shard from its first
//! eight bytes and sets [`DigestShape::hashes`] bits inside it (double hashing over the next
//! sixteen bytes), so inserting or evicting a key changes exactly one shard. Only shards whose
//! bits changed since the last publish are gossiped again; with blocks saved at a steady rate,
//! the gossip traffic per round is the number of *touched* shards times 4 KiB, not the filter.
//!
//! # Size and false-positive rate
//! The filter is sized for the node's block capacity at a 1 % target false-positive rate
//! ([`DEFAULT_FP_RATE`]): 9.6 bits and 7 bit positions per key, i.e. 120 KiB of gossip state
//! for 100k blocks and 1.2 MiB for 1M blocks. Why 1 %: a false positive costs one link round
//! trip (the peer answers "missing" and the lookup falls through), against a recompute that
//! costs tens to hundreds of milliseconds; halving the rate to 0.5 % would cost 15 % more
//! gossip state for every node on every peer, for a saving of one round trip in 200 misses.
//! A prefix claim of L consecutive blocks is a false positive with probability 0.01^L, so
//! multi-block claims are almost never wrong.
//!
//! # Deletion
//! Locally every bit has an 8-bit counter, so evicted keys can be removed: a bit clears when
//! its counter returns to zero. A counter that saturates (255 keys on one bit, which the sizing
//! makes vanishingly rare) stays set forever: a rare stale positive, never a false negative.

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;

use crate::BlockKey;

/// Bits in one shard: 4 KiB, so one shard fits a gossip datagram with room for a dozen more.
pub const SHARD_BITS: usize = 1 << 15;
const SHARD_WORDS: usize = SHARD_BITS / 64;
const SHARD_BYTES: usize = SHARD_BITS / 8;

/// Target false-positive rate (see the module docs for why).
pub const DEFAULT_FP_RATE: f64 = 0.01;

/// How a digest is laid out; every reader needs it to test keys, so it is gossiped with the
/// shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigestShape {
    /// Number of [`SHARD_BITS`]-bit shards.
    pub shards: u32,
    /// Bits set per key.
    pub hashes: u32,
}

impl DigestShape {
    /// The smallest shape holding `expected_keys` keys at `fp_rate` (clamped to a sane range).
    pub fn for_capacity(expected_keys: u64, fp_rate: f64) -> DigestShape {
        let keys = expected_keys.max(1) as f64;
        let p = fp_rate.clamp(1e-6, 0.5);
        let ln2 = std::f64::consts::LN_2;
        let bits = (-keys * p.ln() / (ln2 * ln2)).ceil();
        let shards = (bits / SHARD_BITS as f64)
            .ceil()
            .clamp(1.0, u32::MAX as f64) as u32;
        let bits_per_key = bits / keys;
        let hashes = (bits_per_key * ln2).round().clamp(1.0, 16.0) as u32;
        DigestShape { shards, hashes }
    }

    /// The false-positive rate this shape gives with `keys` keys inserted (the textbook
    /// approximation; the simulation measures the real one).
    pub fn expected_fp_rate(&self, keys: u64) -> f64 {
        let m = self.total_bits() as f64;
        let k = self.hashes as f64;
        (1.0 - (-k * keys as f64 / m).exp()).powf(k)
    }

    /// Bits of the whole filter.
    pub fn total_bits(&self) -> u64 {
        self.shards as u64 * SHARD_BITS as u64
    }

    /// Bytes of gossip state when every shard is published.
    pub fn gossip_bytes(&self) -> u64 {
        // base64 without padding: 4 characters per 3 bytes.
        self.shards as u64 * (SHARD_BYTES as u64).div_ceil(3) * 4
    }

    /// Text form for gossip (`v1:<shards>:<hashes>`).
    pub(crate) fn encode(&self) -> String {
        format!("v1:{}:{}", self.shards, self.hashes)
    }

    /// Parses [`DigestShape::encode`]'s output; `None` for anything else (a newer version).
    pub(crate) fn decode(text: &str) -> Option<DigestShape> {
        let mut parts = text.split(':');
        if parts.next()? != "v1" {
            return None;
        }
        let shards = parts.next()?.parse().ok()?;
        let hashes = parts.next()?.parse().ok()?;
        if parts.next().is_some() || shards == 0 || !(1..=16).contains(&hashes) {
            return None;
        }
        Some(DigestShape { shards, hashes })
    }

    /// The shard a key lives in and its bit positions inside that shard.
    fn locate(&self, key: &BlockKey) -> (usize, impl Iterator<Item = usize>) {
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&key[i * 8..i * 8 + 8]);
            // Keys are SHA-256 digests, but mixing costs nothing and keeps test keys honest.
            mix(u64::from_le_bytes(bytes))
        };
        let shard = ((word(0) as u128 * self.shards as u128) >> 64) as usize;
        let h1 = word(1);
        // Odd step: the k positions are distinct modulo the power-of-two shard size.
        let h2 = word(2) | 1;
        let positions = (0..self.hashes as u64)
            .map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) as usize) & (SHARD_BITS - 1));
        (shard, positions)
    }
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// This node's digest: counters for deletion, bits for publishing, and which shards changed.
pub struct LocalDigest {
    shape: DigestShape,
    counters: Vec<u8>,
    bits: Vec<u64>,
    dirty: Vec<bool>,
    keys: u64,
}

impl LocalDigest {
    /// An empty digest; nothing is dirty, because an unpublished shard reads as empty.
    pub fn new(shape: DigestShape) -> LocalDigest {
        let shards = shape.shards as usize;
        LocalDigest {
            shape,
            counters: vec![0; shards * SHARD_BITS],
            bits: vec![0; shards * SHARD_WORDS],
            dirty: vec![false; shards],
            keys: 0,
        }
    }

    pub fn shape(&self) -> DigestShape {
        self.shape
    }

    /// Keys currently counted in.
    pub fn len(&self) -> u64 {
        self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys == 0
    }

    /// Counts `key` in. Inserting a key already present only raises counters, so its shard is
    /// not republished.
    pub fn insert(&mut self, key: &BlockKey) {
        let (shard, positions) = self.shape.locate(key);
        for bit in positions {
            let at = shard * SHARD_BITS + bit;
            if self.counters[at] == 0 {
                self.bits[at / 64] |= 1 << (at % 64);
                self.dirty[shard] = true;
            }
            self.counters[at] = self.counters[at].saturating_add(1);
        }
        self.keys += 1;
    }

    /// Counts `key` out. Only keys that were inserted may be removed (the pool removes what it
    /// evicts, which it had committed, and so inserted).
    pub fn remove(&mut self, key: &BlockKey) {
        let (shard, positions) = self.shape.locate(key);
        for bit in positions {
            let at = shard * SHARD_BITS + bit;
            match self.counters[at] {
                0 | u8::MAX => {}
                1 => {
                    self.counters[at] = 0;
                    self.bits[at / 64] &= !(1 << (at % 64));
                    self.dirty[shard] = true;
                }
                n => self.counters[at] = n - 1,
            }
        }
        self.keys = self.keys.saturating_sub(1);
    }

    /// Whether `key` may be present (same answer a peer gets from the published shards).
    pub fn contains(&self, key: &BlockKey) -> bool {
        let (shard, mut positions) = self.shape.locate(key);
        let words = &self.bits[shard * SHARD_WORDS..(shard + 1) * SHARD_WORDS];
        positions.all(|bit| words[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// Shards whose bits changed since the last call, encoded for gossip, and marks them clean.
    pub fn take_dirty(&mut self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        for (shard, dirty) in self.dirty.iter_mut().enumerate() {
            if std::mem::take(dirty) {
                let words = &self.bits[shard * SHARD_WORDS..(shard + 1) * SHARD_WORDS];
                out.push((shard as u32, encode_shard(words)));
            }
        }
        out
    }
}

/// An all-zero shard is published as the empty string, so a node that evicted everything
/// gossips almost nothing.
fn encode_shard(words: &[u64]) -> String {
    if words.iter().all(|w| *w == 0) {
        return String::new();
    }
    let mut bytes = Vec::with_capacity(SHARD_BYTES);
    for word in words {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    STANDARD_NO_PAD.encode(bytes)
}

/// Decodes one gossiped shard; `None` when it is not a shard of this format.
pub(crate) fn decode_shard(text: &str) -> Option<Box<[u64]>> {
    if text.is_empty() {
        return Some(vec![0; SHARD_WORDS].into_boxed_slice());
    }
    let bytes = STANDARD_NO_PAD.decode(text).ok()?;
    if bytes.len() != SHARD_BYTES {
        return None;
    }
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect(),
    )
}

/// A peer's digest as read from gossip: shards not yet received read as empty.
#[derive(Clone, Debug)]
pub struct RemoteDigest {
    shape: DigestShape,
    /// Per shard: the gossip version it was decoded from, and its bits.
    shards: Vec<Option<(u64, std::sync::Arc<[u64]>)>>,
}

impl RemoteDigest {
    pub fn new(shape: DigestShape) -> RemoteDigest {
        RemoteDigest {
            shape,
            shards: vec![None; shape.shards as usize],
        }
    }

    pub fn shape(&self) -> DigestShape {
        self.shape
    }

    /// The version shard `index` was decoded from, if any.
    pub(crate) fn shard_version(&self, index: usize) -> Option<u64> {
        self.shards.get(index)?.as_ref().map(|(v, _)| *v)
    }

    /// Replaces shard `index` with bits decoded at gossip `version`.
    pub(crate) fn set_shard(&mut self, index: usize, version: u64, words: Box<[u64]>) {
        if let Some(slot) = self.shards.get_mut(index) {
            *slot = Some((version, words.into()));
        }
    }

    /// Whether the peer may hold `key`.
    pub fn contains(&self, key: &BlockKey) -> bool {
        let (shard, mut positions) = self.shape.locate(key);
        match self.shards.get(shard) {
            Some(Some((_, words))) => positions.all(|bit| words[bit / 64] & (1 << (bit % 64)) != 0),
            _ => false,
        }
    }

    /// How many leading keys of `keys` the peer may hold: the prefix it would claim.
    pub fn leading_run(&self, keys: &[BlockKey]) -> usize {
        keys.iter().take_while(|k| self.contains(k)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    pub(crate) fn key(i: u64) -> BlockKey {
        Sha256::digest(i.to_le_bytes()).into()
    }

    fn remote_from(local: &mut LocalDigest) -> RemoteDigest {
        let mut remote = RemoteDigest::new(local.shape());
        for (shard, text) in local.take_dirty() {
            remote.set_shard(
                shard as usize,
                1,
                decode_shard(&text).expect("own encoding"),
            );
        }
        remote
    }

    #[test]
    fn shape_for_one_million_keys_is_about_1_2_mib() {
        let shape = DigestShape::for_capacity(1_000_000, DEFAULT_FP_RATE);
        assert_eq!(shape.hashes, 7);
        let mib = shape.total_bits() as f64 / 8.0 / (1 << 20) as f64;
        assert!((1.1..1.2).contains(&mib), "{mib} MiB");
        assert!((shape.expected_fp_rate(1_000_000) - 0.01).abs() < 0.001);
        assert_eq!(DigestShape::decode(&shape.encode()), Some(shape));
        assert_eq!(DigestShape::decode("v2:1:1"), None);
    }

    #[test]
    fn measured_false_positive_rate_meets_the_target() {
        let n = 100_000;
        let shape = DigestShape::for_capacity(n, DEFAULT_FP_RATE);
        let mut local = LocalDigest::new(shape);
        for i in 0..n {
            local.insert(&key(i));
        }
        let remote = remote_from(&mut local);
        for i in 0..n {
            assert!(remote.contains(&key(i)), "false negative for key {i}");
        }
        let probes = 200_000;
        let fps = (n..n + probes)
            .filter(|i| remote.contains(&key(*i)))
            .count();
        let rate = fps as f64 / probes as f64;
        // Target 1 %; allow sampling noise and the slight shard-load variance.
        assert!(rate < 0.0125, "false-positive rate {rate}");
    }

    #[test]
    fn only_changed_shards_are_republished() {
        let shape = DigestShape::for_capacity(100_000, DEFAULT_FP_RATE);
        assert!(shape.shards > 10);
        let mut local = LocalDigest::new(shape);
        assert!(
            local.take_dirty().is_empty(),
            "an empty digest publishes nothing"
        );
        local.insert(&key(1));
        let dirty = local.take_dirty();
        assert_eq!(dirty.len(), 1, "one key touches one shard");
        assert!(local.take_dirty().is_empty(), "published shards are clean");
        local.insert(&key(1));
        assert!(local.take_dirty().is_empty(), "a re-insert changes no bit");
        local.remove(&key(1));
        assert!(local.take_dirty().is_empty(), "one copy is still counted");
        local.remove(&key(1));
        let cleared = local.take_dirty();
        assert_eq!(cleared.len(), 1);
        assert_eq!(
            cleared[0].1, "",
            "an empty shard is published as empty text"
        );
        assert!(!local.contains(&key(1)));
    }

    #[test]
    fn removal_keeps_other_keys() {
        let shape = DigestShape::for_capacity(1_000, DEFAULT_FP_RATE);
        let mut local = LocalDigest::new(shape);
        for i in 0..1_000 {
            local.insert(&key(i));
        }
        for i in 0..500 {
            local.remove(&key(i));
        }
        assert_eq!(local.len(), 500);
        assert!((500..1_000).all(|i| local.contains(&key(i))));
        let remote = remote_from(&mut local);
        let keys: Vec<_> = (500..1_000).map(key).collect();
        assert_eq!(remote.leading_run(&keys), 500);
    }

    #[test]
    fn malformed_shards_are_rejected() {
        assert!(decode_shard("not base64!").is_none());
        assert!(decode_shard("AAAA").is_none());
        assert_eq!(decode_shard("").map(|s| s.len()), Some(SHARD_WORDS));
    }
}
