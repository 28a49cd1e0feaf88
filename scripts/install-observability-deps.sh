#!/usr/bin/env bash
# Installs what the observability tests drive from outside the node: Debian's Prometheus server
# (scrapes /metrics in connector/tests/test_observability.py) and Debian's Chromium (loads
# /dashboard headless). Idempotent: with both binaries present it installs nothing. Needs root
# (CI runs as root on Debian).
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "observability deps: prometheus and chromium already installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# --no-install-recommends keeps Chromium's optional extras (and Prometheus' exporters) out.
apt-get install -y -q --no-install-recommends "${missing[@]}"
# The Debian package starts a Prometheus service where an init system runs; the tests start
# their own server on private ports, so a packaged one is never needed.
prometheus --version 2>&1 | head -n 1
chromium --version
