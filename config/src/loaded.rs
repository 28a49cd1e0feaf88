//! The result of loading: the config and, for every key, the layer that set it.

use figment::value::Value;

use crate::keys::{self, KEYS};
use crate::literal::{literal, REDACTED, UNSET};
use crate::node_config::NodeConfig;
use crate::origin::Origin;

/// A validated config that remembers where each value came from, for `--print-config` and for
/// logging the effective settings at start.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedConfig {
    /// The effective configuration.
    pub config: NodeConfig,
    origins: Vec<(&'static str, Origin)>,
}

impl LoadedConfig {
    pub(crate) fn new(config: NodeConfig, origin: impl Fn(&str) -> Origin) -> LoadedConfig {
        let origins = KEYS
            .iter()
            .map(|key| (key.name, origin(key.name)))
            .collect();
        LoadedConfig { config, origins }
    }

    /// The layer that set the dotted `key` (e.g. `"pool.size"`); `None` for unknown keys.
    pub fn origin(&self, key: &str) -> Option<&Origin> {
        self.origins
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, origin)| origin)
    }

    /// Every key with its effective value and origin, one per line:
    /// `pool.size = "4GiB"  # env PEGAFLOW_POOL__SIZE`.
    ///
    /// Unset optional keys and secrets (shown as `(redacted)`) are printed commented out, so
    /// the output is itself a valid config file; with the secret supplied again it loads back
    /// to the same values.
    pub fn render(&self) -> String {
        let values = match Value::serialize(&self.config) {
            Ok(values) => values,
            Err(error) => return format!("# config cannot be rendered: {error}\n"),
        };
        let lines: Vec<(String, &Origin)> = self
            .origins
            .iter()
            .map(|(name, origin)| {
                let line = match values.find_ref(name) {
                    Some(Value::Empty(..)) | None => format!("# {name} = {UNSET}"),
                    Some(_) if keys::is_redacted(name) => format!("# {name} = {REDACTED}"),
                    Some(value) => format!("{name} = {}", literal(value)),
                };
                (line, origin)
            })
            .collect();
        let width = lines.iter().map(|(line, _)| line.len()).max().unwrap_or(0);
        lines
            .iter()
            .map(|(line, origin)| format!("{line:width$}  # {origin}\n"))
            .collect()
    }
}
