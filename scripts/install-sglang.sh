#!/usr/bin/env bash
# Creates the venv for the SGLang backend tests: sglang 0.5.23 without its GPU serving stack
# (flashinfer, sglang-kernel, ...: CUDA-only, so SGLang cannot serve on a CPU-only host), on the
# pinned closed set of packages that importing its HiCache storage and host pools needs (PyPI
# torch 2.14.1 included), plus the pegaflow package with its test tools. Idempotent: a venv that
# already has this lock only gets ./connector reinstalled.
# Usage: scripts/install-sglang.sh [VENV]   (default .venv-sglang in the repo, or $SGLANG_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-${SGLANG_VENV:-.venv-sglang}}"
LOCK=connector/tests/sglang_support/requirements-sglang.txt
STAMP="$VENV/.pegaflow-sglang-stamp"
WANT="$(sha256sum "$LOCK" | cut -d' ' -f1)"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    # --no-deps: sglang's declared requirements are its GPU runtime; the lock lists exactly what
    # the imports need (sglang==0.5.23 among them).
    "${PIP[@]}" --no-deps -r "$LOCK"
    echo "$WANT" > "$STAMP"
fi
"${PIP[@]}" --no-deps --force-reinstall './connector'
"${PIP[@]}" './connector[test]'
"$VENV/bin/python" -W ignore -c 'import importlib.metadata as m, pegaflow.sglang.storage
print("sglang", m.version("sglang"), "ok")'
