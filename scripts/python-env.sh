#!/usr/bin/env bash
# Creates .venv with the pegaflow package (editable) and its test tools; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e './connector[test]' ruff==0.14.*
