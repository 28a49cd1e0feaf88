"""Compares the SSD tier's admission policies on one skewed workload, each on a fresh node.

A request is a prompt of `--blocks` blocks picked from `--prompts` prompts with Zipf popularity
(the same seeded sequence for every policy). Like an engine, the client looks a request up, loads
the leading hits (SSD hits are promoted into memory) and saves the rest. The memory pool holds
only part of the working set, so what the tier admits decides what a later request finds.

Printed per policy: hit ratio (blocks served from memory or SSD over blocks asked), bytes
written to SSD, and spills rejected by admission. Usage:

    cargo build --release --bin pegaflow-node
    python3 scripts/bench-ssd-admission.py [--node target/release/pegaflow-node]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "connector"))

from pegaflow import Client, Namespace, chain_keys  # noqa: E402
from pegaflow.host_engine import HostKvRegion, page_bytes  # noqa: E402

NAMESPACE = Namespace(model="admission-bench", dtype="bf16", layout="vllm_lbnhc", block_size=16,
                      num_layers=8, num_kv_heads=4, head_dim=64)  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def zipf_requests(prompts: int, requests: int, skew: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** skew for rank in range(prompts)]
    return rng.choices(range(prompts), weights=weights, k=requests)


def run_policy(node_bin: Path, policy: str, args: argparse.Namespace) -> dict[str, float]:
    page = page_bytes(NAMESPACE)
    with tempfile.TemporaryDirectory() as work:
        sock, port = Path(work) / "node.sock", free_port()
        command = [str(node_bin), "--socket", str(sock), "--http-addr", f"127.0.0.1:{port}",
                   "--pool-size", str(args.memory_pages * page), "--dma", "host",
                   "--ssd-dir", f"{work}/ssd", "--ssd-size", "1GiB",
                   "--max-page-size", str(page), "--ssd-admission", policy,
                   "--log-level", "warn"]  # fmt: skip
        node = subprocess.Popen(command)
        try:
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            asked = hit = 0
            with Client(str(sock)) as client, HostKvRegion(NAMESPACE, args.blocks) as region:
                engine = region.register(client)
                block_ids = list(range(args.blocks))
                for prompt in zipf_requests(args.prompts, args.requests, args.skew, args.seed):
                    tokens = [prompt * 1_000_003 + t for t in range(args.blocks * 16)]
                    keys = chain_keys(NAMESPACE.digest(), tokens, 16)
                    hits = client.lookup(keys).hits
                    loaded = client.load(engine, keys[:hits], block_ids[:hits]) if hits else 0
                    client.save(engine, keys[loaded:], block_ids[loaded:])
                    asked, hit = asked + len(keys), hit + loaded
            url = f"http://127.0.0.1:{port}/api/stats"
            ssd = json.loads(urllib.request.urlopen(url, timeout=5).read())["ssd"]
        finally:
            node.terminate()
            node.wait(timeout=10)
    return {"hit_ratio": hit / asked, "ssd_write_mib": ssd["write_bytes"] / 2**20,
            "admission_rejected": ssd["admission_rejected"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node", type=Path, default=REPO / "target/release/pegaflow-node")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=8, help="blocks per prompt")
    parser.add_argument("--memory-pages", type=int, default=256, help="pool size in blocks")
    parser.add_argument("--skew", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"{args.requests} requests over {args.prompts} prompts x {args.blocks} blocks, Zipf "
          f"{args.skew}; memory pool {args.memory_pages} blocks; SSD 1 GiB")  # fmt: skip
    print(f"{'policy':<12}{'hit ratio':>10}{'SSD MiB written':>17}{'rejected spills':>17}")
    for policy in ("never", "second_hit", "always"):
        r = run_policy(args.node, policy, args)
        print(f"{policy:<12}{r['hit_ratio']:>10.3f}{r['ssd_write_mib']:>17.1f}"
              f"{r['admission_rejected']:>17}")  # fmt: skip


if __name__ == "__main__":
    main()
