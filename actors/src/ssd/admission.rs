//! Admission: which pages evicted from memory are worth an SSD write.
//!
//! An SSD write costs bandwidth and pushes the oldest segment out; a block used once (a one-off
//! prompt) should not displace blocks that are reused. `second_hit` spills a page only when it
//! was hit while in memory, or when its key was evicted before and then saved again: the
//! evicted keys it refused are remembered (keys only, bounded) for that second chance.

use std::num::NonZeroUsize;

use lru::LruCache;
use pegaflow_config::SsdAdmission;

use crate::keys::BlockKey;

/// Refused keys remembered for a second chance (32 B each: 2 MiB).
const GHOSTS: usize = 65_536;

/// The admission policy with the state `second_hit` needs.
pub struct Admission {
    policy: SsdAdmission,
    ghosts: LruCache<BlockKey, ()>,
}

impl Admission {
    /// A policy as configured.
    pub fn new(policy: SsdAdmission) -> Self {
        let ghosts = NonZeroUsize::new(GHOSTS).map_or_else(LruCache::unbounded, LruCache::new);
        Self { policy, ghosts }
    }

    /// Whether an evicted page goes to SSD; `was_hit` says whether it was hit in memory.
    pub fn admit(&mut self, key: &BlockKey, was_hit: bool) -> bool {
        match self.policy {
            SsdAdmission::Always => true,
            SsdAdmission::Never => false,
            SsdAdmission::SecondHit if was_hit => true,
            SsdAdmission::SecondHit => {
                self.ghosts.put(*key, ());
                false
            }
        }
    }

    /// Whether a newly stored key was refused before, which counts as a hit.
    pub fn seen_before(&mut self, key: &BlockKey) -> bool {
        self.ghosts.pop(key).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_hit_admits_hit_pages_and_keys_seen_twice() {
        let mut admission = Admission::new(SsdAdmission::SecondHit);
        assert!(admission.admit(&[1; 32], true));
        assert!(!admission.admit(&[2; 32], false));
        assert!(admission.seen_before(&[2; 32]));
        assert!(!admission.seen_before(&[2; 32]), "one second chance");
        assert!(!admission.seen_before(&[3; 32]));
    }

    #[test]
    fn always_and_never_ignore_hits() {
        assert!(Admission::new(SsdAdmission::Always).admit(&[1; 32], false));
        assert!(!Admission::new(SsdAdmission::Never).admit(&[1; 32], true));
    }
}
