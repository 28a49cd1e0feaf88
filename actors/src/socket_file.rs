//! The connector socket's file: claimed at start, never at the cost of another file.
//!
//! `socket.path` may name a stale socket left by a node that died (replaced) or a live node's
//! socket (refused). Anything else at that path is the user's data and is never touched, and
//! the directory must already exist: the node creates no directories it would leave behind.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why the node cannot listen on `socket.path`.
#[derive(Debug, thiserror::Error)]
pub enum SocketFileError {
    #[error("socket path {0} is in use by a running pegaflow-node (or another program); stop it or choose another socket.path")]
    InUse(PathBuf),
    #[error("socket.path {0} exists and is not a socket; refusing to replace it (move it away or choose another socket.path)")]
    NotASocket(PathBuf),
    #[error("socket.path {path}: directory {dir} does not exist; create it or choose another socket.path")]
    MissingDirectory { path: PathBuf, dir: PathBuf },
    #[error("cannot listen on socket.path {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the connector socket at `path` with mode 0660, replacing a stale socket file but
/// never a live node's socket or a file of any other type.
pub fn bind(path: &Path) -> Result<UnixListener, SocketFileError> {
    let io_error = |source| SocketFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketFileError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketFileError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io_error)?;
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let dir = path
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(SocketFileError::MissingDirectory {
                    path: path.to_path_buf(),
                    dir: dir.to_path_buf(),
                });
            }
        }
        Err(error) => return Err(io_error(error)),
    }
    let listener = UnixListener::bind(path).map_err(io_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io_error)?;
    Ok(listener)
}
