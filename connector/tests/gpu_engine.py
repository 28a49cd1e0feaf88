"""A GPU engine process for test_gpu_node.py: a vLLM-shaped KV buffer in HBM (all layers in one
allocation, block-major `vllm_lbnhc`), registered with the node by CUDA IPC.

`save`: fills the buffer with random bytes, saves some blocks, writes them to a file, exits.
`save-events`: registers its own per-layer interprocess events, writes each layer with a GPU
copy on its stream (behind a long GPU sleep) and records that layer's event, and sends the save
with `after_events` at once, without any host synchronization: the bytes are only right if the
node's copies waited on the events GPU-side.
`save-queued`: as `save-events`, asking the node to answer once the copies are queued: the reply
must come while the stream still sleeps; then the stream waits on the save's last event and
overwrites half the saved blocks, and a load of other keys into the other half is answered while
the stream still sleeps. The node must copy the written bytes (checked by `load`) and land the
load after the save.
`load`: registers a fresh buffer, loads the blocks into other block ids, and reads each layer on
its own stream after waiting (GPU-side) on the node's event for that layer; then compares.
`load-board`: the same with a load progress board: the node answers before enqueueing, with a
ticket, and each layer is read once the board shows the node recorded its event.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from pegaflow import Client, Namespace, chain_keys
from pegaflow.client import Engine
from pegaflow.cuda import ipc_region
from pegaflow.progress import ProgressBoard

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 8, 64, 16, 8, 128
SAVED_BLOCKS = [5, 9, 2, 40, 17, 33, 0, 63]
LOADED_INTO = [60, 1, 22, 3, 44, 7, 30, 11]
SEGMENT = BLOCK_SIZE * HEADS * 2 * HEAD_DIM * 2  # one block of one layer, bf16

NAMESPACE = Namespace(model="pegaflow-gpu-test", dtype="bf16", layout="vllm_lbnhc",
                      block_size=BLOCK_SIZE, num_layers=LAYERS, num_kv_heads=HEADS,
                      head_dim=HEAD_DIM)  # fmt: skip
# GPU cycles the `save-events` stream sleeps before its writes (~0.25 s at H100 clocks): long
# after the save request reached the node.
SLEEP_CYCLES = 500_000_000


def keys(first_token: int) -> list[bytes]:
    tokens = list(range(first_token, first_token + len(SAVED_BLOCKS) * BLOCK_SIZE))
    return chain_keys(NAMESPACE.digest(), tokens, BLOCK_SIZE)


def register(client: Client, kv: torch.Tensor, engine_events: list[bytes] | None = None,
             board: ProgressBoard | None = None) -> Engine:  # fmt: skip
    layers = [[[layer * BLOCKS * SEGMENT, SEGMENT]] for layer in range(LAYERS)]
    return client.register(NAMESPACE, region=ipc_region(kv.untyped_storage()), num_blocks=BLOCKS,
                           segment_bytes=SEGMENT, layers=layers,
                           engine_events=engine_events or [],
                           load_progress=board.name if board else None)  # fmt: skip


def save(client: Client, path: str, keys: list[bytes]) -> int:
    kv = torch.empty((LAYERS, BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM), dtype=torch.bfloat16,
                     device="cuda")  # fmt: skip
    kv.view(torch.int16).random_(-(2**15), 2**15 - 1)
    torch.cuda.synchronize()
    engine = register(client, kv)
    result = client.save(engine, keys, SAVED_BLOCKS)
    torch.save(kv[:, SAVED_BLOCKS].cpu(), path)
    print(f"saved {result.stored} blocks")
    return 0 if result.stored == len(SAVED_BLOCKS) else 1


def save_after_events(client: Client, path: str, keys: list[bytes]) -> int:
    shape = (LAYERS, BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM)
    kv = torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    src = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    src.view(torch.int16).random_(-(2**15), 2**15 - 1)
    events = [torch.cuda.Event(interprocess=True) for _ in range(LAYERS)]
    handles = [bytes(event.ipc_handle()) for event in events]
    torch.cuda.synchronize()
    engine = register(client, kv, handles)
    stream = torch.cuda.Stream()
    write_behind_sleep(kv, src, events, stream)
    busy = not stream.query()
    result = client.save(engine, keys, SAVED_BLOCKS, after_events=list(range(LAYERS)))
    torch.save(src[:, SAVED_BLOCKS].cpu(), path)
    print(f"saved {result.stored} blocks after events; stream busy at send: {busy}")
    return 0 if result.stored == len(SAVED_BLOCKS) and busy else 1


def write_behind_sleep(kv: torch.Tensor, src: torch.Tensor, events: list[torch.cuda.Event],
                       stream: torch.cuda.Stream) -> None:  # fmt: skip
    """On `stream`, after a long GPU sleep, copies `src` into `kv` layer by layer, recording
    each layer's event: a save sent now must wait for them on the GPU."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        for layer in range(LAYERS):
            kv[layer].copy_(src[layer])
            events[layer].record(stream)


def save_queued(client: Client, path: str, keys_b: list[bytes]) -> int:
    shape = (LAYERS, BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM)
    kv = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    kv.view(torch.int16).random_(-(2**15), 2**15 - 1)
    src = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    src.view(torch.int16).random_(-(2**15), 2**15 - 1)
    first_a = kv[:, SAVED_BLOCKS].view(torch.int16).clone()  # bits: random bf16 holds NaNs
    events = [torch.cuda.Event(interprocess=True) for _ in range(LAYERS)]
    half = len(SAVED_BLOCKS) // 2
    loaded_into = SAVED_BLOCKS[:half]
    # Block ids as device tensors made up front: indexing with a list would copy it to the GPU
    # on the stream and block this thread until the stream drained.
    saved = torch.tensor(SAVED_BLOCKS, device="cuda")
    reused = saved[half:]
    torch.cuda.synchronize()
    engine = register(client, kv, [bytes(event.ipc_handle()) for event in events])
    node_events = [torch.cuda.Event.from_ipc_handle(kv.device, h) for h in engine.layer_events]
    keys_a = [bytes(reversed(key)) for key in keys_b]  # any other chain: only the node reads it
    if client.save(engine, keys_a, SAVED_BLOCKS).stored != len(SAVED_BLOCKS):
        print("the first save did not store every block")
        return 1
    stream = torch.cuda.Stream()
    write_behind_sleep(kv, src, events, stream)
    queued = {"after_events": list(range(LAYERS)), "answer_when_queued": True}
    reply = client.submit("save", engine=engine, keys=keys_b, block_ids=SAVED_BLOCKS, **queued)
    reply = reply.result()
    busy = not stream.query()
    slots = reply.get("event_slots", [])
    if not busy or len(slots) != LAYERS or reply["stored"] != len(SAVED_BLOCKS):
        print(f"save reply {reply} with the stream busy: {busy}")
        return 1
    with torch.cuda.stream(stream):
        stream.wait_event(node_events[slots[-1]])
        kv.index_fill_(1, reused, 0)  # the engine reuses blocks as soon as the save was queued
    load = client.submit("load", engine=engine, keys=keys_a[:half], block_ids=loaded_into).result()
    busy = not stream.query()
    if load["loaded"] != half or not busy:
        print(f"load reply {load} with the stream busy: {busy}")
        return 1
    with torch.cuda.stream(stream):
        for slot in load.get("event_slots", []):
            stream.wait_event(node_events[slot])
        after = kv.index_select(1, saved).view(torch.int16)
    stream.synchronize()
    torch.save(src[:, SAVED_BLOCKS].cpu(), path)
    if not torch.equal(after[:, :half], first_a[:, :half]) or after[:, half:].any():
        print("the load did not land after the save, or the reused blocks were not overwritten")
        return 1
    print(f"save of {len(SAVED_BLOCKS)} blocks answered while the stream was busy; "
          f"a load into half of them landed after it")  # fmt: skip
    return 0


def load(client: Client, path: str, keys: list[bytes], board: ProgressBoard | None = None) -> int:
    kv = torch.zeros((LAYERS, BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM), dtype=torch.bfloat16,
                     device="cuda")  # fmt: skip
    engine = register(client, kv, board=board)
    events = [torch.cuda.Event.from_ipc_handle(kv.device, h) for h in engine.layer_events]
    reply = client.submit("load", engine=engine, keys=keys, block_ids=LOADED_INTO).result()
    slots = reply.get("event_slots", [])
    ticket = reply.get("ticket")
    if reply["loaded"] != len(keys) or len(slots) != LAYERS or (ticket is None) != (board is None):
        print(f"load reply {reply['loaded']} blocks, event slots {slots}, ticket {ticket}")
        return 1
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        layers = []
        for layer, slot in enumerate(slots):
            if board is not None and not board.wait(slot, ticket, time.monotonic() + 10):
                print(f"the board never showed layer {layer} recorded")
                return 1
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
    print(f"loaded {LAYERS} layers x {len(keys)} blocks byte-exact, each read after its event")
    return 0


def main() -> int:
    modes = {"save": save, "save-events": save_after_events, "save-queued": save_queued,
             "load": load,
             "load-board": lambda c, p, k: load(c, p, k, ProgressBoard())}  # fmt: skip
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=list(modes))
    parser.add_argument("--socket", required=True)
    parser.add_argument("--blocks-file", required=True)
    parser.add_argument("--first-token", type=int, default=0, help="token ids the keys chain")
    args = parser.parse_args()
    with Client(args.socket) as client:
        return modes[args.mode](client, args.blocks_file, keys(args.first_token))


if __name__ == "__main__":
    sys.exit(main())
