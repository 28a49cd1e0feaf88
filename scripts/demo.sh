#!/usr/bin/env bash
# Builds pegaflow-node, starts it with the default config, and runs the Python demo against it:
# save a prompt's blocks, look them up again (all hit), load them into a fresh region, compare.
# The node keeps running afterwards; the end of the output says how to reach it, which venv
# holds the pegaflow package, and how to stop exactly this node (its PID).
#
# PEGAFLOW_NODE_BIN runs that binary instead of building one; PEGAFLOW_SOCKET__PATH and
# PEGAFLOW_HTTP__ADDR (read by the node itself) move the socket (with the log and PID file
# beside it) and the HTTP port.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if [ -n "${PEGAFLOW_NODE_BIN:-}" ]; then
  node_bin="$(realpath "$PEGAFLOW_NODE_BIN")"
else
  cargo build --release --bin pegaflow-node
  node_bin="$root/target/release/pegaflow-node"
fi
bash scripts/python-env.sh

python="$root/.venv/bin/python"
socket="${PEGAFLOW_SOCKET__PATH:-/tmp/pegaflow.sock}"
http="${PEGAFLOW_HTTP__ADDR:-127.0.0.1:9095}"
log="$(dirname "$socket")/pegaflow-node.log"
pid_file="$(dirname "$socket")/pegaflow-node.pid"
if "$python" -c "import socket; socket.socket(socket.AF_UNIX).connect('$socket')" 2>/dev/null; then
  echo "a pegaflow-node already serves $socket; using it"
else
  nohup "$node_bin" --socket "$socket" >"$log" 2>&1 &
  echo $! >"$pid_file"
  echo "started $node_bin, log in $log"
  for _ in $(seq 100); do
    [ -S "$socket" ] && break
    sleep 0.1
  done
fi
"$python" -m pegaflow demo --socket "$socket"

echo
echo "pegaflow-node is serving: socket $socket, metrics http://$http/metrics, dashboard http://$http/dashboard"
echo "the pegaflow package is in the venv $root/.venv: activate it with"
echo "  source $root/.venv/bin/activate    (then: python -m pegaflow stats)"
# The PID this script recorded, if that process is still this binary (not a recycled PID).
pid="$(cat "$pid_file" 2>/dev/null || true)"
if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$node_bin" ]; then
  echo "pegaflow-node PID: $pid    stop it with: kill $pid"
else
  echo "this pegaflow-node was not started by this script; stop it the way it was started"
fi
