"""The paged engine of scenarios/gpu (the GPU TTFT benchmark's stand-in for vLLM), on CPU, through
the vLLM connector's own halves and the real node's host copy engine.

A warm pass, and a freshly started engine, must load every block a hit can cover and produce
tokens and logits bit-identical to the cold pass and to the engine without the connector; a load
that fails must be recomputed, with the same result. The benchmark's `--smoke` run exercises
the script itself, its restarted engine process included.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CONNECTOR_DIR, NODE_BIN, REPO_ROOT, NodeProcess

try:
    import torch
    from llama import MODELS
    from paged_engine import (
        BLOCK_SIZE,
        PagedEngine,
        Request,
        Served,
        _CachedRequests,
        _NewRequest,
        _SchedulerOutput,
    )
except ImportError as exc:  # .venv has no torch; CI runs this in .venv-vllm, which has
    pytest.skip(f"needs torch ({exc})", allow_module_level=True)

BENCH = REPO_ROOT / "scenarios/gpu/ttft_bench.py"
_rng = random.Random(13)
# 6, 2 and 0 blocks a hit can cover: the last prompt token is always computed.
PROMPTS = [[_rng.randrange(MODELS["tiny"].vocab) for _ in range(n)] for n in (100, 37, 16)]
HITS = [(len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE for prompt in PROMPTS]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's ops are too small for a thread pool; on a busy 2-core VM waking it
    costs ten times the step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_engine(node: NodeProcess) -> PagedEngine:
    return PagedEngine(MODELS["tiny"], torch.device("cpu"), seed=0, num_blocks=32,
                       socket_path=str(node.socket))  # fmt: skip


def serve_all(engine: PagedEngine, name: str, use_connector: bool = True) -> list[Served]:
    return [engine.serve(Request(f"{name}-{i}", p), use_connector) for i, p in enumerate(PROMPTS)]


def assert_same(actual: list[Served], expected: list[Served], what: str) -> None:
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got.token == want.token, f"{what}: prompt {index} token {got.token} != {want.token}"
        assert torch.equal(got.logits, want.logits), f"{what}: prompt {index} logits differ"


@pytest.mark.integration
def test_warm_and_restarted_engines_load_the_prefix_and_match_cold_bit_for_bit(
    start_node: Callable[..., NodeProcess],
) -> None:
    node = start_node()
    with make_engine(node) as engine:
        plain = serve_all(engine, "plain", use_connector=False)
        cold = serve_all(engine, "cold")
        warm = serve_all(engine, "warm")
        assert engine.connector is not None
        assert engine.connector.worker.stats.loaded_blocks == sum(HITS) // BLOCK_SIZE
        assert node.stats()["pool"]["leased_bytes"] == 0  # every lookup's lease released
    with make_engine(node) as restarted:  # a new KV buffer: only the node holds the prefix
        again = serve_all(restarted, "again")
    assert [s.hit_tokens for s in cold] == [0, 0, 0]
    assert [s.hit_tokens for s in warm] == HITS == [s.hit_tokens for s in again]
    assert not any(s.recomputed_tokens for s in warm + again)
    assert node.stats()["totals"]["loaded_blocks"] == 2 * sum(HITS) // BLOCK_SIZE
    assert_same(cold, plain, "cold vs no connector")
    assert_same(warm, cold, "warm vs cold")
    assert_same(again, cold, "restarted vs cold")


@pytest.mark.integration
def test_a_failed_load_is_recomputed_with_the_same_result(
    start_node: Callable[..., NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node()
    with make_engine(node) as engine:
        cold = serve_all(engine, "cold")
        assert engine.connector is not None
        link = engine.connector.worker.link
        submit = link.submit

        def no_loads(op: str, **fields: Any) -> Any:
            return None if op == "load" else submit(op, **fields)

        monkeypatch.setattr(link, "submit", no_loads)  # as if the node went away after lookup
        failed = serve_all(engine, "failed")
    assert [s.hit_tokens for s in failed] == HITS
    assert [s.recomputed_tokens for s in failed] == HITS
    assert_same(failed, cold, "recomputed vs cold")


@pytest.mark.integration
def test_a_step_saves_the_new_blocks_of_all_its_requests_in_one_request(
    start_node: Callable[..., NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node()
    prompts = PROMPTS[:2]  # 6 and 2 full blocks
    with make_engine(node) as engine:
        connector = engine.connector
        assert connector is not None
        link = connector.worker.link
        submit = link.submit
        saves: list[int] = []

        def count_saves(op: str, **fields: Any) -> Any:
            if op == "save":
                saves.append(len(fields["block_ids"]))
            return submit(op, **fields)

        monkeypatch.setattr(link, "submit", count_saves)
        requests = [Request(f"batch-{i}", prompt) for i, prompt in enumerate(prompts)]
        blocks = [engine.blocks.allocate(-(-len(prompt) // BLOCK_SIZE)) for prompt in prompts]
        assert [connector.lookup(r, b) for r, b in zip(requests, blocks, strict=True)] == [0, 0]
        step = _SchedulerOutput(
            [_NewRequest(r.request_id, (b,), 0) for r, b in zip(requests, blocks, strict=True)],
            _CachedRequests([], [], []),
            {r.request_id: r.num_tokens for r in requests},
            {},
        )
        connector.end_step(connector.begin_step(step))
        for request in requests:
            connector.finish(request)
        again = [Request(f"again-{i}", prompt) for i, prompt in enumerate(prompts)]
        hits = [connector.lookup(r, b) for r, b in zip(again, blocks, strict=True)]
        for request in again:
            connector.finish(request)
    assert saves == [6 + 2]
    assert hits == HITS[:2]
    assert node.stats()["pool"]["leased_bytes"] == 0


@pytest.mark.integration
def test_benchmark_smoke_run_reports_every_pass(short_tmp: Path) -> None:
    if not NODE_BIN.is_file():
        pytest.fail(f"pegaflow-node binary not found at {NODE_BIN}: run `cargo build`")
    out = short_tmp / "out"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--node-bin", str(NODE_BIN), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(CONNECTOR_DIR)},
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    results = json.loads((out / "results.json").read_text())
    assert list(results["passes"]) == ["no-connector", "cold", "warm", "restart"]
    assert results["identical"] and not results["failures"], results["failures"]
    assert results["passes"]["restart"]["hit_tokens"] == [96, 96, 96]
    layers = results["timelines"]["warm"]["layers"]
    per_layer = [marks for name, marks in layers.items() if not name.startswith("step_")]
    assert per_layer and all(len(marks) == MODELS["tiny"].num_layers for marks in per_layer)
    # Cold prompts run in two steps (the prefix, then the last block's tokens); warm only the last.
    for name, count in (("no-connector", 2), ("cold", 2), ("warm", 1)):
        profile = results["steps"][name]
        times = [profile["lookup_done_ms"], *(t for step in profile["steps_ms"] for t in step)]
        assert len(profile["steps_ms"]) == count, (name, profile)
        assert times == sorted(times) and times[-1] <= profile["token_ms"], (name, profile)
    assert "tokens and logits bit-identical across passes: yes" in result.stdout
