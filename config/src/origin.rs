//! Where a config value came from, so errors and `--print-config` can point at the right layer.

use std::fmt;
use std::path::PathBuf;

/// The layer that supplied a key's effective value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The TOML config file at this path.
    File(PathBuf),
    /// This environment variable, spelled as it was set.
    Env(String),
    /// This command-line flag, e.g. `--pool-size`.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Env(var) => write!(f, "env {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}
