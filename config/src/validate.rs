//! Checks a well-typed config cannot express in its types: ranges and keys that depend on
//! each other. Each failure names the key at fault, its value and the layer that set it.

use crate::error::ConfigError;
use crate::node_config::NodeConfig;
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
        (MIN_FRAME..=pool.size).contains(&pool.max_page_size),
        "pool.max_page_size",
        format!("a size from {MIN_FRAME} to pool.size ({})", pool.size),
    )?;
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
    check(
        config.ssd.queue_size >= pool.max_page_size,
        "ssd.queue_size",
        format!(
            "a size of at least pool.max_page_size ({}) so one page can be staged",
            pool.max_page_size
        ),
    )?;

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
