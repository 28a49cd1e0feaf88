//! Configuration of the `pegaflow-node` daemon.
//!
//! Values are layered, each layer overriding the one before: built-in defaults, a TOML file
//! (`--config PATH`, or `PEGAFLOW_CONFIG` when no flag is given), `PEGAFLOW_*` environment
//! variables (`PEGAFLOW_POOL__SIZE=4GiB` sets `pool.size`), then command-line flags. Every
//! layer goes through the same checks, so a bad value gets the same one-line error naming the
//! key, the value, the layer it came from and what was expected, whichever layer it came from.
//! Unknown keys are errors: a typo must not silently leave a default in place.
//!
//! `docs/configuration.md` describes every key.

mod args;
mod error;
mod host_memory;
mod keys;
mod literal;
mod loaded;
mod node_config;
mod origin;
mod size;
mod sources;
mod validate;

#[cfg(test)]
mod tests;

pub use args::ConfigArgs;
pub use error::ConfigError;
pub use host_memory::check_pool_fits_memory;
pub use loaded::LoadedConfig;
pub use node_config::{
    DmaConfig, DmaEngine, EventsConfig, FabricConfig, HostGpu, HttpConfig, LimitsConfig, LogConfig,
    NodeConfig, OtlpConfig, PoolConfig, SocketConfig, SsdAdmission, SsdConfig, TopologyConfig,
};
pub use origin::Origin;
pub use size::{Size, SizeParseError};

use sources::Sources;

/// Loads the config for `args` from the process environment; what the node calls at start.
pub fn load(args: &ConfigArgs) -> Result<LoadedConfig, ConfigError> {
    let env = std::env::vars_os().map(|(name, value)| {
        (
            name.to_string_lossy().into_owned(),
            value.to_string_lossy().into_owned(),
        )
    });
    load_from(args, env)
}

/// Loads the config for `args` with `env` standing in for the process environment, so callers
/// and tests control exactly which variables are seen.
pub fn load_from(
    args: &ConfigArgs,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<LoadedConfig, ConfigError> {
    let sources = Sources::gather(args, env)?;
    let config = sources.extract()?;
    validate::validate(&config, &sources)?;
    Ok(LoadedConfig::new(config, |key| sources.origin(key)))
}
