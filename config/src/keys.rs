//! The table of every config key: the one list that env parsing, unknown-key checks, error
//! messages and `--print-config` all read, so they cannot drift apart.

/// How the text of a `PEGAFLOW_*` variable becomes a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EnvSyntax {
    /// Taken verbatim as a string (paths, sizes, addresses, names): `PEGAFLOW_FABRIC__ZONE=1`
    /// is the zone "1", not a number.
    Text,
    /// Parsed as a value: `true`, `500`, `["a:1", "b:2"]`.
    Value,
}

/// One leaf key of the configuration.
#[derive(Debug)]
pub(crate) struct Key {
    /// Dotted name, e.g. `pool.size`.
    pub(crate) name: &'static str,
    /// The CLI flag overriding it, if any.
    pub(crate) flag: Option<&'static str>,
    /// How its environment variable is read.
    pub(crate) env: EnvSyntax,
    /// What a well-typed value looks like, for error messages.
    pub(crate) expected: &'static str,
}

const SIZE: &str = "a size with a unit such as \"64GiB\" (\"4096B\" for bytes)";
const ADDR: &str = "a socket address such as \"127.0.0.1:9095\"";
const MILLIS: &str = "a whole number of milliseconds";
const TEXT: &str = "a string";
const COUNT: &str = "a whole number";
const ZMQ_TCP: &str = "a ZMQ endpoint such as \"tcp://127.0.0.1:5557\"";

const fn key(
    name: &'static str,
    flag: Option<&'static str>,
    env: EnvSyntax,
    expected: &'static str,
) -> Key {
    Key {
        name,
        flag,
        env,
        expected,
    }
}

/// Every key, in the order `render` prints them.
pub(crate) const KEYS: &[Key] = {
    use EnvSyntax::{Text, Value};
    &[
        key("socket.path", Some("--socket"), Text, "a filesystem path"),
        key("socket.max_frame", None, Text, SIZE),
        key("http.addr", Some("--http-addr"), Text, ADDR),
        key("pool.size", Some("--pool-size"), Text, SIZE),
        key("pool.max_page_size", Some("--max-page-size"), Text, SIZE),
        key("pool.page_align", None, Text, SIZE),
        key(
            "dma.engine",
            Some("--dma"),
            Text,
            "one of \"auto\", \"host\", \"cuda\"",
        ),
        key("ssd.dir", Some("--ssd-dir"), Text, "a directory path"),
        key("ssd.size", Some("--ssd-size"), Text, SIZE),
        key(
            "ssd.admission",
            Some("--ssd-admission"),
            Text,
            "one of \"always\", \"second_hit\", \"never\"",
        ),
        key("ssd.queue_size", None, Text, SIZE),
        key("fabric.enabled", None, Value, "true or false"),
        key("fabric.cluster_id", None, Text, TEXT),
        key("fabric.node_id", None, Text, TEXT),
        key("fabric.listen", None, Text, ADDR),
        key("fabric.advertise", None, Text, ADDR),
        key(
            "fabric.seeds",
            None,
            Value,
            "a list of addresses such as [\"10.0.0.2:9096\"]",
        ),
        key("fabric.zone", None, Text, TEXT),
        key("fabric.secret", None, Text, TEXT),
        key("fabric.gossip_interval_ms", None, Value, MILLIS),
        key("fabric.failure_timeout_ms", None, Value, MILLIS),
        key("fabric.fetch_timeout_ms", None, Value, MILLIS),
        key(
            "otlp.endpoint",
            Some("--otlp-endpoint"),
            Text,
            "a URL such as \"http://127.0.0.1:4317\"",
        ),
        key("otlp.interval_ms", None, Value, MILLIS),
        key("events.enabled", None, Value, "true or false"),
        key("events.endpoint", None, Text, ZMQ_TCP),
        key("events.replay_endpoint", None, Text, ZMQ_TCP),
        key("events.topic", None, Text, TEXT),
        key("events.replay_buffer", None, Value, COUNT),
        key("events.batch_max", None, Value, COUNT),
        key("events.flush_ms", None, Value, MILLIS),
        key(
            "log.level",
            Some("--log-level"),
            Text,
            "trace, debug, info, warn, error or a filter such as \"pegaflow=debug,info\"",
        ),
        key(
            "topology.numa_nodes",
            None,
            Value,
            "a list of NUMA node numbers such as [0, 1]",
        ),
        key(
            "topology.gpus",
            None,
            Value,
            "a list of tables such as [{ uuid = \"host-gpu-0\", numa_node = 0 }]",
        ),
        key("limits.max_sessions", None, Value, COUNT),
        key("limits.max_regions", None, Value, COUNT),
        key("limits.max_regions_per_session", None, Value, COUNT),
        key("limits.max_region_bytes_per_session", None, Text, SIZE),
        key("limits.max_in_flight_per_session", None, Value, COUNT),
    ]
};

/// Keys whose values are never printed, so `--print-config` output and error lines can be
/// shared without leaking credentials.
const REDACTED: &[&str] = &["fabric.secret"];

/// Whether `name`'s value must be hidden when printed.
pub(crate) fn is_redacted(name: &str) -> bool {
    REDACTED.contains(&name)
}

/// Prefix of every environment variable the config reads.
pub(crate) const ENV_PREFIX: &str = "PEGAFLOW_";

/// The key a dotted name refers to.
pub(crate) fn find(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|key| key.name == name)
}

/// The environment variable for a key: `pool.max_page_size` -> `PEGAFLOW_POOL__MAX_PAGE_SIZE`.
#[cfg(test)]
pub(crate) fn env_var(name: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        name.to_ascii_uppercase().replace('.', "__")
    )
}

/// The keys of one section, for telling a user what a typo could have meant.
pub(crate) fn keys_in(section: &str) -> Vec<&'static str> {
    KEYS.iter()
        .map(|key| key.name)
        .filter(|name| name.split('.').next() == Some(section))
        .collect()
}

/// Section names in table order, without repeats.
pub(crate) fn sections() -> Vec<&'static str> {
    let mut sections: Vec<&'static str> = Vec::new();
    for key in KEYS {
        let section = key.name.split('.').next().unwrap_or(key.name);
        if !sections.contains(&section) {
            sections.push(section);
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_config::NodeConfig;

    #[test]
    fn table_matches_the_structs() {
        let value = figment::value::Value::serialize(NodeConfig::default()).unwrap();
        let dict = value.into_dict().unwrap();
        let mut from_structs = Vec::new();
        for (section, fields) in dict {
            for field in fields.into_dict().unwrap().keys() {
                from_structs.push(format!("{section}.{field}"));
            }
        }
        let mut from_table: Vec<String> = KEYS.iter().map(|k| k.name.to_owned()).collect();
        from_structs.sort();
        from_table.sort();
        assert_eq!(from_structs, from_table);
    }

    #[test]
    fn env_var_names() {
        assert_eq!(env_var("pool.size"), "PEGAFLOW_POOL__SIZE");
        assert_eq!(
            env_var("fabric.gossip_interval_ms"),
            "PEGAFLOW_FABRIC__GOSSIP_INTERVAL_MS"
        );
    }
}
