#!/usr/bin/env bash
# Runs every test: Rust lints and tests (unit + the node through its socket), then the Python
# package's lints and tests against the freshly built node binary.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked
cargo test --workspace --locked

bash scripts/python-env.sh
.venv/bin/ruff check connector
.venv/bin/ruff format --check connector
export PEGAFLOW_NODE_BIN="$PWD/target/debug/pegaflow-node"
.venv/bin/python -m pytest connector/tests -q
