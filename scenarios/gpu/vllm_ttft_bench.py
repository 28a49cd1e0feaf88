"""Time to first token of real vLLM with PegaFlow, with vLLM's own CPU offloading, and without.

vLLM 0.26 (AsyncLLM, the engine `vllm serve` runs) serves a Llama-3.1-8B-shaped model with dummy
weights (vllm/llama-3.1-8b-shape), vLLM's prefix cache off so every hit comes from the store
under test. The same 8 prompts of 10,000 random tokens arrive open loop at 4 requests/s, one
output token each, in these passes (one engine process per line, one node for the whole run):

  no-connector       plain vLLM
  offload-cold/warm  vLLM's OffloadingConnector, `cpu_bytes_to_use` = the node's pool size
                     (40 GiB by default: the three prompt sets' KV, 31 GB, fit in either)
  cold/warm          PegaKVConnector: every lookup misses and saves; then every prompt loads
  restart            a new engine process with PegaKVConnector: every prompt loads from the node

Each engine first serves a warm-up prompt of its own twice (so the first save and load are not
measured); then `--runs` prompt sets (default 3) each go through the engine's passes. Prints
mean and p99 TTFT per pass (mean over runs, with their range), their ratios, and warm TTFT
against the PCIe floor: the KV bytes a warm request loads over the host-to-device bandwidth of
a pinned cudaMemcpy measured in the same run. Writes `results.json` and the logs to `--out`.
See README.md next to this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "vllm/llama-3.1-8b-shape/config.json"
FA3_LINE = "Using FlashAttention version 3"
ENGINES = {  # engine -> the passes it serves, in order
    "plain": ("no-connector",),
    "offload": ("offload-cold", "offload-warm"),
    "pegaflow": ("cold", "warm"),
    "pegaflow-restart": ("restart",),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-bin", default="target/release/pegaflow-node")
    parser.add_argument("--out", default="vllm-ttft-out")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--pool-size", default="40GiB", help="node pool = offloading CPU bytes")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16_384)
    parser.add_argument("--engines", default=",".join(ENGINES), help="which engines to run")
    parser.add_argument("--runs", type=int, default=3, help="prompt sets, each through every pass")
    parser.add_argument("--engine-timeout", type=float, default=200.0, help="seconds each")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    return parser.parse_args()


def size_bytes(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def make_prompts(seed: str, count: int, tokens: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(tokens)] for _ in range(count)]


# ---- one engine (a child process) -------------------------------------------------------------


def engine_args(args: argparse.Namespace, model_dir: str) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    transfer: dict[str, Any] | None = None
    if args.engine == "offload":
        transfer = {
            "kv_connector": "OffloadingConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes_to_use": size_bytes(args.pool_size)},
        }
    elif args.engine.startswith("pegaflow"):
        transfer = {
            "kv_connector": "PegaKVConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "pegaflow.connector",
            "kv_connector_extra_config": {"socket_path": args.socket},
        }
    return AsyncEngineArgs(
        model=model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=args.prompt_tokens + 64,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_logprobs=5,
        seed=0,
        kv_transfer_config=transfer,
        disable_log_stats=True,
    )


async def serve_pass(
    engine: Any, prompts: list[list[int]], rate: float, tag: str
) -> dict[str, Any]:
    """Sends `prompts` open loop at `rate`; TTFT runs from each scheduled arrival."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, detokenize=False)

    async def one(index: int, prompt: list[int], arrival: float) -> dict[str, Any]:
        await asyncio.sleep(max(arrival - time.perf_counter(), 0.0))
        async for output in engine.generate(
            {"prompt_token_ids": prompt}, params, request_id=f"{tag}-{index}"
        ):
            ttft = time.perf_counter() - arrival
            completion = output.outputs[0]
            logprobs = sorted([t, e.logprob] for t, e in completion.logprobs[0].items())
            return {
                "ttft_ms": ttft * 1e3,
                "token": completion.token_ids[0],
                "logprobs": logprobs,
                "cached_tokens": output.num_cached_tokens,
            }
        raise RuntimeError(f"request {tag}-{index} ended without output")

    start = time.perf_counter() + 0.05
    results = await asyncio.gather(
        *(one(i, prompt, start + i / rate) for i, prompt in enumerate(prompts))
    )
    ttft = [r["ttft_ms"] for r in results]
    return {
        "requests": results,
        "mean_ms": statistics.fmean(ttft),
        "p99_ms": statistics.quantiles(ttft, n=100, method="inclusive")[98],
    }


async def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    from vllm.v1.engine.async_llm import AsyncLLM

    model_dir = tempfile.mkdtemp(prefix="llama-8b-shape-")
    shutil.copyfile(CONFIG, os.path.join(model_dir, "config.json"))
    vocab = json.loads(CONFIG.read_text())["vocab_size"]
    warmup = make_prompts(f"warm-up {args.engine}", 1, args.prompt_tokens, vocab)
    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(engine_args(args, model_dir))
    result: dict[str, Any] = {"start_s": time.perf_counter() - started, "passes": {}}
    try:
        for attempt in range(2):
            await serve_pass(engine, warmup, args.rate, f"warm-up-{attempt}")
        for run in range(args.runs):
            prompts = make_prompts(f"prompts {run}", args.prompts, args.prompt_tokens, vocab)
            for name in ENGINES[args.engine]:
                await asyncio.sleep(0.5)  # the previous pass's stores (node or CPU) settle
                tag = f"{name}-{run}"
                result["passes"].setdefault(name, []).append(
                    await serve_pass(engine, prompts, args.rate, tag)
                )
    finally:
        engine.shutdown()
    return result


# ---- the run ---------------------------------------------------------------------------------


def pcie_floor_gbps() -> float:
    """Host-to-device bandwidth of one 1 GiB pinned cudaMemcpy (median of 10), in GB/s."""
    import torch

    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(12):
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del host, device
    torch.cuda.empty_cache()
    return (1 << 30) / statistics.median(times[2:]) / 1e9


def kv_bytes_per_token() -> int:
    config = json.loads(CONFIG.read_text())
    return config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 4


def run_child(
    args: argparse.Namespace, name: str, socket: str, out: Path, workdir: Path
) -> dict[str, Any]:
    result_path = workdir / f"engine-{name}.json"
    command = [sys.executable, __file__, "--engine", name, "--socket", socket,
               "--prompts", str(args.prompts), "--prompt-tokens", str(args.prompt_tokens),
               "--rate", str(args.rate), "--pool-size", args.pool_size,
               "--gpu-memory-utilization", str(args.gpu_memory_utilization),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--runs", str(args.runs),
               "--out", str(result_path)]  # fmt: skip
    log_path = out / f"engine-{name}.log"
    with log_path.open("wb") as log:
        try:
            code = subprocess.run(
                command, stdout=log, stderr=log, timeout=args.engine_timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    log_text = log_path.read_text(errors="replace")
    if code != 0 or not result_path.exists():
        print(f"engine {name} failed ({code}); end of its log:\n{log_text[-4000:]}", flush=True)
        return {"failed": str(code)}
    result = json.loads(result_path.read_text())
    result["flash_attention_3"] = FA3_LINE in log_text
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):8.1f} ({min(values):.1f}..{max(values):.1f})"


def report(results: dict[str, Any], floor_gbps: float, args: argparse.Namespace) -> None:
    """Per pass, the mean over runs of mean and p99 TTFT with their range; ratios per run."""
    passes: dict[str, list[dict[str, Any]]] = {
        name: runs
        for engine in results["engines"].values()
        for name, runs in engine.get("passes", {}).items()
    }
    hit_tokens = (args.prompt_tokens - 1) // 16 * 16
    gigabytes = hit_tokens * kv_bytes_per_token() / 1e9
    floor_ms = gigabytes / floor_gbps * 1e3
    results["pcie"] = {"h2d_gbps": floor_gbps, "warm_floor_ms": floor_ms, "hit_tokens": hit_tokens}
    print(f"pinned H2D cudaMemcpy {floor_gbps:.1f} GB/s; a warm request loads {hit_tokens} "
          f"tokens ({gigabytes:.2f} GB): floor {floor_ms:.1f} ms")  # fmt: skip
    print(f"{args.runs} runs of {args.prompts} prompts; mean over runs (min..max)")
    summary: dict[str, Any] = {}
    for name, runs in passes.items():
        cached = [r["cached_tokens"] for run in runs for r in run["requests"]]
        summary[name] = {
            "mean_ms": [run["mean_ms"] for run in runs],
            "p99_ms": [run["p99_ms"] for run in runs],
            "cached_tokens": [min(cached), max(cached)],
        }
        print(f"{name:>14}: mean {spread(summary[name]['mean_ms'])} ms  "
              f"p99 {spread(summary[name]['p99_ms'])} ms  "
              f"cached tokens/request {min(cached)}..{max(cached)}")  # fmt: skip
    results["passes"] = summary
    ratios: dict[str, list[float]] = {}
    for a, b in [("no-connector", "warm"), ("cold", "warm"), ("offload-warm", "warm"),
                 ("restart", "warm"), ("cold", "no-connector"), ("offload-cold", "no-connector"),
                 ("no-connector", "offload-warm")]:  # fmt: skip
        if a in summary and b in summary:
            for stat in ("mean_ms", "p99_ms"):
                pairs = zip(summary[a][stat], summary[b][stat], strict=True)
                ratios[f"{a} / {b} ({stat[:-3]})"] = [x / y for x, y in pairs]
    for name in ("warm", "restart", "offload-warm"):
        if name in summary:
            ratios[f"{name} / PCIe floor (mean)"] = [m / floor_ms for m in summary[name]["mean_ms"]]
    results["ratios"] = ratios
    for key, values in ratios.items():
        print(f"{key:>36}: {statistics.fmean(values):.3f} ({min(values):.3f}..{max(values):.3f})")
    base = passes.get("no-connector")
    if base is not None:

        def same(field: str) -> dict[str, bool]:
            return {
                name: all(
                    [r[field] for r in run["requests"]] == [r[field] for r in ref["requests"]]
                    for run, ref in zip(runs, base, strict=True)
                )
                for name, runs in passes.items()
            }

        results["same_token_as_no_connector"] = same("token")
        results["same_logprobs_as_no_connector"] = same("logprobs")
        print("same token as no-connector:", results["same_token_as_no_connector"])
        print("same top-5 logprobs as no-connector:", results["same_logprobs_as_no_connector"])
    fa3 = {name: engine.get("flash_attention_3") for name, engine in results["engines"].items()}
    print("FlashAttention 3:", fa3)


def main() -> int:
    args = parse_args()
    if args.engine:
        logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
        logging.getLogger("pegaflow").setLevel(logging.INFO)
        result = asyncio.run(run_engine(args))
        Path(args.out).write_text(json.dumps(result))
        return 0
    sys.path.insert(0, str(HERE))
    from ttft_bench import Node

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pfvb-", dir="/tmp"))
    node = Node(args.node_bin, "cuda", args.pool_size, str(workdir / "node.sock"),
                out / "node.log")  # fmt: skip
    results: dict[str, Any] = {
        "setup": {k: v for k, v in vars(args).items() if k not in ("engine", "socket")},
        "engines": {},
    }
    try:
        node.wait_pinned()
        floor = pcie_floor_gbps()
        print(f"pinned H2D cudaMemcpy: {floor:.1f} GB/s", flush=True)
        for name in args.engines.split(","):
            print(f"engine {name} ...", flush=True)
            engine = results["engines"][name] = run_child(args, name, node.socket, out, workdir)
            for pass_name, runs in engine.get("passes", {}).items():
                runs_text = ", ".join(f"{r['mean_ms']:.1f}/{r['p99_ms']:.1f}" for r in runs)
                print(f"  {pass_name}: start {engine['start_s']:.0f} s; per run, mean/p99 TTFT "
                      f"{runs_text} ms", flush=True)  # fmt: skip
            results["node_totals_after_" + name] = node.stats()["totals"]
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, floor, args)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if all("failed" not in e for e in results["engines"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
