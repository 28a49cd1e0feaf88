"""Time to first token with and without PegaFlow, on a Llama-3.1-8B-shaped paged engine.

One run starts its own pegaflow-node and serves the same prompts (8 x 10,000 random tokens by
default), arriving open loop at a fixed rate, in four passes:

  no-connector  the engine alone
  cold          PegaFlow on, nothing cached: every lookup misses, every block is saved
  warm          the same prompts again: each loads all but its last block, layer by layer
  restart       a fresh engine process (new KV buffer, new weights from the same seed), same node

It prints each pass's mean and p99 TTFT (from arrival to the first token on the host), the
ratios, whether every pass produced bit-identical tokens and logits, and writes
`results.json` and `timeline.png` (one warm request, per layer: copies against compute) to
`--out`. `--smoke` runs the same code on CPU with a tiny model and the host copy engine (the CI
test). See README.md next to this file.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import gc
import hashlib
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from pegaflow import Client, ConnectionLost, page_bytes

from llama import MODELS, ModelConfig
from paged_engine import BLOCK_SIZE, PagedEngine, Request, Trace, kv_shape, model_id

PASSES = ("no-connector", "cold", "warm", "restart")
SMOKE = {"model": "tiny", "device": "cpu", "prompts": 3, "prompt_tokens": 100, "rate": 20.0,
         "pool_size": "64MiB"}  # fmt: skip
NODE_START_TIMEOUT_S = 30.0
PIN_TIMEOUT_S = 120.0
# Issue #13's targets, for the 8B model on the H100.
GOAL_WARM_MS, GOAL_SPEEDUP, GOAL_MISS_OVERHEAD = 40.0, 12.0, 0.02


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-bin", help="the pegaflow-node binary")
    parser.add_argument("--out", default="ttft-out", help="where results.json, timeline.png go")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    parser.add_argument("--seed", type=int, default=0, help="of the weights and the prompts")
    parser.add_argument("--pool-size", default="16GiB", help="the node's pool.size")
    parser.add_argument("--trace-request", type=int, default=-1,
                        help="the warm request the timeline shows (-1: the last)")  # fmt: skip
    parser.add_argument("--time-limit", type=float, default=450.0,
                        help="seconds after which the run dumps its stacks and exits")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help=f"CPU smoke run: the defaults become {SMOKE}")  # fmt: skip
    parser.add_argument("--attach", metavar="SOCKET", help=argparse.SUPPRESS)  # restart pass
    parser.add_argument("--result", help=argparse.SUPPRESS)  # where --attach writes its pass
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    if args.prompts < 2:
        parser.error("--prompts must be at least 2 (a p99 needs two samples)")
    if not args.attach and not args.node_bin:
        parser.error("--node-bin is required")
    return args


def die_with_parent() -> None:
    """Runs in a child before it starts: it gets SIGTERM when this process dies, even by the
    watchdog's exit, which skips every cleanup (so no node or engine outlives the run)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Node:
    """A pegaflow-node child process on a private socket, logging to `log_path`."""

    def __init__(self, binary: str, dma: str, pool_size: str, socket: str, log_path: Path) -> None:
        self.socket = socket
        command = [binary, "--socket", self.socket, "--http-addr", "127.0.0.1:0",
                   "--pool-size", pool_size, "--dma", dma, "--log-level", "info"]  # fmt: skip
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, preexec_fn=die_with_parent
            )
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pegaflow-node exited with {self.process.returncode} at start")
            try:
                Client(self.socket, reconnect=False, timeout=2).close()
                return
            except ConnectionLost:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pegaflow-node did not accept within {NODE_START_TIMEOUT_S:g} s"
                    ) from None
                time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        with Client(self.socket, reconnect=False, timeout=10) as client:
            return client.stats()

    def wait_pinned(self) -> None:
        """CUDA: waits until the pool is page-locked (the node pins it in the background and a
        copy into a part not yet pinned waits for it), or goes on with a warning."""
        deadline = time.monotonic() + PIN_TIMEOUT_S
        while True:
            stats = self.stats()
            pinned, total = stats["pool_pinned_bytes"], stats["pool"]["capacity_bytes"]
            if stats["dma"] != "cuda" or pinned >= total:
                return
            if time.monotonic() > deadline:
                print(f"warning: pool {pinned} of {total} bytes pinned after {PIN_TIMEOUT_S:g} s")
                return
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---- serving ------------------------------------------------------------------------------


def make_prompts(config: ModelConfig, seed: str, count: int, tokens: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(config.vocab) for _ in range(tokens)] for _ in range(count)]


def build_engine(args: argparse.Namespace, socket: str) -> PagedEngine:
    """The engine, registered with the node and warmed up (as vLLM's start-up profiling run
    does) on a prompt of its own: once without the connector, then twice with it, so that the
    first save and the first load (which opens the node's events) are not measured."""
    config = MODELS[args.model]
    blocks = -(-args.prompt_tokens // BLOCK_SIZE)
    started = time.perf_counter()
    engine = PagedEngine(config, torch.device(args.device), args.seed,
                         num_blocks=(args.prompts + 1) * blocks, socket_path=socket)  # fmt: skip
    (warm_up,) = make_prompts(config, f"warm-up-{args.seed}", 1, args.prompt_tokens)
    for index, use_connector in enumerate((False, True, True)):
        engine.serve(Request(f"warm-up-{index}", warm_up), use_connector)
    print(f"engine ready in {time.perf_counter() - started:.1f} s", flush=True)
    return engine


def run_pass(
    engine: PagedEngine, name: str, args: argparse.Namespace, trace_index: int | None = None
) -> dict[str, Any]:
    """Serves the prompts arriving open loop at `args.rate`, first come first served. TTFT runs
    from a request's arrival to its first token on the host, so it includes queueing; service
    time runs from when the engine took the request up."""
    prompts = make_prompts(MODELS[args.model], f"prompts-{args.seed}", args.prompts,
                           args.prompt_tokens)  # fmt: skip
    served, traced = [], None
    start = time.perf_counter()
    for index, tokens in enumerate(prompts):
        arrival = start + index / args.rate
        time.sleep(max(0.0, arrival - time.perf_counter()))
        trace = Trace(engine.device) if index == trace_index else None
        taken_up = time.perf_counter()
        out = engine.serve(Request(f"{name}-{index}", tokens), name != "no-connector", trace)
        served.append((arrival, taken_up, out))
        traced = trace or traced
    result: dict[str, Any] = {
        "ttft_ms": [(out.finished_at - arrival) * 1e3 for arrival, _, out in served],
        "service_ms": [(out.finished_at - taken_up) * 1e3 for _, taken_up, out in served],
        "hit_tokens": [out.hit_tokens for *_, out in served],
        "recomputed_tokens": [out.recomputed_tokens for *_, out in served],
        "tokens": [out.token for *_, out in served],
        "logits_sha256": [digest(out.logits) for *_, out in served],
    }
    if traced is not None:
        result["timeline"] = {"request": trace_index, **traced.result()}
    result.update(summarize(result))
    print(f"pass {name:<12} TTFT mean {result['mean_ms']:8.1f} ms, p99 {result['p99_ms']:8.1f} "
          f"ms", flush=True)  # fmt: skip
    return result


def digest(logits: torch.Tensor) -> str:
    return hashlib.sha256(logits.view(torch.int16).cpu().numpy().tobytes()).hexdigest()


def summarize(result: dict[str, Any]) -> dict[str, float]:
    ttft = result["ttft_ms"]
    return {
        "mean_ms": statistics.fmean(ttft),
        "p99_ms": statistics.quantiles(ttft, n=100, method="inclusive")[98],
        "service_mean_ms": statistics.fmean(result["service_ms"]),
    }


def serve_in_process(args: argparse.Namespace, node: Node) -> dict[str, dict[str, Any]]:
    """The passes that share one engine: no-connector, cold, warm."""
    # Registering opens CUDA IPC handles, which queue behind the node's background pinning of
    # the pool in the driver: measure the node as it runs once started, not while it pins.
    node.wait_pinned()
    with build_engine(args, node.socket) as engine:
        trace_index = args.trace_request % args.prompts
        return {
            "no-connector": run_pass(engine, "no-connector", args, trace_index),
            "cold": run_pass(engine, "cold", args, trace_index),
            "warm": run_pass(engine, "warm", args, trace_index),
        }


def serve_restarted(args: argparse.Namespace, node: Node, workdir: Path) -> dict[str, Any]:
    """The restart pass, in a new process of this script (`--attach`): a new engine, nothing
    cached but the node's pool."""
    result = workdir / "restart.json"
    command = [sys.executable, __file__, *sys.argv[1:], "--attach", node.socket,
               "--result", str(result)]  # fmt: skip
    try:
        status = subprocess.run(
            command, timeout=args.time_limit, check=False, preexec_fn=die_with_parent
        ).returncode
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the restarted engine ran over {args.time_limit:g} s") from None
    if status != 0:
        raise RuntimeError(f"the restarted engine process exited with {status}")
    return json.loads(result.read_text())


def attach_main(args: argparse.Namespace) -> int:
    """Child side of the restart pass: serve one pass against the running node, write it."""
    with build_engine(args, args.attach) as engine:
        result = run_pass(engine, "restart", args)
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---- results ------------------------------------------------------------------------------


def assemble(
    args: argparse.Namespace, passes: dict[str, Any], node_stats: dict[str, Any]
) -> dict[str, Any]:
    """Everything results.json holds: setup, passes, ratios, goals, checks, the timelines."""
    config = MODELS[args.model]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    page = page_bytes(kv_shape(config).namespace(model_id(config, args.seed), 0, 1, 0))
    timelines = {name: passes[name].pop("timeline") for name in ("no-connector", "cold", "warm")}
    timeline = timelines["warm"]
    hit = passes["warm"]["hit_tokens"][timeline["request"]]
    r = ratios(passes)
    setup = {k: v for k, v in vars(args).items() if k not in ("attach", "result")}
    title = (f"warm request {timeline['request']}: {hit} tokens loaded "
             f"({hit // BLOCK_SIZE * page / 1e6:.0f} MB), {config.name} on {name}")  # fmt: skip
    return {
        "setup": {**setup, "device": name, "torch": torch.__version__, "page_bytes": page},
        "passes": passes,
        "ratios": r,
        "goals": goals(args, passes, r),
        "identical": identical(passes),
        "failures": check(args, passes),
        "timeline_title": title,
        "overlap": overlap(timeline, hit // BLOCK_SIZE * page),
        "steps": {name: steps(traced) for name, traced in timelines.items()},
        "timelines": timelines,
        "node_stats": node_stats,
    }


def ratios(passes: dict[str, dict[str, Any]]) -> dict[str, float]:
    pairs = (("cold", "warm"), ("cold", "restart"), ("restart", "warm"), ("cold", "no-connector"))
    return {
        f"{a}_over_{b}_{stat}": passes[a][f"{stat}_ms"] / passes[b][f"{stat}_ms"]
        for a, b in pairs
        for stat in ("mean", "p99", "service_mean")
    }


def identical(passes: dict[str, dict[str, Any]]) -> bool:
    """Every pass gave every prompt the same token and bit-identical logits."""
    fields = ("tokens", "logits_sha256")
    return all(len({tuple(p[field]) for p in passes.values()}) == 1 for field in fields)


def check(args: argparse.Namespace, passes: dict[str, dict[str, Any]]) -> list[str]:
    """What went wrong, if anything: misses where hits were due, recomputes, differing outputs."""
    failures = []
    full_hit = (args.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    if any(passes["cold"]["hit_tokens"]):
        failures.append(f"cold pass hit {passes['cold']['hit_tokens']} tokens: cache not empty")
    for name in ("warm", "restart"):
        if any(hit != full_hit for hit in passes[name]["hit_tokens"]):
            failures.append(f"{name} pass hit {passes[name]['hit_tokens']}, expected {full_hit}")
        if any(passes[name]["recomputed_tokens"]):
            failures.append(f"{name} pass recomputed {passes[name]['recomputed_tokens']} tokens")
    if not identical(passes):
        tokens = {name: p["tokens"] for name, p in passes.items()}
        failures.append(f"passes differ in tokens or logits; tokens: {tokens}")
    return failures


def goals(
    args: argparse.Namespace, passes: dict[str, dict[str, Any]], r: dict[str, float]
) -> dict[str, tuple[bool, str]]:
    """Issue #13's targets; they are set for the 8B model on the H100 only."""
    if args.model != "llama-3.1-8b":
        return {}
    warm, speedup = passes["warm"]["mean_ms"], r["cold_over_warm_mean"]
    miss = r["cold_over_no-connector_mean"] - 1
    return {
        f"warm mean <= {GOAL_WARM_MS:g} ms": (warm <= GOAL_WARM_MS, f"{warm:.1f} ms"),
        f"cold / warm >= {GOAL_SPEEDUP:g}x": (speedup >= GOAL_SPEEDUP, f"{speedup:.2f}x"),
        f"miss overhead <= {GOAL_MISS_OVERHEAD:.0%}": (miss <= GOAL_MISS_OVERHEAD, f"{miss:+.2%}"),
    }


def steps(timeline: dict[str, Any]) -> dict[str, Any]:
    """Where the traced request's service time went, in ms from when the engine took it up:
    the lookup (host), each step's start and end as the GPU stream reached them (a step ends
    after its saves' waits), and the token (host)."""
    layers, instants = timeline["layers"], timeline["instants"]
    return {
        "request": timeline["request"],
        "lookup_done_ms": instants["lookup_done"],
        "steps_ms": list(zip(layers["step_start"], layers["step_end"], strict=True)),
        "token_ms": instants["token"],
    }


def overlap(timeline: dict[str, Any], loaded_bytes: int) -> dict[str, float]:
    """What the traced request's timeline says: when the load was sent and answered, how fast
    the copies ran, and for how many layers attention ended before the next layer's copy
    landed (computing under the copies)."""
    layers, instants = timeline["layers"], timeline["instants"]
    copy_done, attention_end = layers["copy_done"], layers["attention_end"]
    return {
        "load_submitted_ms": instants["load_submitted"],
        "load_reply_ms": instants["load_reply"],
        "last_copy_done_ms": copy_done[-1],
        "token_ms": instants["token"],
        "copy_gbps": loaded_bytes / (copy_done[-1] - instants["load_submitted"]) / 1e6,
        "layers_computed_under_next_copy": sum(
            end <= landed for end, landed in zip(attention_end, copy_done[1:], strict=False)
        ),
    }


# ---- output -------------------------------------------------------------------------------


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    passes, r, o = results["passes"], results["ratios"], results["overlap"]
    print(f"\nTTFT: {args.prompts} prompts x {args.prompt_tokens} tokens at {args.rate:g} req/s, "
          f"{args.model} (random bf16) on {results['setup']['device']}")  # fmt: skip
    print(f"{'pass':<14}{'mean ms':>10}{'p99 ms':>10}{'service ms':>12}{'hit tokens':>12}")
    for name in PASSES:
        p = passes[name]
        print(f"{name:<14}{p['mean_ms']:>10.1f}{p['p99_ms']:>10.1f}{p['service_mean_ms']:>12.1f}"
              f"{p['hit_tokens'][0]:>12}")  # fmt: skip
    for a, b in (("cold", "warm"), ("cold", "restart"), ("restart", "warm")):
        print(f"{a} / {b}: {r[f'{a}_over_{b}_mean']:.2f}x mean, {r[f'{a}_over_{b}_p99']:.2f}x p99")
    miss = {
        stat: r[f"cold_over_no-connector_{stat}"] - 1 for stat in ("mean", "p99", "service_mean")
    }
    print(f"miss overhead (cold / no-connector - 1): {miss['mean']:+.2%} mean, {miss['p99']:+.2%} "
          f"p99, {miss['service_mean']:+.2%} on service time (no queueing)")  # fmt: skip
    latency = results["node_stats"].get("requests", {})
    node = [f"{op} {latency[op]['p50_seconds'] * 1e3:.2f} ms (x{latency[op]['count']})"
            for op in ("lookup", "load", "save") if op in latency]  # fmt: skip
    print("node, p50 from request to reply:", ", ".join(node))
    print(f"timeline (warm request {results['timelines']['warm']['request']}): load sent at "
          f"{o['load_submitted_ms']:.1f} ms, answered at {o['load_reply_ms']:.1f} ms, last copy "
          f"landed at {o['last_copy_done_ms']:.1f} ms ({o['copy_gbps']:.1f} GB/s), token at "
          f"{o['token_ms']:.1f} ms; attention ended before the next layer's copy landed in "
          f"{o['layers_computed_under_next_copy']} of {MODELS[args.model].num_layers - 1} "
          f"layers")  # fmt: skip
    for name, profile in results["steps"].items():
        on_gpu = ", ".join(f"{a:.1f}-{b:.1f}" for a, b in profile["steps_ms"])
        print(f"steps ({name} request {profile['request']}): lookup done at "
              f"{profile['lookup_done_ms']:.1f} ms, steps on the GPU {on_gpu} ms, token at "
              f"{profile['token_ms']:.1f} ms")  # fmt: skip
    for name, (met, value) in results["goals"].items():
        print(f"goal {name}: {'PASS' if met else 'MISS'} ({value})")
    same = "yes" if results["identical"] else "NO"
    print(f"tokens and logits bit-identical across passes: {same}")
    for failure in results["failures"]:
        print("FAIL:", failure)


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'}")
    try:
        from timeline import render
    except ImportError as exc:  # CI's venv has no matplotlib; the JSON holds the data
        print(f"timeline chart skipped ({exc}); draw it with timeline.py from results.json")
        return
    render(results["timelines"]["warm"], out / "timeline.png", results["timeline_title"])
    print(f"wrote {out / 'timeline.png'}")


def bench_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pf-ttft-", dir="/tmp"))  # socket paths stay short
    dma = "cuda" if args.device.startswith("cuda") else "host"
    node = None
    try:
        node = Node(args.node_bin, dma, args.pool_size, str(workdir / "node.sock"),
                    out / "node.log")  # fmt: skip
        passes = serve_in_process(args, node)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the restarted engine gets the memory back
        passes["restart"] = serve_restarted(args, node, workdir)
        node_stats = node.stats()
    except Exception:
        traceback.print_exc()
        log = (out / "node.log").read_text(errors="replace")[-4000:]
        print(f"ttft_bench FAILED (traceback above)\n--- node log (tail) ---\n{log}")
        return 1
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results = assemble(args, passes, node_stats)
    report(args, results)
    write_outputs(out, results)
    return 1 if results["failures"] else 0


def main() -> int:
    args = parse_args()
    faulthandler.dump_traceback_later(args.time_limit, exit=True)  # never hang silently
    if args.device == "cpu":
        # The smoke model's ops are tiny: on a busy CI VM, waking a thread pool for each costs
        # more than the op (10x per step on a 2-core VM).
        torch.set_num_threads(1)
    return attach_main(args) if args.attach else bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
