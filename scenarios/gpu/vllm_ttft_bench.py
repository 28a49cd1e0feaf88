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
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # the GPU host has no flashinfer
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
    parser.add_argument("--serve", action="store_true", help="through `vllm serve` and HTTP")
    parser.add_argument("--config", default=str(CONFIG), help="the model's config.json")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-bytes", type=int, help="vLLM's kv_cache_memory_bytes")
    parser.add_argument("--dma", default="cuda", help="the node's copy engine (host: CPU smoke)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    return parser.parse_args()


def size_bytes(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def p99(samples: list[float]) -> float:
    """Interpolated between the two largest samples, as numpy's default; one sample is its own."""
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def make_prompts(seed: str, count: int, tokens: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(tokens)] for _ in range(count)]


# ---- one engine (a child process) -------------------------------------------------------------


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's options, as `AsyncEngineArgs` fields (and `vllm serve` flags)."""
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
    options: dict[str, Any] = {
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "dtype": "bfloat16",
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "max_model_len": args.prompt_tokens + 64,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_logprobs": 5,
        "seed": 0,
    }
    if args.kv_cache_bytes:
        options["kv_cache_memory_bytes"] = args.kv_cache_bytes
    if transfer is not None:
        options["kv_transfer_config"] = transfer
    return options


class InProcessEngine:
    """vLLM's AsyncLLM in this process (its engine core in a child): what `vllm serve` runs."""

    def __init__(self, args: argparse.Namespace, model_dir: str) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        options = engine_options(args)
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(model=model_dir, disable_log_stats=True, **options)
        )

    async def first_output(self, prompt: list[int], request_id: str) -> dict[str, Any]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, detokenize=False)
        async for output in self.engine.generate(
            {"prompt_token_ids": prompt}, params, request_id=request_id
        ):
            completion = output.outputs[0]
            return {
                "token": completion.token_ids[0],
                "logprobs": sorted([t, e.logprob] for t, e in completion.logprobs[0].items()),
                "cached_tokens": output.num_cached_tokens,
            }
        raise RuntimeError(f"request {request_id} ended without output")

    def close(self) -> None:
        self.engine.shutdown()


class OpenAIServer:
    """`vllm serve` (the OpenAI-compatible server) in a child process, asked over HTTP what a
    client asks: a streamed completion of token ids; its first chunk is the first token."""

    def __init__(self, args: argparse.Namespace, model_dir: str, log: Any) -> None:
        self.port = free_port()
        self.model = model_dir
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                   model_dir, "--host", "127.0.0.1", "--port", str(self.port),
                   "--enable-prompt-tokens-details"]  # fmt: skip
        for name, value in engine_options(args).items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                command.append(flag)
            elif value is False:
                command.append("--no-" + flag[2:])
            else:
                command += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
        self.process = subprocess.Popen(command, stdout=log, stderr=log)
        self.session: Any = None

    async def start(self, timeout: float) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}")
            try:
                async with self.session.get(f"http://127.0.0.1:{self.port}/health") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not healthy within {timeout:g} s")
            await asyncio.sleep(0.5)

    async def first_output(self, prompt: list[int], request_id: str) -> dict[str, Any]:
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "logprobs": 5, "stream": True, "return_tokens_as_token_ids": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        first: dict[str, Any] | None = None
        url = f"http://127.0.0.1:{self.port}/v1/completions"
        async with self.session.post(url, json=body) as reply:
            if reply.status != 200:
                raise RuntimeError(f"{request_id}: HTTP {reply.status}: {await reply.text()}")
            async for raw in reply.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if first is None and chunk.get("choices"):
                    first = {"at": time.perf_counter(), **token_of(chunk["choices"][0])}
                usage = chunk.get("usage") or {}
                details = usage.get("prompt_tokens_details") or {}
                if first is not None and "cached_tokens" in details:
                    first["cached_tokens"] = details["cached_tokens"]
        if first is None:
            raise RuntimeError(f"request {request_id} ended without output")
        return first

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def token_of(choice: dict[str, Any]) -> dict[str, Any]:
    """The token and top logprobs of a streamed choice; with `return_tokens_as_token_ids` the
    server names tokens `token_id:N`."""
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens") or [None]
    tops = (logprobs.get("top_logprobs") or [{}])[0] or {}

    def number(name: str | None) -> int | None:
        return int(name.split(":", 1)[1]) if name and name.startswith("token_id:") else None

    return {
        "token": number(tokens[0]),
        "logprobs": sorted([number(name), value] for name, value in tops.items()),
        "cached_tokens": None,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def serve_pass(
    engine: Any, prompts: list[list[int]], rate: float, tag: str
) -> dict[str, Any]:
    """Sends `prompts` open loop at `rate`; TTFT runs from each scheduled arrival."""

    async def one(index: int, prompt: list[int], arrival: float) -> dict[str, Any]:
        await asyncio.sleep(max(arrival - time.perf_counter(), 0.0))
        output = await engine.first_output(prompt, f"{tag}-{index}")
        done = output.pop("at", None) or time.perf_counter()
        return {"ttft_ms": (done - arrival) * 1e3, **output}

    start = time.perf_counter() + 0.05
    results = await asyncio.gather(
        *(one(i, prompt, start + i / rate) for i, prompt in enumerate(prompts))
    )
    ttft = [r["ttft_ms"] for r in results]
    return {"requests": results, "mean_ms": statistics.fmean(ttft), "p99_ms": p99(ttft)}


async def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = tempfile.mkdtemp(prefix="llama-")
    shutil.copyfile(args.config, os.path.join(model_dir, "config.json"))
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    warmup = make_prompts(f"warm-up {args.engine}", 1, args.prompt_tokens, vocab)
    started = time.perf_counter()
    engine: Any
    if args.serve:
        engine = OpenAIServer(args, model_dir, sys.stdout)
        await engine.start(args.engine_timeout)
    else:
        engine = InProcessEngine(args, model_dir)
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
        engine.close()
        if args.serve:
            await engine.session.close()
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


def kv_bytes_per_token(config_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
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
               "--runs", str(args.runs), "--config", args.config,
               "--block-size", str(args.block_size), *(["--serve"] if args.serve else []),
               *(["--kv-cache-bytes", str(args.kv_cache_bytes)] if args.kv_cache_bytes else []),
               "--out", str(result_path)]  # fmt: skip
    log_path = out / f"engine-{name}.log"
    with log_path.open("wb") as log:
        # Its own process group: vLLM's engine core is a grandchild that must go with it.
        child = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        try:
            code: int | str = child.wait(args.engine_timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
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
    hit_tokens = (args.prompt_tokens - 1) // args.block_size * args.block_size
    gigabytes = hit_tokens * kv_bytes_per_token(args.config) / 1e9
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
    node = Node(args.node_bin, args.dma, args.pool_size, str(workdir / "node.sock"),
                out / "node.log")  # fmt: skip
    results: dict[str, Any] = {
        "setup": {k: v for k, v in vars(args).items() if k not in ("engine", "socket")},
        "engines": {},
    }
    try:
        node.wait_pinned()
        floor = pcie_floor_gbps() if args.dma == "cuda" else float("nan")
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
