//! Limits on what clients hold of the node (config `limits.*`, docs/configuration.md), so one
//! connection, buggy or hostile, cannot exhaust files, memory or threads for the others.
//!
//! A [`Limit`] counts units of one resource against its configured maximum; taking units gives
//! a [`Held`] that returns them when dropped, so a session that ends (or fails) returns what it
//! held without bookkeeping. A refusal is a `limit_exceeded` error naming the config key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pegaflow_config::LimitsConfig;

use crate::protocol::{ErrorCode, ProtoError};

/// One counted resource and its maximum.
#[derive(Debug)]
pub struct Limit {
    held: Arc<AtomicU64>,
    max: u64,
    /// The config key that sets `max`, named in every refusal.
    key: &'static str,
    /// What a unit is, for the refusal's message (`"engines registered on this connection"`).
    what: &'static str,
}

/// Units taken from a [`Limit`]; given back on drop.
#[derive(Debug)]
pub struct Held {
    held: Arc<AtomicU64>,
    units: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held.fetch_sub(self.units, Ordering::AcqRel);
    }
}

impl Limit {
    /// A limit of `max` units, set by config key `key`.
    pub fn new(key: &'static str, max: u64, what: &'static str) -> Self {
        Self {
            held: Arc::new(AtomicU64::new(0)),
            max,
            key,
            what,
        }
    }

    /// Takes `units`, or refuses without taking any when that would pass the maximum.
    pub fn take(&self, units: u64) -> Result<Held, ProtoError> {
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(units).filter(|&total| total <= self.max)
            });
        match taken {
            Ok(_) => Ok(Held {
                held: self.held.clone(),
                units,
            }),
            Err(held) => Err(ProtoError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "`{}` is {}: {held} {} held, {units} more asked",
                    self.key, self.max, self.what
                ),
            )),
        }
    }

    /// Units held now (stats, tests).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

/// The node-wide limits, shared by every session.
#[derive(Debug)]
pub struct NodeLimits {
    pub sessions: Limit,
    pub regions: Limit,
    /// The configured values, from which each session makes its own limits.
    config: LimitsConfig,
}

impl NodeLimits {
    /// Node-wide counters for `config`.
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            sessions: Limit::new(
                "limits.max_sessions",
                config.max_sessions.into(),
                "connections",
            ),
            regions: Limit::new(
                "limits.max_regions",
                config.max_regions.into(),
                "engines registered on the node",
            ),
            config: config.clone(),
        }
    }

    /// Fresh per-connection counters.
    pub fn session(&self) -> SessionLimits {
        let config = &self.config;
        SessionLimits {
            regions: Limit::new(
                "limits.max_regions_per_session",
                config.max_regions_per_session.into(),
                "engines registered on this connection",
            ),
            region_bytes: Limit::new(
                "limits.max_region_bytes_per_session",
                config.max_region_bytes_per_session.bytes(),
                "bytes of KV regions registered on this connection",
            ),
            in_flight: Limit::new(
                "limits.max_in_flight_per_session",
                config.max_in_flight_per_session.into(),
                "saves and loads of this connection running",
            ),
        }
    }
}

/// One connection's own limits.
#[derive(Debug)]
pub struct SessionLimits {
    pub regions: Limit,
    pub region_bytes: Limit,
    pub in_flight: Limit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_refuses_past_its_maximum_and_recovers_on_drop() {
        let limit = Limit::new("limits.test", 3, "things");
        let two = limit.take(2).expect("2 of 3");
        let refused = limit.take(2).expect_err("4 of 3");
        assert_eq!(refused.code, ErrorCode::LimitExceeded);
        assert_eq!(
            refused.message,
            "`limits.test` is 3: 2 things held, 2 more asked"
        );
        let one = limit.take(1).expect("3 of 3");
        assert_eq!(limit.held(), 3);
        drop(two);
        assert_eq!(limit.held(), 1);
        limit.take(2).expect("fits again");
        drop(one);
        assert!(limit.take(u64::MAX).is_err(), "overflow is a refusal");
    }
}
