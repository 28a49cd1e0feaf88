//! Routing: which engine serves a request. Round robin spreads load evenly and ignores
//! prefixes; prefix-aware sends a request to the engine that already served the longest run
//! of its leading hash ids beyond what every engine holds (as KV-aware routers do), falling
//! back to the least busy engine when no engine stands out or the best one is overloaded.

use std::collections::HashSet;

use crate::scenario::RoutingPolicy;
use crate::workload::tokens::mix;

/// Queue length beyond the least busy engine's at which prefix affinity gives way to load.
const MAX_IMBALANCE: usize = 4;

/// Chooses engines.
pub struct Router {
    policy: RoutingPolicy,
    next: usize,
    /// Per engine, fingerprints of every hash-id prefix it served.
    seen: Vec<HashSet<u64>>,
}

impl Router {
    pub fn new(policy: RoutingPolicy, engines: usize) -> Self {
        Self {
            policy,
            next: 0,
            seen: vec![HashSet::new(); engines],
        }
    }

    /// Picks an engine among those `up` for a prompt of `hash_ids`, given each engine's queue.
    pub fn route(&mut self, hash_ids: &[u64], queued: &[usize], up: &[bool]) -> usize {
        let engines = self.seen.len();
        let candidates: Vec<usize> = (0..engines).filter(|&e| up[e]).collect();
        let candidates = if candidates.is_empty() {
            (0..engines).collect()
        } else {
            candidates
        };
        let chosen = match self.policy {
            RoutingPolicy::RoundRobin => {
                let start = self.next;
                let pick = (0..engines)
                    .map(|i| (start + i) % engines)
                    .find(|e| candidates.contains(e))
                    .unwrap_or(start % engines);
                self.next = pick + 1;
                pick
            }
            RoutingPolicy::PrefixAware => {
                let prints = fingerprints(hash_ids);
                let least = candidates.iter().map(|&e| queued[e]).min().unwrap_or(0);
                let matched = |e: usize| {
                    prints
                        .iter()
                        .take_while(|p| self.seen[e].contains(p))
                        .count()
                };
                let matches: Vec<usize> = (0..engines).map(matched).collect();
                // A prefix every candidate holds (a system prompt) says nothing about where to go.
                let common = candidates.iter().map(|&e| matches[e]).min().unwrap_or(0);
                let rotation = self.next;
                self.next += 1;
                // Longest distinguishing match wins, then the shorter queue, then rotation.
                *candidates
                    .iter()
                    .filter(|&&e| queued[e] <= least + MAX_IMBALANCE)
                    .max_by_key(|&&e| {
                        (
                            matches[e] - common,
                            std::cmp::Reverse(queued[e]),
                            std::cmp::Reverse((e + engines - rotation % engines) % engines),
                        )
                    })
                    .unwrap_or(&candidates[0])
            }
        };
        if self.policy == RoutingPolicy::PrefixAware {
            self.seen[chosen].extend(fingerprints(hash_ids));
        }
        chosen
    }
}

/// One fingerprint per prefix of `hash_ids` (a rolling hash), so matching prefixes match
/// fingerprint by fingerprint.
fn fingerprints(hash_ids: &[u64]) -> Vec<u64> {
    let mut rolling = 0u64;
    hash_ids
        .iter()
        .map(|&id| {
            rolling = mix(rolling ^ mix(id));
            rolling
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skips_engines_that_are_down() {
        let mut router = Router::new(RoutingPolicy::RoundRobin, 3);
        let up = [true, false, true];
        let picks: Vec<usize> = (0..4).map(|_| router.route(&[1], &[0; 3], &up)).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
    }

    #[test]
    fn prefix_aware_returns_to_the_engine_that_saw_the_prefix() {
        let mut router = Router::new(RoutingPolicy::PrefixAware, 4);
        let up = [true; 4];
        let first = router.route(&[7, 8], &[0; 4], &up);
        let other = router.route(&[1, 2], &[0; 4], &up);
        assert_ne!(first, other, "ties rotate");
        assert_eq!(router.route(&[7, 8, 9], &[0; 4], &up), first);
        let mut busy = [0; 4];
        busy[first] = 10;
        assert_ne!(
            router.route(&[7, 8, 9], &busy, &up),
            first,
            "overload wins over affinity"
        );
    }
}
