//! The typed configuration of a `pegaflow-node` daemon, one struct per section.
//!
//! These are plain data: defaults live here, layering lives in `sources`, checks in `validate`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::size::Size;

/// Everything the node reads at start, after layering and validation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Where connectors reach the node.
    pub socket: SocketConfig,
    /// Metrics, health and dashboard endpoint.
    pub http: HttpConfig,
    /// The pinned host-memory pool that holds KV blocks.
    pub pool: PoolConfig,
    /// How bytes move between GPU and pool.
    pub dma: DmaConfig,
    /// Optional local SSD tier below the pool.
    pub ssd: SsdConfig,
    /// Cluster membership and peer fetches.
    pub fabric: FabricConfig,
    /// Optional OTLP export of metrics and traces.
    pub otlp: OtlpConfig,
    /// Optional KV events (vLLM's format) telling routers what every tier holds.
    pub events: EventsConfig,
    /// Log filtering.
    pub log: LogConfig,
    /// The host's NUMA nodes and GPUs, when not (only) what the hardware reports.
    pub topology: TopologyConfig,
    /// What one connection, and all of them together, may hold of the node.
    pub limits: LimitsConfig,
}

/// The Unix socket connectors speak the frame protocol on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    /// Socket file path; connectors must be configured with the same path.
    pub path: PathBuf,
    /// Largest frame accepted, so one bad client cannot make the node allocate without bound.
    pub max_frame: Size,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: PathBuf::from("/tmp/pegaflow.sock"),
            max_frame: Size::mib(8),
        }
    }
}

/// The HTTP listener for `/metrics`, `/healthz`, `/api/*` and `/dashboard`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; loopback by default because the API is unauthenticated.
    pub addr: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9095)),
        }
    }
}

/// The pinned host-memory pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Total pinned memory; the node's main memory cost.
    pub size: Size,
    /// Largest single stored block (a page holds every layer of one KV block).
    pub max_page_size: Size,
    /// Alignment of every page, so DMA and direct I/O see aligned buffers.
    pub page_align: Size,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: Size::gib(1),
            max_page_size: Size::mib(64),
            page_align: Size::kib(4),
        }
    }
}

/// Which copy engine moves bytes between engine GPU memory and the pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DmaEngine {
    /// CUDA when a GPU and driver are present, the host engine otherwise.
    #[default]
    Auto,
    /// Shared-memory copies done by the connector: CPU engines and CI.
    Host,
    /// CUDA copy engine; start fails if CUDA is unavailable.
    Cuda,
}

/// The DMA section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaConfig {
    /// Engine choice; `auto` suits almost everyone.
    pub engine: DmaEngine,
}

/// The local SSD tier that pages spill to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsdConfig {
    /// Directory of segment files; `None` turns the SSD tier off.
    pub dir: Option<PathBuf>,
    /// Capacity the tier may use in `dir`.
    pub size: Size,
    /// Which evicted pages are worth an SSD write.
    pub admission: SsdAdmission,
    /// Bytes of evicted pages staged for the SSD writer; spills beyond it are dropped, so a
    /// slow disk never holds back a save.
    pub queue_size: Size,
}

impl Default for SsdConfig {
    fn default() -> Self {
        SsdConfig {
            dir: None,
            size: Size(0),
            admission: SsdAdmission::SecondHit,
            queue_size: Size::mib(256),
        }
    }
}

/// Admission policy of the SSD tier: which pages evicted from memory are written to SSD.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SsdAdmission {
    /// Every evicted page.
    Always,
    /// Pages hit at least once while in memory, or saved again after an earlier eviction:
    /// a one-off prompt does not push reusable blocks off the SSD.
    #[default]
    SecondHit,
    /// None: the SSD holds only pages saved with `persist`.
    Never,
}

/// Gossip membership and peer-to-peer block fetches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FabricConfig {
    /// Off by default: a single node needs no fabric.
    pub enabled: bool,
    /// Nodes gossip only with nodes of the same cluster id.
    pub cluster_id: String,
    /// Stable name of this node; generated at start when unset.
    pub node_id: Option<String>,
    /// Gossip and link listen address.
    pub listen: SocketAddr,
    /// Address peers should dial when it differs from `listen` (NAT, 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// Addresses of nodes to join through.
    pub seeds: Vec<String>,
    /// Locality label; peers in the same zone are preferred.
    pub zone: String,
    /// Shared secret links authenticate with; required when enabled.
    pub secret: Option<String>,
    /// How often gossip rounds run.
    pub gossip_interval_ms: u64,
    /// Silence after which a peer is considered dead.
    pub failure_timeout_ms: u64,
    /// How long a load waits for peers' pages before the engine recomputes the rest.
    pub fetch_timeout_ms: u64,
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            enabled: false,
            cluster_id: "pegaflow".to_owned(),
            node_id: None,
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9096)),
            advertise: None,
            seeds: Vec::new(),
            zone: String::new(),
            secret: None,
            gossip_interval_ms: 500,
            failure_timeout_ms: 5000,
            fetch_timeout_ms: 2000,
        }
    }
}

/// OpenTelemetry export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// Collector URL; `None` turns export off.
    pub endpoint: Option<String>,
    /// Metric export period.
    pub interval_ms: u64,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: None,
            interval_ms: 10_000,
        }
    }
}

/// KV events: block stored/removed on every tier, published in vLLM's `KVEventBatch` format
/// over ZMQ, so KV-aware routers see what the node holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Off by default: publishing costs a little per stored and evicted block.
    pub enabled: bool,
    /// ZMQ PUB endpoint the node binds, `tcp://HOST:PORT`.
    pub endpoint: String,
    /// ZMQ ROUTER endpoint the node binds for replays of missed batches; `None` turns replay off.
    pub replay_endpoint: Option<String>,
    /// The first frame of every message; subscribers filter on its prefix.
    pub topic: String,
    /// Batches kept for replay.
    pub replay_buffer: u64,
    /// Blocks after which a batch is closed (one event is never split).
    pub batch_max: u64,
    /// How often the publisher collects the queued changes into batches and sends them.
    pub flush_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            enabled: false,
            endpoint: "tcp://127.0.0.1:5557".to_owned(),
            replay_endpoint: None,
            topic: String::new(),
            replay_buffer: 10_000,
            batch_max: 1024,
            flush_ms: 10,
        }
    }
}

/// Logging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A level (`info`) or a tracing filter directive (`pegaflow=debug,info`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
        }
    }
}

/// The host's shape as the node uses it: one pool per NUMA node, one transfer actor per GPU.
/// Both lists add to or replace what the hardware reports, so a host without GPUs (CI) can run
/// the per-GPU and per-NUMA code paths with host engines.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyConfig {
    /// The NUMA nodes pools are made for; empty: those online on the host.
    pub numa_nodes: Vec<u32>,
    /// GPUs of host engines, added to the GPUs the driver reports: a host engine registers with
    /// one of these UUIDs to be served by that GPU's transfer actor and its NUMA node's pool.
    pub gpus: Vec<HostGpu>,
}

/// A GPU that host engines name in `register`; it has no device behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostGpu {
    /// The name engines register with (any non-empty text, unique on the host).
    pub uuid: String,
    /// The NUMA node it sits on.
    pub numa_node: u32,
}

/// Bounds on what clients may hold, so one connection (buggy or hostile) cannot exhaust the
/// node's files, memory or threads for the others. Each refusal is an error reply naming the key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections open at once; one more is answered with an error and closed.
    pub max_sessions: u32,
    /// Engines (KV regions) registered on the node at once, over every connection.
    pub max_regions: u32,
    /// Engines one connection may register.
    pub max_regions_per_session: u32,
    /// Bytes of KV regions one connection may register, summed over its engines.
    pub max_region_bytes_per_session: Size,
    /// `save` and `load` requests of one connection running at once.
    pub max_in_flight_per_session: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: 256,
            max_regions: 1024,
            max_regions_per_session: 64,
            max_region_bytes_per_session: Size::gib(4096),
            max_in_flight_per_session: 1024,
        }
    }
}
