//! Why a configuration was refused, as one line an operator can act on.

use std::path::PathBuf;

use crate::origin::Origin;

/// A configuration the node must not start with.
///
/// Every variant displays as a single line naming the key or file, the offending value, the
/// layer it came from, and what was expected; the node prints it and exits with status 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A known key has a value of the wrong shape or out of range.
    #[error("config key {key} = {value} ({origin}): expected {expected}")]
    Invalid {
        /// Dotted key, e.g. `pool.size`.
        key: String,
        /// The value as given, written as a TOML literal.
        value: String,
        /// The layer that gave it.
        origin: Origin,
        /// What would have been accepted.
        expected: String,
    },
    /// A key that does not exist, most likely a typo that must not be silently ignored.
    #[error("unknown config key {key} ({origin}): expected {expected}")]
    UnknownKey {
        /// The key as derived from the file or variable name.
        key: String,
        /// The layer that gave it.
        origin: Origin,
        /// The keys that do exist nearby.
        expected: String,
    },
    /// The config file could not be read.
    #[error("cannot read config file {} ({origin}): {error}", path.display())]
    ReadFile {
        /// The path as given.
        path: PathBuf,
        /// Whether `--config` or `PEGAFLOW_CONFIG` named it.
        origin: Origin,
        /// The I/O failure.
        error: std::io::Error,
    },
    /// The config file is not TOML.
    #[error("config file {} ({origin}) is not valid TOML: {reason}", path.display())]
    ParseFile {
        /// The path as given.
        path: PathBuf,
        /// Whether `--config` or `PEGAFLOW_CONFIG` named it.
        origin: Origin,
        /// The parser's complaint, folded onto one line.
        reason: String,
    },
}
