//! Checks a well-typed config cannot express in its types: ranges and keys that depend on
//! each other. Each failure names the key at fault, its value and the layer that set it.

use crate::error::ConfigError;
use crate::node_config::NodeConfig;
use crate::origin::Origin;
use crate::size::Size;
use crate::sources::Sources;

/// Smallest accepted `socket.max_frame` and `pool.max_page_size`.
const MIN_FRAME: Size = Size::kib(4);
/// Largest accepted `socket.max_frame`.
const MAX_FRAME: Size = Size::gib(1);
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Plain levels `log.level` accepts; anything else must be a directive containing `=`.
const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// Returns the first rule `config` breaks.
pub(crate) fn validate(config: &NodeConfig, sources: &Sources) -> Result<(), ConfigError> {
    let check = |ok: bool, key: &str, expected: String| match ok {
        true => Ok(()),
        false => Err(sources.invalid(key, expected)),
    };

    let socket_path = config.socket.path.as_os_str().len();
    check(
        socket_path > 0 && socket_path <= MAX_SOCKET_PATH,
        "socket.path",
        format!("a non-empty path of at most {MAX_SOCKET_PATH} bytes (Unix socket limit)"),
    )?;
    check(
        (MIN_FRAME..=MAX_FRAME).contains(&config.socket.max_frame),
        "socket.max_frame",
        format!("a size from {MIN_FRAME} to {MAX_FRAME}"),
    )?;

    let pool = &config.pool;
    check(
        pool.size.bytes() > 0,
        "pool.size",
        "a size greater than 0B".to_owned(),
    )?;
    check(
        pool.max_page_size >= MIN_FRAME,
        "pool.max_page_size",
        format!("a size from {MIN_FRAME} to pool.size ({})", pool.size),
    )?;
    if pool.max_page_size > pool.size {
        return Err(blame_one_of(
            sources,
            (
                "pool.max_page_size",
                format!("a size from {MIN_FRAME} to pool.size ({})", pool.size),
            ),
            (
                "pool.size",
                format!(
                    "a size of at least pool.max_page_size ({}), the largest page it must hold",
                    pool.max_page_size
                ),
            ),
        ));
    }
    check(
        pool.page_align.bytes().is_power_of_two(),
        "pool.page_align",
        "a power of two such as \"4KiB\"".to_owned(),
    )?;

    check(
        config.ssd.dir.is_none() || config.ssd.size.bytes() > 0,
        "ssd.size",
        "a size greater than 0B because ssd.dir is set".to_owned(),
    )?;
    if config.ssd.queue_size < pool.max_page_size {
        return Err(blame_one_of(
            sources,
            (
                "ssd.queue_size",
                format!(
                    "a size of at least pool.max_page_size ({}) so one page can be staged",
                    pool.max_page_size
                ),
            ),
            (
                "pool.max_page_size",
                format!(
                    "a size of at most ssd.queue_size ({}) so one page can be staged",
                    config.ssd.queue_size
                ),
            ),
        ));
    }

    let fabric = &config.fabric;
    check(
        !fabric.enabled || fabric.secret.as_deref().is_some_and(|s| !s.is_empty()),
        "fabric.secret",
        "a non-empty shared secret because fabric.enabled is true".to_owned(),
    )?;
    for (key, millis) in [
        ("fabric.gossip_interval_ms", fabric.gossip_interval_ms),
        ("fabric.failure_timeout_ms", fabric.failure_timeout_ms),
        ("fabric.fetch_timeout_ms", fabric.fetch_timeout_ms),
        ("otlp.interval_ms", config.otlp.interval_ms),
        ("events.flush_ms", config.events.flush_ms),
    ] {
        check(
            millis > 0,
            key,
            "a number of milliseconds greater than 0".to_owned(),
        )?;
    }

    let limits = &config.limits;
    for (key, count) in [
        ("limits.max_sessions", limits.max_sessions),
        ("limits.max_regions", limits.max_regions),
        (
            "limits.max_regions_per_session",
            limits.max_regions_per_session,
        ),
        (
            "limits.max_in_flight_per_session",
            limits.max_in_flight_per_session,
        ),
    ] {
        check(count > 0, key, "a number greater than 0".to_owned())?;
    }
    check(
        limits.max_region_bytes_per_session.bytes() > 0,
        "limits.max_region_bytes_per_session",
        "a size greater than 0B".to_owned(),
    )?;

    check(
        config
            .otlp
            .endpoint
            .as_deref()
            .is_none_or(|url| url.starts_with("http://") || url.starts_with("https://")),
        "otlp.endpoint",
        "an http:// or https:// URL".to_owned(),
    )?;

    let topology = &config.topology;
    let mut nodes = topology.numa_nodes.clone();
    nodes.sort_unstable();
    nodes.dedup();
    check(
        nodes.len() == topology.numa_nodes.len(),
        "topology.numa_nodes",
        "a list of distinct NUMA node numbers".to_owned(),
    )?;
    for (i, gpu) in topology.gpus.iter().enumerate() {
        check(
            !gpu.uuid.trim().is_empty()
                && !topology.gpus[..i]
                    .iter()
                    .any(|other| other.uuid == gpu.uuid),
            "topology.gpus",
            format!(
                "GPUs with distinct, non-empty uuids (entry {i} is {:?})",
                gpu.uuid
            ),
        )?;
        check(
            nodes.is_empty() || nodes.contains(&gpu.numa_node),
            "topology.gpus",
            format!(
                "GPUs on nodes of topology.numa_nodes (entry {i} is on node {})",
                gpu.numa_node
            ),
        )?;
    }

    let events = &config.events;
    for (key, endpoint) in [
        ("events.endpoint", Some(&events.endpoint)),
        ("events.replay_endpoint", events.replay_endpoint.as_ref()),
    ] {
        check(
            endpoint.is_none_or(|e| is_tcp_endpoint(e)),
            key,
            "a ZMQ TCP endpoint tcp://HOST:PORT such as \"tcp://127.0.0.1:5557\"".to_owned(),
        )?;
    }
    check(
        events.replay_endpoint.is_none()
            || events.replay_endpoint.as_ref() != Some(&events.endpoint),
        "events.replay_endpoint",
        "an endpoint other than events.endpoint".to_owned(),
    )?;
    for (key, count) in [
        ("events.replay_buffer", events.replay_buffer),
        ("events.batch_max", events.batch_max),
    ] {
        check(count > 0, key, "a whole number greater than 0".to_owned())?;
    }

    let level = config.log.level.as_str();
    check(
        LOG_LEVELS.contains(&level) || level.contains('='),
        "log.level",
        format!(
            "one of {} or a filter directive containing '=' such as \"pegaflow=debug,info\"",
            LOG_LEVELS.join(", ")
        ),
    )
}

/// The error for two keys that disagree, blaming the one the user set: `dependent` unless only
/// `other` was set (a `--pool-size 12B` must not be reported as a bad default
/// `pool.max_page_size`). Each key comes with what it would have to be.
fn blame_one_of(
    sources: &Sources,
    dependent: (&str, String),
    other: (&str, String),
) -> ConfigError {
    let (key, expected) = match (sources.origin(dependent.0), sources.origin(other.0)) {
        (Origin::Default, other_origin) if other_origin != Origin::Default => other,
        _ => dependent,
    };
    sources.invalid(key, expected)
}

/// Whether `endpoint` is `tcp://HOST:PORT` with a non-empty host and a port number, the only
/// transport the node's ZMQ sockets are built with.
fn is_tcp_endpoint(endpoint: &str) -> bool {
    endpoint
        .strip_prefix("tcp://")
        .and_then(|rest| rest.rsplit_once(':'))
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}
