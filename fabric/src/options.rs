//! Everything a fabric instance needs at start, resolved from `fabric.*` config.
//!
//! The config names one `listen` address; gossip uses it over UDP and the link over TCP, the
//! same port number on both protocols. Tests and the simulation set the two apart, and bind the
//! link to port 0, through the fields directly.

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig, ProtocolVersion};
use pegaflow_config::FabricConfig;

use crate::digest::{DigestShape, DEFAULT_FP_RATE};
use crate::error::FabricError;
use crate::link::client::LinkOptions;
use crate::member;

/// How long tombstoned gossip keys are kept. The fabric never deletes keys (an empty digest
/// shard is published as empty text), so this only bounds chitchat's own bookkeeping.
const TOMBSTONE_GRACE: Duration = Duration::from_secs(3600);
/// Dead nodes' state is forgotten after this many failure timeouts, so a node that flaps back
/// is still recognised but a dead one does not linger for chitchat's default day.
const DEAD_NODE_GRACE_FACTOR: u32 = 12;

/// A fabric instance's settings.
#[derive(Clone, Debug)]
pub struct FabricOptions {
    pub cluster_id: String,
    pub node_id: String,
    pub gossip_listen: SocketAddr,
    /// Address peers gossip to (must be routable: not 0.0.0.0).
    pub gossip_advertise: SocketAddr,
    pub link_listen: SocketAddr,
    /// Address peers dial for pages; `None`: the gossip advertise IP with the bound link port.
    pub link_advertise: Option<SocketAddr>,
    pub seeds: Vec<String>,
    pub zone: String,
    /// Host identity for "same host first" ranking; the kernel host name by default.
    pub host: String,
    pub secret: String,
    pub gossip_interval: Duration,
    /// Silence after which a peer is declared dead (roughly; see [`FabricOptions::chitchat_config`]).
    pub failure_timeout: Duration,
    pub capacity_bytes: u64,
    /// Blocks the digest is sized for (pool plus SSD capacity in pages).
    pub expected_keys: u64,
    pub fp_rate: f64,
    pub link: LinkOptions,
}

impl FabricOptions {
    /// Options from the node's `fabric` section, for a pool of `capacity_bytes` holding up to
    /// `expected_keys` blocks.
    pub fn from_config(
        config: &FabricConfig,
        capacity_bytes: u64,
        expected_keys: u64,
    ) -> Result<FabricOptions, FabricError> {
        let secret = config
            .secret
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| FabricError::Config {
                field: "fabric.secret",
                reason: "a non-empty shared secret is required".to_owned(),
            })?;
        let advertise = config.advertise.unwrap_or(config.listen);
        if advertise.ip().is_unspecified() {
            return Err(FabricError::Config {
                field: "fabric.advertise",
                reason: format!(
                    "required when fabric.listen ({}) is a wildcard address: peers must be told where to dial",
                    config.listen
                ),
            });
        }
        let host = local_host_name();
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{host}-{:08x}", rand::random::<u32>()));
        Ok(FabricOptions {
            cluster_id: config.cluster_id.clone(),
            node_id,
            gossip_listen: config.listen,
            gossip_advertise: advertise,
            link_listen: config.listen,
            link_advertise: Some(advertise),
            seeds: config.seeds.clone(),
            zone: config.zone.clone(),
            host,
            secret,
            gossip_interval: Duration::from_millis(config.gossip_interval_ms),
            failure_timeout: Duration::from_millis(config.failure_timeout_ms),
            capacity_bytes,
            expected_keys,
            fp_rate: DEFAULT_FP_RATE,
            link: LinkOptions::default(),
        })
    }

    /// The digest shape these options size.
    pub fn digest_shape(&self) -> DigestShape {
        DigestShape::for_capacity(self.expected_keys, self.fp_rate)
    }

    /// Chitchat's configuration, every field set from ours.
    ///
    /// Failure detection: chitchat's phi-accrual detector declares a peer dead when the time
    /// since its last heartbeat exceeds `phi_threshold` times the mean heartbeat interval it
    /// observed. Heartbeats arrive about once per gossip round, so `phi_threshold =
    /// failure_timeout / gossip_interval` makes the silence tolerated about `failure_timeout`.
    pub(crate) fn chitchat_config(&self, generation: u64) -> ChitchatConfig {
        let interval = self.gossip_interval.max(Duration::from_millis(1));
        let phi_threshold = (self.failure_timeout.as_secs_f64() / interval.as_secs_f64()).max(2.0);
        ChitchatConfig {
            chitchat_id: ChitchatId::new(self.node_id.clone(), generation, self.gossip_advertise),
            cluster_id: self.cluster_id.clone(),
            gossip_interval: interval,
            listen_addr: self.gossip_listen,
            seed_nodes: self.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold,
                sampling_window_size: 1_000,
                // A longer gap is an outage, not a sample of the normal interval.
                max_interval: self.failure_timeout,
                initial_interval: interval,
                dead_node_grace_period: self.failure_timeout * DEAD_NODE_GRACE_FACTOR,
            },
            marked_for_deletion_grace_period: TOMBSTONE_GRACE,
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(member::is_usable)),
            // Every node runs this crate, so the compressed digest format is safe from day one.
            protocol_version: ProtocolVersion::V1,
        }
    }
}

/// The kernel's host name, or `unknown-host` when it cannot be read: the prefix of a generated
/// node id, and the name a node without the fabric goes by.
pub fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_maps_to_options_and_chitchat() {
        let config = FabricConfig {
            enabled: true,
            listen: "127.0.0.1:7000".parse().expect("addr"),
            secret: Some("s3cret".to_owned()),
            node_id: Some("a".to_owned()),
            ..FabricConfig::default()
        };
        let options = FabricOptions::from_config(&config, 1 << 30, 100_000).expect("valid");
        assert_eq!(options.link_advertise, Some(config.listen));
        let chitchat = options.chitchat_config(7);
        assert_eq!(chitchat.chitchat_id.generation_id, 7);
        assert_eq!(chitchat.failure_detector_config.phi_threshold, 10.0);
        assert_eq!(chitchat.cluster_id, "pegaflow");
    }

    #[test]
    fn wildcard_listen_needs_advertise_and_secret_is_required() {
        let mut config = FabricConfig {
            secret: Some("x".to_owned()),
            ..FabricConfig::default()
        };
        let err = FabricOptions::from_config(&config, 0, 1).expect_err("wildcard");
        assert!(err.to_string().contains("fabric.advertise"), "{err}");
        config.secret = None;
        let err = FabricOptions::from_config(&config, 0, 1).expect_err("no secret");
        assert!(err.to_string().contains("fabric.secret"), "{err}");
    }
}
