#!/usr/bin/env bash
# Builds pegaflow-node, starts it with the default config, and runs the Python demo against it:
# save a prompt's blocks, look them up again (all hit), load them into a fresh region, compare.
# The node keeps running afterwards; its PID, socket and HTTP endpoints are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bin pegaflow-node
bash scripts/python-env.sh

socket=/tmp/pegaflow.sock
log=/tmp/pegaflow-node.log
if ! .venv/bin/python -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect('$socket')" 2>/dev/null; then
  nohup ./target/release/pegaflow-node >"$log" 2>&1 &
  echo "started pegaflow-node (pid $!), log in $log"
  for _ in $(seq 100); do
    [ -S "$socket" ] && break
    sleep 0.1
  done
fi
.venv/bin/python -m pegaflow demo --socket "$socket"
echo
echo "pegaflow-node is serving: socket $socket, metrics http://127.0.0.1:9095/metrics, stats http://127.0.0.1:9095/api/stats"
echo "stop it with: pkill -TERM -x pegaflow-node"
