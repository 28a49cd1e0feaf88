//! Command-line flags of `pegaflow-node` that select and override configuration.
//!
//! Override flags are plain strings: they become the top layer and are validated with the same
//! rules, and the same error messages, as the file and environment layers below them.

use std::path::PathBuf;

/// Config flags, flattened into the node's own clap parser.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML config file; when absent, $PEGAFLOW_CONFIG names it, and without either only
    /// defaults, environment and flags apply.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Override socket.path.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<String>,
    /// Override http.addr.
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<String>,
    /// Override pool.size, e.g. 64GiB.
    #[arg(long, value_name = "SIZE")]
    pub pool_size: Option<String>,
    /// Override pool.max_page_size, e.g. 64MiB.
    #[arg(long, value_name = "SIZE")]
    pub max_page_size: Option<String>,
    /// Override dma.engine: auto, host or cuda.
    #[arg(long, value_name = "ENGINE")]
    pub dma: Option<String>,
    /// Override ssd.dir (turns the SSD tier on).
    #[arg(long, value_name = "PATH")]
    pub ssd_dir: Option<String>,
    /// Override ssd.size, e.g. 500GiB.
    #[arg(long, value_name = "SIZE")]
    pub ssd_size: Option<String>,
    /// Override ssd.admission: always, second_hit or never.
    #[arg(long, value_name = "POLICY")]
    pub ssd_admission: Option<String>,
    /// Override otlp.endpoint (turns OTLP export on).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Override log.level, e.g. debug or "pegaflow=debug,info".
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl ConfigArgs {
    /// The flags actually given, as (config key, value).
    pub(crate) fn overrides(&self) -> Vec<(&'static str, &str)> {
        [
            ("socket.path", &self.socket),
            ("http.addr", &self.http_addr),
            ("pool.size", &self.pool_size),
            ("pool.max_page_size", &self.max_page_size),
            ("dma.engine", &self.dma),
            ("ssd.dir", &self.ssd_dir),
            ("ssd.size", &self.ssd_size),
            ("ssd.admission", &self.ssd_admission),
            ("otlp.endpoint", &self.otlp_endpoint),
            ("log.level", &self.log_level),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.as_deref().map(|value| (key, value)))
        .collect()
    }
}
