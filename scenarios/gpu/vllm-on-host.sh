#!/usr/bin/env bash
# On the GPU host, from the repository root, in every device call that carries a part made by
# stage-vllm.sh (and, in the last, the node binary):
#
#   scenarios/gpu/vllm-on-host.sh [BUDGET_S] [STEPS]    (default 570 s, "test,bench")
#
# Stashes the carried part in /tmp and stops while parts are missing. Once the tree is
# complete: unpacks it, checks that vLLM imports, runs the GPU test (test_vllm_gpu.py), then the
# benchmark in what is left of BUDGET_S. Logs go to $OUT (the device call's folder) or
# ./vllm-gpu-out. Extra benchmark flags come from $BENCH_ARGS; the node binary from
# $PEGAFLOW_NODE_BIN (default .stage/bin/pegaflow-node, a stripped release build).
set -uo pipefail

BUDGET="${1:-570}"
STEPS="${2:-test,bench}"
LOGS="${OUT:-vllm-gpu-out}"
mkdir -p "$LOGS"
NODE_BIN="$(realpath -m "${PEGAFLOW_NODE_BIN:-.stage/bin/pegaflow-node}")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PEGAFLOW_NODE_BIN="$NODE_BIN"
export VLLM_USE_FLASHINFER_SAMPLER=0 # the host has no flashinfer

scenarios/gpu/unstage-vllm.sh .stage/vllm-parts /tmp/vllm-parts /tmp/vllm-site
status=$?
[ "$status" = 3 ] && exit 0 # parts still to come: send the next call now
[ "$status" = 0 ] || exit "$status"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m compileall -q -j 0 /tmp/vllm-site/vllm >/dev/null 2>&1 # once, not per engine
export PYTHONPATH=/tmp/vllm-site
timeout 90 python3 -c "import vllm, vllm.v1.engine.async_llm; print('vllm', vllm.__version__)" ||
  exit 1

if [[ ",$STEPS," == *,test,* ]]; then
  timeout $((BUDGET / 2)) python3 -m pytest -m gpu connector/tests/test_vllm_gpu.py -q \
    -p no:cacheprovider -rA >"$LOGS/pytest.log" 2>&1
  echo "pytest exit $? after ${SECONDS} s"
  tail -n 60 "$LOGS/pytest.log"
fi
if [[ ",$STEPS," == *,bench,* ]]; then
  left=$((BUDGET - SECONDS))
  echo "benchmark: ${left} s left"
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
  PYTHONPATH="/tmp/vllm-site:$PWD/connector" timeout "$left" python3 \
    scenarios/gpu/vllm_ttft_bench.py --node-bin "$NODE_BIN" --out "$LOGS/bench" \
    ${BENCH_ARGS:-} 2>&1 | tee "$LOGS/bench.log" | grep -v -E '^(INFO|DEBUG|\(EngineCore)'
fi
