#!/usr/bin/env bash
# Installs what the optional `rdma` feature of pegaflow-fabric needs to compile: Debian's `cmake`
# (the `sideway` crate builds a stub rdma-core with it) and `libclang-dev` (bindgen loads
# libclang.so to generate the bindings; libibverbs itself is loaded at run time). Checks the
# packages themselves, not a file glob: `libclang-cpp.so` looks like libclang but is not what
# bindgen loads. Idempotent; needs root and Debian's apt (CI runs as root on Debian).
set -euo pipefail
missing=()
for pkg in cmake libclang-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "build deps: cmake and libclang-dev already installed"
    exit 0
fi
echo "build deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
