"""`python -m pegaflow demo|stats|node`: check a node end to end, print its stats, or start the
pegaflow-node that the pegaflow wheel installed."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from importlib import metadata
from pathlib import Path

from .client import Client
from .errors import ConnectionLost, IncompatibleVersion, PegaFlowError
from .host_engine import HostKvRegion
from .keys import Namespace, chain_keys
from .stats_summary import summarize

DEMO_NAMESPACE = Namespace(
    model="pegaflow-demo/tiny-llama",
    dtype="bf16",
    layout="vllm_lbnhc",
    block_size=16,
    num_layers=4,
    num_kv_heads=2,
    head_dim=64,
)


def demo(client: Client, blocks: int) -> int:
    """Saves a fake prompt's KV, loads it into a second region, and checks every byte."""
    rng = random.Random()  # a fresh prompt each run, so the first lookup is a miss
    tokens = [rng.randrange(1 << 32) for _ in range(blocks * DEMO_NAMESPACE.block_size)]
    keys = chain_keys(DEMO_NAMESPACE.digest(), tokens, DEMO_NAMESPACE.block_size)
    block_ids = list(range(blocks))
    with (
        HostKvRegion(DEMO_NAMESPACE, blocks) as source,
        HostKvRegion(DEMO_NAMESPACE, blocks) as target,
    ):
        pages = source.fill_random(block_ids, seed=rng.randrange(1 << 32))
        saver, loader = source.register(client), target.register(client)
        cold = client.lookup(keys).hits
        start = time.perf_counter()
        saved = client.save(saver, keys, block_ids)
        save_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        warm = client.lookup(keys).hits
        lookup_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        loaded = client.load(loader, keys, block_ids)
        load_ms = (time.perf_counter() - start) * 1e3
        bad = [block for block in block_ids if target.block_bytes(block) != pages[block]]
    size_mib = blocks * source.page_bytes / (1 << 20)
    print(f"node: {client.node_info.get('node')} (dma {client.node_info.get('dma')})")
    print(f"{blocks} blocks of {source.page_bytes} bytes ({size_mib:.2f} MiB), 4 layers")
    print(f"lookup before save: {cold} hits; after: {warm} hits ({lookup_ms:.2f} ms)")
    print(
        f"save: {saved.stored} stored, {saved.present} present, {saved.dropped} dropped "
        f"({save_ms:.2f} ms)"
    )
    print(f"load: {loaded} blocks ({load_ms:.2f} ms)")
    if cold != 0 or warm != blocks or loaded != blocks or saved.dropped or bad:
        print(
            f"FAILED: expected {blocks} hits and loads, 0 cold hits, byte-exact blocks "
            f"(mismatched: {bad})",
            file=sys.stderr,
        )
        return 1
    print("verified: every loaded block is byte-exact")
    return 0


NODE_BINARY = "pegaflow-node"


def installed_node_binary() -> Path | None:
    """The pegaflow-node that was installed with this pegaflow distribution (the wheel puts it in
    the environment's scripts directory and lists it in its RECORD), or None: a source checkout
    or `pip install ./connector` carries no binary."""
    try:
        files = metadata.distribution("pegaflow").files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == NODE_BINARY:
            path = Path(file.locate())
            if path.is_file():
                return path
    return None


def exec_node(args: list[str]) -> int:
    """Replaces this process with the installed pegaflow-node, so signals reach the node."""
    binary = installed_node_binary()
    if binary is None:
        print(
            f"{NODE_BINARY} is not installed with this pegaflow package (a source checkout or "
            "`pip install ./connector` has none): install the pegaflow wheel "
            "(scripts/build-wheel.sh builds it), or run the node cargo builds "
            f"(cargo build --release --bin {NODE_BINARY})",
            file=sys.stderr,
        )
        return 2
    try:
        os.execv(binary, [str(binary), *args])
    except OSError as exc:
        print(f"cannot start {binary}: {exc}", file=sys.stderr)
        return 2
    return 0  # not reached: execv returns only by raising


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pegaflow")
    commands = parser.add_subparsers(dest="command", required=True)
    default_socket = os.environ.get("PEGAFLOW_SOCKET__PATH", "/tmp/pegaflow.sock")
    for name, help_text in [
        ("demo", "save and load a fake KV cache, check it byte for byte"),
        ("stats", "print a summary of the node's stats (--json: the whole document)"),
    ]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--socket",
            default=default_socket,
            help="node socket (default $PEGAFLOW_SOCKET__PATH or /tmp/pegaflow.sock)",
        )
        if name == "demo":
            command.add_argument("--blocks", type=int, default=32, help="blocks to save (32)")
        if name == "stats":
            command.add_argument(
                "--json", action="store_true", help="the raw stats document, buckets included"
            )
    commands.add_parser(
        "node",
        add_help=False,  # `node --help` is the node's own help
        help=f"start the installed {NODE_BINARY}; every further argument goes to it",
    )
    args, node_args = parser.parse_known_args(argv)
    if args.command == "node":
        return exec_node(node_args)
    if node_args:
        parser.error(f"unrecognized arguments: {' '.join(node_args)}")
    if args.command == "demo" and args.blocks <= 0:
        parser.error("--blocks must be positive")
    try:
        client = Client(args.socket, reconnect=False)
    except ConnectionLost as exc:
        reason = exc.__cause__ or exc
        print(
            f"cannot connect to pegaflow-node at {args.socket}: is it running? ({reason})",
            file=sys.stderr,
        )
        return 2
    except IncompatibleVersion as exc:
        print(f"pegaflow {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            if args.command == "stats":
                stats = client.stats()
                if args.json:
                    print(json.dumps(stats, indent=2, sort_keys=True))
                else:
                    print(summarize(stats))
                return 0
            return demo(client, args.blocks)
    except (PegaFlowError, TimeoutError) as exc:
        print(f"pegaflow {args.command} failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
