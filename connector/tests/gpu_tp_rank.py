"""One tensor-parallel rank for test_gpu_tp.py: a vLLM-shaped KV buffer in HBM, registered by
CUDA IPC with the UUID of its GPU, in the namespace of its rank (`tp_rank` of `tp_size`).

The rank fills its buffer with random bytes, saves some blocks, loads them back into other
block ids (its stream waiting on the node's per-layer events), and compares byte for byte;
then it checks the node served it on its GPU's transfer actor. Prints `rank R byte-exact on
GPU-...` and exits 0 on success.
"""

from __future__ import annotations

import argparse
import sys

import torch

from pegaflow import Client, Namespace, chain_keys
from pegaflow.cuda import gpu_uuid, ipc_region

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 8, 64, 16, 8, 128
SAVED_BLOCKS = [5, 9, 2, 40, 17, 33, 0, 63]
LOADED_INTO = [60, 1, 22, 3, 44, 7, 30, 11]
SEGMENT = BLOCK_SIZE * HEADS * 2 * HEAD_DIM * 2  # one block of one layer, bf16


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--tp-size", type=int, required=True)
    args = parser.parse_args()
    namespace = Namespace(model="pegaflow-gpu-tp-test", dtype="bf16", layout="vllm_lbnhc",
                          block_size=BLOCK_SIZE, num_layers=LAYERS, num_kv_heads=HEADS,
                          head_dim=HEAD_DIM, tp_rank=args.rank, tp_size=args.tp_size)  # fmt: skip
    kv = torch.empty((LAYERS, BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM), dtype=torch.bfloat16,
                     device="cuda")  # fmt: skip
    kv.view(torch.int16).random_(-(2**15), 2**15 - 1)
    torch.cuda.synchronize()
    expected = kv[:, SAVED_BLOCKS].clone()
    tokens = list(range(len(SAVED_BLOCKS) * BLOCK_SIZE))
    keys = chain_keys(namespace.digest(), tokens, BLOCK_SIZE)
    layers = [[[layer * BLOCKS * SEGMENT, SEGMENT]] for layer in range(LAYERS)]
    with Client(args.socket) as client:
        engine = client.register(namespace, region=ipc_region(kv.untyped_storage()),
                                 num_blocks=BLOCKS, segment_bytes=SEGMENT,
                                 layers=layers)  # fmt: skip
        saved = client.save(engine, keys, SAVED_BLOCKS)
        if saved.stored != len(SAVED_BLOCKS):
            print(f"rank {args.rank}: stored {saved.stored} of {len(SAVED_BLOCKS)}")
            return 1
        kv[:, LOADED_INTO] = 0
        torch.cuda.synchronize()
        events = [torch.cuda.Event.from_ipc_handle(kv.device, h) for h in engine.layer_events]
        reply = client.submit("load", engine=engine, keys=keys, block_ids=LOADED_INTO).result()
        if reply["loaded"] != len(LOADED_INTO):
            print(f"rank {args.rank}: loaded {reply['loaded']} of {len(LOADED_INTO)}")
            return 1
        stream = torch.cuda.current_stream()
        for slot in reply.get("event_slots", []):
            stream.wait_event(events[slot])  # GPU-side, as the engine's attention would
        torch.cuda.synchronize()
        if not torch.equal(kv[:, LOADED_INTO].view(torch.int16), expected.view(torch.int16)):
            print(f"rank {args.rank}: loaded bytes differ from the saved ones")
            return 1
        uuid = gpu_uuid(torch.cuda.current_device())
        stats = client.stats()
    devices = {d["device"]: d for d in stats["transfers"]}
    bare = uuid.removeprefix("GPU-").lower()
    mine = next((d for name, d in devices.items() if name.endswith(bare)), None)
    if mine is None or mine["save"]["bytes"] == 0:
        print(f"rank {args.rank}: no copies on the transfer actor of {uuid}: {sorted(devices)}")
        return 1
    print(f"rank {args.rank} byte-exact on {uuid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
