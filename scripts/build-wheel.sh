#!/usr/bin/env bash
# Builds the pegaflow wheel (pyproject.toml): the Python package connector/pegaflow plus the
# pegaflow-node binary, which pip puts in the environment's bin/. The wheel is manylinux_2_28
# x86-64 (zig links against glibc 2.28) and serves hosts with and without CUDA alike: the node
# opens libcuda at run time, and this script fails if the binary links it.
# Needs Rust and python3; installs maturin, ziglang and auditwheel from PyPI into
# target/wheel-tools.
# Usage: scripts/build-wheel.sh [--dev]
#   default: the release profile, the wheel to hand to users
#   --dev:   cargo's dev profile, what CI builds (scripts/test-wheel.sh): the same code in half
#            the build time (4.6 against 8.6 CPU-minutes for a first build)
# Prints the wheel's path on its last line; the wheel is in target/wheels/<profile>/.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    "") profile=release ;;
    --dev) profile=dev ;;
    *) echo "usage: $0 [--dev]" >&2; exit 2 ;;
esac

tools=target/wheel-tools
[ -x "$tools/bin/python" ] || python3 -m venv "$tools"
"$tools/bin/python" -m pip install -q --disable-pip-version-check \
    'maturin==1.16.0' 'ziglang==0.17.1' 'auditwheel==6.8.2'

out=$PWD/target/wheels/$profile
rm -f "$out"/pegaflow-*.whl
# maturin finds zig through `python3 -m ziglang`, so the tools' python comes first on PATH.
PATH="$PWD/$tools/bin:$PATH" maturin build --profile "$profile" --zig \
    --compatibility manylinux_2_28 --out "$out" >&2
wheel=$(echo "$out"/pegaflow-*.whl)

unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
"$tools/bin/python" -m zipfile -e "$wheel" "$unpacked"
node=$(echo "$unpacked"/pegaflow-*.data/scripts/pegaflow-node)
[ -f "$node" ] || { echo "no pegaflow-node in $wheel" >&2; exit 1; }
needed=$(readelf -d "$node" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
echo "pegaflow-node links: $needed" >&2
case " $needed" in
    *" libcuda"*) echo "pegaflow-node links libcuda: the wheel would need CUDA" >&2; exit 1 ;;
esac
"$tools/bin/auditwheel" show "$wheel" >&2
echo "$wheel ($(du -h "$wheel" | cut -f1))" >&2
echo "$wheel"
