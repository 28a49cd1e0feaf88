//! The router's flags (each also read from a `PEGAFLOW_ROUTER_*` variable), parsed into checked
//! types so that a bad value stops the router at start with clap's one line naming the flag,
//! never at the first request.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use clap::Parser;

use crate::node_events::NodeEndpoints;

/// `pegaflow-router`: prefill on one engine, decode on another, the KV handed over by the node.
#[derive(Debug, Clone, Parser)]
#[command(name = "pegaflow-router", version, about, long_about = None)]
pub struct Args {
    /// A prefill engine: base URL of an OpenAI-compatible vLLM server running PegaKVConnector,
    /// as `URL` or `NODE=URL`, where NODE is the fabric node id of the pegaflow-node on the
    /// engine's host (prefix-aware choice needs it). Repeat (or separate with commas) for
    /// more; earlier ones win ties.
    #[arg(long = "prefill", env = "PEGAFLOW_ROUTER_PREFILL", value_delimiter = ',',
          required = true, value_parser = Engine::parse)]
    pub prefill: Vec<Engine>,

    /// A decode engine's base URL, as `--prefill` but without a node. An engine may be in both
    /// lists.
    #[arg(long = "decode", env = "PEGAFLOW_ROUTER_DECODE", value_delimiter = ',',
          required = true, value_parser = Engine::parse_url)]
    pub decode: Vec<Engine>,

    /// Address the router serves on.
    #[arg(long, env = "PEGAFLOW_ROUTER_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// HTTP address of the pegaflow-node the prefill engines save to (its `http.addr`); the
    /// router asks it whether a prefill's blocks are stored before decoding.
    #[arg(long = "node-http", env = "PEGAFLOW_ROUTER_NODE_HTTP", value_parser = BaseUrl::parse)]
    pub node_http: BaseUrl,

    /// A pegaflow-node's KV events, as `NODE=tcp://HOST:PORT[+tcp://HOST:PORT]`: its
    /// `events.endpoint` and, after `+`, its `events.replay_endpoint`. The prefix-aware choice
    /// then knows what NODE holds from its events, without asking `--node-http`. Repeat (or
    /// separate with commas) for more nodes.
    #[arg(long = "node-events", env = "PEGAFLOW_ROUTER_NODE_EVENTS", value_delimiter = ',',
          value_parser = NodeEndpoints::parse)]
    pub node_events: Vec<NodeEndpoints>,

    /// Overall deadline of one client request, streaming included.
    #[arg(long, env = "PEGAFLOW_ROUTER_REQUEST_TIMEOUT_S", default_value = "600",
          value_parser = seconds)]
    pub request_timeout_s: Duration,

    /// The longest one prefill attempt may take before it is retried on another prefill engine.
    #[arg(long, env = "PEGAFLOW_ROUTER_PREFILL_TIMEOUT_S", default_value = "30",
          value_parser = seconds)]
    pub prefill_timeout_s: Duration,

    /// The budget of the prefix-aware choice of a prefill engine (tokenizing the prompt and
    /// asking the node who holds it), within the prefill timeout; past it the choice is by load.
    #[arg(long, env = "PEGAFLOW_ROUTER_PREFIX_TIMEOUT_S", default_value = "0.1",
          value_parser = seconds)]
    pub prefix_timeout_s: Duration,

    /// A prefill engine whose node holds a longer prefix of the prompt wins only while it has at
    /// most this many more requests in flight than the least loaded prefill engine.
    #[arg(long, env = "PEGAFLOW_ROUTER_PREFIX_LOAD_GAP", default_value_t = 4)]
    pub prefix_load_gap: usize,

    /// How long to wait for the node to hold a prefill's blocks before decoding without them.
    #[arg(long, env = "PEGAFLOW_ROUTER_HANDOFF_TIMEOUT_S", default_value = "5",
          value_parser = seconds)]
    pub handoff_timeout_s: Duration,

    /// The longest a decode engine may stay silent: until its whole answer (non-streaming), or
    /// until each next event of its stream. Before anything was streamed it is then retried.
    #[arg(long, env = "PEGAFLOW_ROUTER_DECODE_TIMEOUT_S", default_value = "300",
          value_parser = seconds)]
    pub decode_timeout_s: Duration,

    /// Extra attempts per phase, each on another backend of that phase.
    #[arg(long, env = "PEGAFLOW_ROUTER_RETRIES", default_value_t = 2)]
    pub retries: usize,

    /// A backend that failed is chosen last for this long.
    #[arg(long, env = "PEGAFLOW_ROUTER_COOLDOWN_S", default_value = "5", value_parser = seconds)]
    pub cooldown_s: Duration,

    /// Log filter, as `RUST_LOG` (e.g. `info`, `pegaflow_router=debug`).
    #[arg(long, env = "PEGAFLOW_ROUTER_LOG", default_value = "info")]
    pub log_level: String,
}

/// A backend as its flag names it: the engine's URL and, for a prefill engine, the fabric node
/// id of the pegaflow-node on its host, which tells the router whose blocks it reuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    /// Base URL of the engine's OpenAI-compatible server.
    pub url: BaseUrl,
    /// The node id given as `NODE=URL`; None for a bare URL.
    pub node: Option<String>,
}

impl Engine {
    /// Parses `URL` or `NODE=URL`; a `=` after the URL's `://` belongs to the URL.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some((node, url)) if !node.contains("://") => {
                if node.is_empty() || node.contains(char::is_whitespace) {
                    return Err(format!(
                        "`{text}`: the node id before `=` must be non-empty, without spaces"
                    ));
                }
                Ok(Self {
                    url: BaseUrl::parse(url)?,
                    node: Some(node.to_owned()),
                })
            }
            _ => Self::parse_url(text),
        }
    }

    /// Parses a bare URL, for backends whose node the router does not use.
    pub fn parse_url(text: &str) -> Result<Self, String> {
        Ok(Self {
            url: BaseUrl::parse(text)?,
            node: None,
        })
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{node}={}", self.url),
            None => write!(f, "{}", self.url),
        }
    }
}

/// A checked `http://host:port[/prefix]` base URL; request paths are appended to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    authority: Authority,
    prefix: String,
}

impl BaseUrl {
    /// Parses a base URL: scheme `http` (no TLS client is built in), a host, no query.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text
            .parse()
            .map_err(|error| format!("`{text}` is not a URL: {error}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!(
                "`{text}` must start with http:// (https is not supported)"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{text}` has no host"))?;
        if uri.query().is_some() {
            return Err(format!("`{text}` must not have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(Self { authority, prefix })
    }

    /// The URI of `path` (starting with `/`) on this backend.
    pub fn join(&self, path: &str) -> Result<Uri, String> {
        let path_and_query: PathAndQuery = format!("{}{path}", self.prefix)
            .parse()
            .map_err(|error| format!("path `{path}` on {self}: {error}"))?;
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|error| format!("path `{path}` on {self}: {error}"))
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.prefix)
    }
}

/// A positive, finite number of seconds.
fn seconds(text: &str) -> Result<Duration, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("`{text}` must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(value).map_err(|error| format!("`{text}`: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = [
            "pegaflow-router",
            "--prefill",
            "http://127.0.0.1:8100",
            "--decode",
            "http://127.0.0.1:8200/,http://127.0.0.1:8201",
            "--node-http",
            "http://127.0.0.1:9095",
        ];
        Args::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn lists_split_on_commas_and_urls_join_paths() {
        let args = parse(&["--prefill-timeout-s", "0.5"]).expect("valid flags");
        assert_eq!(args.decode.len(), 2);
        assert_eq!(args.decode[0].to_string(), "http://127.0.0.1:8200");
        assert_eq!(
            args.decode[0]
                .url
                .join("/v1/completions")
                .expect("uri")
                .to_string(),
            "http://127.0.0.1:8200/v1/completions"
        );
        assert_eq!(args.prefill_timeout_s, Duration::from_millis(500));
        let prefixed = BaseUrl::parse("http://host:1/engine/").expect("prefix");
        assert_eq!(
            prefixed.join("/v1/completions").expect("uri").to_string(),
            "http://host:1/engine/v1/completions"
        );
    }

    #[test]
    fn a_prefill_engine_may_name_its_node() {
        let args = parse(&["--prefill", "node-b=http://127.0.0.1:8101/v=1"]).expect("valid");
        let named: Vec<(String, Option<&str>)> = args
            .prefill
            .iter()
            .map(|engine| (engine.url.to_string(), engine.node.as_deref()))
            .collect();
        assert_eq!(
            named,
            [
                ("http://127.0.0.1:8100".to_owned(), None),
                ("http://127.0.0.1:8101/v=1".to_owned(), Some("node-b")),
            ]
        );
        assert_eq!(
            args.prefill[1].to_string(),
            "node-b=http://127.0.0.1:8101/v=1"
        );
        assert_eq!(
            Engine::parse("http://h:1/a=b").expect("a URL").node,
            None,
            "a `=` after the scheme is the URL's"
        );
        for bad in ["=http://h:1", "a b=http://h:1", "n=h:1"] {
            assert!(Engine::parse(bad).is_err(), "{bad}");
        }
        let error = parse(&["--decode", "node-d=http://127.0.0.1:8202"]).expect_err("no node");
        assert!(error.to_string().contains("--decode"), "{error}");
        let args = parse(&[]).expect("defaults");
        assert_eq!(args.prefix_timeout_s, Duration::from_millis(100));
        assert_eq!(args.prefix_load_gap, 4);
    }

    #[test]
    fn a_bad_value_names_its_flag() {
        let error = parse(&["--handoff-timeout-s", "0"]).expect_err("zero timeout");
        let text = error.to_string();
        assert!(text.contains("--handoff-timeout-s"), "{text}");
        assert!(text.contains("positive number of seconds"), "{text}");
        let error = Args::try_parse_from([
            "pegaflow-router",
            "--prefill",
            "https://p:1",
            "--decode",
            "http://d:1",
            "--node-http",
            "http://n:1",
        ])
        .expect_err("https");
        assert!(error.to_string().contains("--prefill"), "{error}");
        assert!(error.to_string().contains("http://"), "{error}");
        assert!(BaseUrl::parse("127.0.0.1:8000").is_err());
        assert!(BaseUrl::parse("http://h:1/?q=1").is_err());
    }

    #[test]
    fn backends_and_the_node_are_required() {
        let error = Args::try_parse_from(["pegaflow-router", "--prefill", "http://p:1"])
            .expect_err("no decode");
        assert!(error.to_string().contains("--decode"), "{error}");
    }
}
