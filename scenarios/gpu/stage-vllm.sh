#!/usr/bin/env bash
# Builds, on a machine with PyPI, the parts that carry vLLM 0.26.0 to the GPU host.
#
# The GPU host has no network, but its image already holds torch 2.11+cu130, transformers,
# triton, numba, aiohttp, httpx and the rest of KINDS.md's package list. vLLM 0.26.0 is the last
# release pinned to torch 2.11; its PyPI wheel is the CUDA 13 build with its own FlashAttention.
# It needs only the wheels in vllm/requirements.txt (pinned, sha256-checked by pip).
#
#   scenarios/gpu/stage-vllm.sh [OUT_DIR] [PART_MIB]     (default .stage/vllm-parts, 40)
#
# Writes OUT_DIR/vllm-0.26.0.tar.xz.partN and OUT_DIR/SHA256SUMS (every part and the whole
# archive). Each part must fit one device call (64 MiB with the repo and the node binary).
# On the host, scenarios/gpu/unstage-vllm.sh stashes the parts and unpacks them.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$HERE/../../.stage/vllm-parts}"
PART_MIB="${2:-40}"
WORK="$(mktemp -d /tmp/stage-vllm.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
ARCHIVE=vllm-0.26.0.tar.xz

# CPython 3.12 on x86-64 glibc, as on the host (python3 there is 3.12.3).
PLATFORM=(--python-version 3.12 --implementation cp --only-binary=:all:
  --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)

python3 -m pip download --no-deps --require-hashes -r "$HERE/vllm/requirements.txt" \
  "${PLATFORM[@]}" -d "$WORK/wheels" --quiet
python3 -m pip install --no-deps --require-hashes -r "$HERE/vllm/requirements.txt" \
  "${PLATFORM[@]}" --no-index --find-links "$WORK/wheels" --no-compile \
  --target "$WORK/tree" --quiet

# What a Llama run on Hopper never loads (each is optional or looked up lazily in vLLM 0.26):
REMOVED=(
  bin                                           # console scripts with this machine's python
  vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so      # FlashAttention 2: Hopper runs FA3
  vllm/_moe_C_stable_libtorch.abi3.so           # MoE kernels (import_kernels suppresses it)
  vllm/vllm-rs                                  # the Rust frontend binary
  vllm/third_party/fmha_sm100                   # Blackwell FMHA (MiniMax M3 only)
  vllm/third_party/deep_gemm                    # DeepGEMM, FP8 GEMMs (has_deep_gemm: False)
  vllm/_flashmla_C.abi3.so                      # FlashMLA: MLA models only
  vllm/_flashmla_extension_C.abi3.so
  vllm/_qutlass_C.abi3.so                       # FP4 quantisation kernels (optional import)
)
for path in "${REMOVED[@]}"; do
  [ -e "$WORK/tree/$path" ] || { echo "stage-vllm: $path not in the tree" >&2; exit 1; }
  rm -rf "${WORK:?}/tree/$path"
done

mkdir -p "$OUT"
rm -f "$OUT/$ARCHIVE".part* "$OUT/SHA256SUMS"
tar -C "$WORK/tree" --sort=name --owner=0 --group=0 -cf - . | xz -9 -T0 > "$WORK/$ARCHIVE"
split -b "${PART_MIB}M" -d -a 1 --numeric-suffixes=1 "$WORK/$ARCHIVE" "$OUT/$ARCHIVE.part"
(cd "$WORK" && sha256sum "$ARCHIVE") > "$OUT/SHA256SUMS"
(cd "$OUT" && sha256sum "$ARCHIVE".part*) >> "$OUT/SHA256SUMS"
du -sh "$WORK/tree" "$WORK/$ARCHIVE"
ls -l "$OUT"
