"""Helpers shared by the integration tests and the engine subprocesses they start.

Run as a script (with the connector on PYTHONPATH) it is an engine process that the tests kill at
chosen moments; the tests regenerate the same keys and pages from the same seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pegaflow import Client, HostKvRegion, Namespace, chain_keys
from pegaflow.protocol import HEADER, encode_frame, read_frame

T = TypeVar("T")


def make_namespace(
    layout: str = "vllm_lbnhc",
    dtype: str = "bf16",
    block_size: int = 16,
    *,
    model: str = "test/model",
    num_layers: int = 3,
    heads: int = 2,
    head_dim: int = 64,
) -> Namespace:
    return Namespace(
        model, dtype, layout, block_size, num_layers, 1 if layout == "mla" else heads, head_dim
    )


# Large pages for the kill tests: 4 layers of 64 KiB, so in-flight copies take a while.
CHURN_NAMESPACE = make_namespace(
    dtype="fp32", block_size=32, model="test/churn", num_layers=4, heads=4
)
CHURN_BLOCKS = 8  # blocks per prompt
CHURN_PROMPTS = 8  # prompts in flight at once


def prompt_keys(namespace: Namespace, seed: int, blocks: int) -> list[bytes]:
    """Keys of a reproducible random prompt of `blocks` full blocks."""
    rng = random.Random(f"tokens-{seed}")
    tokens = [rng.randrange(1 << 32) for _ in range(blocks * namespace.block_size)]
    return chain_keys(namespace.digest(), tokens, namespace.block_size)


def prompt_pages(page_bytes: int, seed: int, blocks: int) -> list[bytes]:
    """The reproducible KV pages that belong to `prompt_keys(..., seed, blocks)`."""
    rng = random.Random(f"pages-{seed}")
    return [rng.randbytes(page_bytes) for _ in range(blocks)]


def write_pages(region: HostKvRegion, block_ids: Sequence[int], pages: Sequence[bytes]) -> None:
    for block_id, page in zip(block_ids, pages, strict=True):
        region.write_block(block_id, page)


def assert_pages_equal(actual: Sequence[bytes], expected: Sequence[bytes], what: str) -> None:
    """Exact comparison that reports the first differing block and byte, not megabytes of diff."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} pages, expected {len(expected)}"
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        if got != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None
            )
            raise AssertionError(
                f"{what}: page {index} differs (lengths {len(got)}/{len(want)}, first differing "
                f"byte {first})"
            )


def wait_for(probe: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str) -> T:
    """Polls `probe` until `done` holds; fails naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s; last value: {value!r}")
        time.sleep(0.05)


def http_get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET on the node's HTTP server."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body = response.read().decode()
        return response.status, response.headers.get("Content-Type", ""), body


class RawConnection:
    """A socket speaking frames directly, for requests the client library would refuse."""

    def __init__(self, path: str | Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.stream = self.sock.makefile("rb")
        self._next_id = 0

    def close(self) -> None:
        self.stream.close()
        self.sock.close()

    def request(self, op: str | None, **fields: Any) -> dict[str, Any]:
        """Sends `{v: 1, id, op, **fields}` (fields may override or, as None, drop v/id/op)."""
        self._next_id += 1
        message = {"v": 1, "id": self._next_id, "op": op, **fields}
        return self.exchange(encode_frame({k: v for k, v in message.items() if v is not None}))

    def exchange(self, frame: bytes) -> dict[str, Any]:
        self.sock.sendall(frame)
        reply = read_frame(self.stream)
        assert reply is not None, "node closed the connection instead of replying"
        return reply

    def send_payload(self, payload: bytes) -> dict[str, Any]:
        return self.exchange(HEADER.pack(len(payload)) + payload)

    def at_eof(self) -> bool:
        try:
            return self.stream.read(1) == b""
        except ConnectionResetError:  # closed with our bytes unread: closed all the same
            return True


def _engine_main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["save", "churn-save", "churn-load", "churn-lease"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--hang", action="store_true", help="after the save, wait to be killed")
    args = parser.parse_args()
    client = Client(args.socket, timeout=60)
    if args.mode == "save":
        namespace = make_namespace(model="test/outlives")
        region = HostKvRegion(namespace, args.blocks)
        block_ids = list(range(args.blocks))
        write_pages(region, block_ids, prompt_pages(region.page_bytes, args.seed, args.blocks))
        result = client.save(
            region.register(client), prompt_keys(namespace, args.seed, args.blocks), block_ids
        )
        _report(stored=result.stored, dropped=result.dropped)
        if args.hang:
            time.sleep(3600)
        return
    _churn(client, args.mode, args.seed)


def _churn(client: Client, mode: str, seed: int) -> None:
    """Pipelines CHURN_PROMPTS saves or loads of large pages at a time until killed.

    Each batch is reported once it is on the wire, so the test can SIGKILL the process with the
    requests in flight. Prompt `seed * 10_000 + i` is written to its blocks only after the
    previous user of those blocks finished, so whatever the node keeps must equal its pages.
    """
    region = HostKvRegion(CHURN_NAMESPACE, CHURN_BLOCKS * CHURN_PROMPTS)
    engine = region.register(client)
    slots = [list(range(s * CHURN_BLOCKS, (s + 1) * CHURN_BLOCKS)) for s in range(CHURN_PROMPTS)]

    def keys(prompt: int) -> list[bytes]:
        return prompt_keys(CHURN_NAMESPACE, seed * 10_000 + prompt, CHURN_BLOCKS)

    def run_batch(op: str, first: int) -> None:
        if op == "save":
            for slot, block_ids in enumerate(slots):
                pages = prompt_pages(region.page_bytes, seed * 10_000 + first + slot, CHURN_BLOCKS)
                write_pages(region, block_ids, pages)
        futures = [
            client.submit(op, engine=engine, keys=keys(first + slot), block_ids=block_ids)
            for slot, block_ids in enumerate(slots)
        ]
        _report(submitted=op, prompts=first + CHURN_PROMPTS)
        for future in futures:
            future.result(60)

    run_batch("save", 0)
    if mode == "churn-lease":
        leases = [client.lookup(keys(slot), lease=True) for slot in range(CHURN_PROMPTS)]
        assert all(lease.hits == CHURN_BLOCKS for lease in leases)
    _report(ready=True)
    sys.stdin.readline()  # the test says when to go on
    for batch in range(1, 1 << 30):
        if mode == "churn-save":
            run_batch("save", batch * CHURN_PROMPTS)
        else:
            run_batch("load", 0)


def _report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    _engine_main()
