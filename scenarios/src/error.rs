//! The harness's errors: what a caller (the binary, a test) can act on, each naming the file,
//! field, node or engine at fault.

use std::path::PathBuf;

use pegaflow_actors::client::ClientError;

/// Why a scenario could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scenario file: {0}")]
    Parse(String),
    #[error("scenario field `{field}`: {why}")]
    Invalid { field: String, why: String },
    #[error("trace {path} line {line}: {why}")]
    Trace {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("cannot find the pegaflow-node binary (looked at {0}); build it with `cargo build -p pegaflow-actors` or set PEGAFLOW_NODE_BIN")]
    NodeBinary(String),
    #[error("node {node}: {why}")]
    Node { node: u32, why: String },
    #[error("engine {engine}: {source}")]
    Engine { engine: u32, source: ClientError },
    #[error("shared-memory region {name}: {source}")]
    Region {
        name: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl ScenarioError {
    /// Wraps an I/O error with what the harness was doing.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| ScenarioError::Io { what, source }
    }
}
