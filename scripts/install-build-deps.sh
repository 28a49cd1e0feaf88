#!/usr/bin/env bash
# Installs what the optional `rdma` feature of pegaflow-fabric needs to compile (the `sideway`
# crate builds a stub rdma-core with cmake and generates bindings with libclang; libibverbs is
# loaded at run time). Idempotent; needs root (CI runs as root on Debian).
set -euo pipefail
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "build deps: cmake and libclang already installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
