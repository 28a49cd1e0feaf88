"""A GPU engine process for test_gpu_node.py: a vLLM-shaped KV buffer in HBM (all layers in one
allocation, block-major `vllm_lbnhc`), registered with the node by CUDA IPC.

`save`: fills the buffer with random bytes, saves some blocks, writes them to a file, exits.
`load`: registers a fresh buffer, loads the blocks into other block ids, and reads each layer on
its own stream after waiting (GPU-side) on the node's event for that layer; then compares.
"""

from __future__ import annotations

import argparse
import sys

import torch

from pegaflow import Client, Namespace, chain_keys
from pegaflow.client import Engine
from pegaflow.cuda import ipc_region

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 8, 64, 16, 8, 128
SAVED_BLOCKS = [5, 9, 2, 40, 17, 33, 0, 63]
LOADED_INTO = [60, 1, 22, 3, 44, 7, 30, 11]
SEGMENT = BLOCK_SIZE * HEADS * 2 * HEAD_DIM * 2  # one block of one layer, bf16

NAMESPACE = Namespace(model="pegaflow-gpu-test", dtype="bf16", layout="vllm_lbnhc",
                      block_size=BLOCK_SIZE, num_layers=LAYERS, num_kv_heads=HEADS,
                      head_dim=HEAD_DIM)  # fmt: skip
KEYS = chain_keys(NAMESPACE.digest(), list(range(len(SAVED_BLOCKS) * BLOCK_SIZE)), BLOCK_SIZE)


def register(client: Client, kv: torch.Tensor) -> Engine:
    layers = [[[layer * BLOCKS * SEGMENT, SEGMENT]] for layer in range(LAYERS)]
    return client.register(NAMESPACE, region=ipc_region(kv.untyped_storage()), num_blocks=BLOCKS,
                           segment_bytes=SEGMENT, layers=layers)  # fmt: skip


def save(client: Client, path: str) -> int:
    kv = torch.empty((LAYERS, BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM), dtype=torch.bfloat16,
                     device="cuda")  # fmt: skip
    kv.view(torch.int16).random_(-(2**15), 2**15 - 1)
    torch.cuda.synchronize()
    engine = register(client, kv)
    result = client.save(engine, KEYS, SAVED_BLOCKS)
    torch.save(kv[:, SAVED_BLOCKS].cpu(), path)
    print(f"saved {result.stored} blocks")
    return 0 if result.stored == len(SAVED_BLOCKS) else 1


def load(client: Client, path: str) -> int:
    kv = torch.zeros((LAYERS, BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM), dtype=torch.bfloat16,
                     device="cuda")  # fmt: skip
    engine = register(client, kv)
    events = [torch.cuda.Event.from_ipc_handle(kv.device, h) for h in engine.layer_events]
    reply = client.submit("load", engine=engine, keys=KEYS, block_ids=LOADED_INTO).result()
    slots = reply.get("event_slots", [])
    if reply["loaded"] != len(KEYS) or len(slots) != LAYERS:
        print(f"load reply {reply['loaded']} blocks, event slots {slots}")
        return 1
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        layers = []
        for layer, slot in enumerate(slots):
            stream.wait_event(events[slot])  # GPU-side: no host thread waits between layers
            layers.append(kv[layer, LOADED_INTO].view(torch.int16).clone())
    stream.synchronize()
    expected = torch.load(path).view(torch.int16)
    wrong = [
        layer for layer in range(LAYERS) if not torch.equal(layers[layer].cpu(), expected[layer])
    ]
    untouched = [b for b in range(BLOCKS) if b not in LOADED_INTO]
    if wrong or kv[:, untouched].view(torch.int16).any():
        print(f"layers with wrong bytes: {wrong}")
        return 1
    print(f"loaded {LAYERS} layers x {len(KEYS)} blocks byte-exact, each read after its event")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--blocks-file", required=True)
    args = parser.parse_args()
    with Client(args.socket) as client:
        return (save if args.mode == "save" else load)(client, args.blocks_file)


if __name__ == "__main__":
    sys.exit(main())
