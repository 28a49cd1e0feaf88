"""GPU check of the CUDA engine's IPC path (run on a GPU machine, not in CI).

Allocates a vLLM-shaped KV tensor with torch (after a pad tensor, so the KV storage starts at a
non-zero offset inside its cudaMalloc block, as in a real engine), fills it with random bytes,
exports it with ``untyped_storage()._share_cuda_()``, and runs
``pegaflow-dma-bench --ipc-selftest FILE`` in a second process. That process opens the handle,
saves blocks ``src`` into its pinned arena and loads them into blocks ``dst``. This process then
checks, layer by layer, that every ``dst`` block holds the original ``src`` bytes and that every
other block is untouched.

Usage: python3 ipc_roundtrip.py PATH/TO/pegaflow-dma-bench
"""

import os
import random
import subprocess
import sys
import tempfile

import torch

LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 24, 16, 8, 128
PAGE = BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16


def raw_ipc_handle(handle: bytes) -> bytes:
    """torch writes [version, type, 64-byte cudaIpcMemHandle_t]; older torch the raw 64 bytes."""
    if len(handle) == 64:
        return handle
    if len(handle) == 66 and handle[1] == ord("c"):
        return handle[2:]
    raise SystemExit(f"unsupported torch IPC handle ({len(handle)} bytes, type {handle[1:2]!r})")


def main() -> int:
    bench = sys.argv[1]
    torch.cuda.init()
    pad = torch.empty(2 << 20, dtype=torch.uint8, device="cuda")  # shares the segment below
    kv = torch.randint(0, 256, (LAYERS, NUM_BLOCKS, PAGE), dtype=torch.uint8, device="cuda")
    orig = kv.clone()
    torch.cuda.synchronize()
    device, handle, size, offset = kv.untyped_storage()._share_cuda_()[:4]
    rng = random.Random(7)
    ids = rng.sample(range(NUM_BLOCKS), 16)
    src, dst = ids[:8], ids[8:]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(
            f"handle={raw_ipc_handle(handle).hex()}\noffset={offset}\nbytes={size}\ndevice={device}\n"
            f"layers={LAYERS}\nnum_blocks={NUM_BLOCKS}\npage={PAGE}\n"
            f"src={','.join(map(str, src))}\ndst={','.join(map(str, dst))}\n"
        )
        spec = f.name
    print(f"exported KV tensor: {size} bytes at offset {offset} of its cudaMalloc block (device {device})")
    done = subprocess.run([bench, "--ipc-selftest", spec], check=False)
    os.unlink(spec)
    if done.returncode != 0:
        print(f"FAIL: selftest exited with {done.returncode}")
        return 1
    torch.cuda.synchronize()
    want = orig.clone()
    want[:, dst] = orig[:, src]
    for layer in range(LAYERS):
        if not torch.equal(kv[layer], want[layer]):
            bad = (kv[layer] != want[layer]).any(dim=1).nonzero().flatten().tolist()
            print(f"FAIL: layer {layer}: blocks {bad} differ")
            return 1
    del pad
    print(f"PASS: ipc round trip byte-exact over {LAYERS} layers, offset {offset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
