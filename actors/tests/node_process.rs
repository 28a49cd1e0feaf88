//! `pegaflow-node` as an operator runs it: its socket file, its start errors, its signals.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// `pegaflow-node` with a small host pool, its socket at `socket`, HTTP on a free port.
fn node_command(socket: &Path) -> Command {
    node_with_pool(socket, "16MiB")
}

/// `pegaflow-node` with a host pool of `pool_size`, its socket at `socket`.
fn node_with_pool(socket: &Path, pool_size: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pegaflow-node"));
    command
        .arg("--socket")
        .arg(socket)
        .args(["--http-addr", "127.0.0.1:0", "--pool-size", pool_size])
        .args(["--max-page-size", "1MiB", "--dma", "host"])
        .env_remove("PEGAFLOW_CONFIG");
    command
}

/// Runs a node that must refuse to start; returns its output.
fn refused(socket: &Path) -> Output {
    let output = node_command(socket).output().expect("run pegaflow-node");
    assert!(!output.status.success(), "the node started on {socket:?}");
    output
}

/// The one line of stderr a refused start prints.
fn only_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    stderr
}

/// Blocks until the node listens on `socket`, or fails if it exits first.
fn wait_until_serving(child: &mut Child, socket: &Path) {
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return;
        }
        if let Some(status) = child.try_wait().expect("poll the node") {
            panic!("pegaflow-node exited before serving: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn terminate(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a child has a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("send SIGTERM");
}

#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"the user's data").expect("write file");
    let line = only_line(&refused(&path));
    assert!(
        line.contains("socket.path") && line.contains("not a socket"),
        "{line}"
    );
    assert!(line.contains(&path.display().to_string()), "{line}");
    assert_eq!(std::fs::read(&path).expect("file kept"), b"the user's data");
}

#[test]
fn a_missing_socket_directory_is_named_and_not_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-dir");
    let line = only_line(&refused(&missing.join("node.sock")));
    assert!(
        line.contains("socket.path") && line.contains(&missing.display().to_string()),
        "{line}"
    );
    assert!(!missing.exists(), "the node created {missing:?}");
}

#[test]
fn a_live_nodes_socket_is_refused_once_on_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("node.sock");
    let mut first = node_command(&socket)
        .stderr(Stdio::null())
        .spawn()
        .expect("start the first node");
    wait_until_serving(&mut first, &socket);
    let line = only_line(&refused(&socket));
    assert!(line.contains("in use"), "{line}");
    terminate(&first);
    assert!(first.wait().expect("first node exits").success());
}

#[test]
fn sigterm_after_stderr_closed_still_removes_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("node.sock");
    let mut child = node_command(&socket)
        .args(["--log-level", "debug"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pegaflow-node");
    wait_until_serving(&mut child, &socket);
    drop(child.stderr.take());
    terminate(&child);
    let status = child.wait().expect("node exits");
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "stale socket left at {socket:?}");
}

#[test]
fn sigterm_as_soon_as_the_socket_exists_still_removes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("node.sock");
    let mut child = node_command(&socket)
        .stderr(Stdio::null())
        .spawn()
        .expect("start pegaflow-node");
    while !socket.exists() {
        if let Some(status) = child.try_wait().expect("poll the node") {
            panic!("pegaflow-node exited before binding: {status}");
        }
        std::thread::yield_now();
    }
    terminate(&child);
    let status = child.wait().expect("node exits");
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "stale socket left at {socket:?}");
}

#[test]
fn a_pool_larger_than_the_hosts_memory_is_refused_naming_pool_size() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("MemTotal in /proc/meminfo");
    let dir = tempfile::tempdir().expect("tempdir");
    let too_big = format!("{}GiB", total_kib / (1 << 20) + 1);
    let output = node_with_pool(&dir.path().join("node.sock"), &too_big)
        .output()
        .expect("run pegaflow-node");
    assert_eq!(output.status.code(), Some(2));
    let line = only_line(&output);
    assert!(
        line.contains("pool.size") && line.contains(&too_big) && line.contains("MemTotal"),
        "{line}"
    );
}
