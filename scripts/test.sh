#!/usr/bin/env bash
# Runs every test: Rust lints and tests (units, the node through its socket, the scenario
# harness), then the Python package's lints and tests against the freshly built node: real vLLM
# (CPU), SGLang's storage interface, Prometheus, an OTLP receiver and headless Chromium; last, the
# wheel as a user installs it (scripts/test-wheel.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 scripts/check-repo-paths.py   # a fresh clone has nothing beside it
bash scripts/install-observability-deps.sh
bash scripts/install-build-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p pegaflow-fabric --features rdma --all-targets --locked -- -D warnings
cargo build --workspace --locked
cargo test --workspace --locked

bash scripts/install-sglang.sh .venv-vllm   # the vLLM CPU set first, then SGLang on top
.venv-vllm/bin/ruff check connector scenarios/gpu
.venv-vllm/bin/ruff format --check connector scenarios/gpu
export PEGAFLOW_NODE_BIN="$PWD/target/debug/pegaflow-node"
.venv-vllm/bin/python -m pytest connector/tests -q
# The wheel (dev profile), installed into a fresh venv without Rust: its node serves the demo and
# a vLLM test.
bash scripts/test-wheel.sh
