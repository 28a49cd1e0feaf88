"""PegaKVConnector inside real vLLM on a GPU, against the real node with its CUDA copy engine.

Each engine is a process of tests/vllm_support/gpu_llm.py running a config-only Llama with dummy
weights (scenarios/gpu/vllm/small-llama) in bf16 with FlashAttention 3. Every pass is compared
with plain vLLM: the greedy tokens and the top-5 logprobs of every generated position must be
identical. The engines run with `VLLM_BATCH_INVARIANT=1`: a request whose prompt was loaded
computes only the prompt's tail, and without batch invariance vLLM's kernels may round a row
differently when the batch around it has another shape.

Run where a GPU and vLLM are: `pytest -m gpu connector/tests/test_vllm_gpu.py` (the node
binary from PEGAFLOW_NODE_BIN, built with the CUDA engine).
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CONNECTOR_DIR, REPO_ROOT, NodeProcess, require_node_bin, temp_workdir

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

BLOCK = 16
MAX_TOKENS = 8
KILL_MAX_TOKENS = 128  # long enough that the node dies while the batch is still decoding
START_TIMEOUT_S = 300.0
STEP_TIMEOUT_S = 120.0
ENGINE = CONNECTOR_DIR / "tests/vllm_support/gpu_llm.py"
MODEL_CONFIG = REPO_ROOT / "scenarios/gpu/vllm/small-llama/config.json"


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 4000) for _ in range(n)] for n in lengths]


PROMPTS = prompts(1, [300, 170, 517])
AFTER_KILL = prompts(2, [260, 140])
AFTER_NODE_RESTART = prompts(3, [333, 201])


def hit_blocks(batch: list[list[int]]) -> int:
    """Blocks a full hit covers: whole blocks, leaving at least one prompt token to compute."""
    return sum((len(p) - 1) // BLOCK for p in batch)


class EngineProcess:
    """One vLLM engine in a child process; commands and replies are JSON lines. Everything else
    it prints (vLLM's log) goes to its log file."""

    def __init__(self, workdir: Path, name: str, socket: Path | None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        command = [sys.executable, str(ENGINE), "--config", str(MODEL_CONFIG),
                   "--model-dir", str(workdir / "small-llama"),
                   "--block-size", str(BLOCK)]  # fmt: skip
        if socket is not None:
            command += ["--socket", str(socket), "--extra", json.dumps({"retry_interval_s": 1.0})]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in [str(CONNECTOR_DIR), os.environ.get("PYTHONPATH", "")] if p
            ),
            "VLLM_BATCH_INVARIANT": "1",
        }
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env=env,
        )  # fmt: skip
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self._lines.put(line)
            else:
                self._log.write(line)
                self._log.flush()
        self._lines.put(None)

    def reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.name}: no reply within {timeout} s\n{self.log()}"
            ) from None
        if line is None:
            raise AssertionError(f"{self.name} exited ({self.process.poll()})\n{self.log()}")
        return json.loads(line)

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def generate(self, batch: list[list[int]], max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        self.send(generate=batch, max_tokens=max_tokens)
        return self.reply(STEP_TIMEOUT_S)

    def close(self) -> int:
        if self.process.poll() is None:
            self.send(exit=True)
            try:
                return self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"{self.name} did not exit\n{self.log()}") from None
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-15_000:]


def assert_same(outputs: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> None:
    """Greedy tokens, then every position's top-5 logprobs, bit for bit."""
    assert [o["tokens"] for o in outputs] == [b["tokens"] for b in baseline]
    worst = max(
        abs(got[1] - want[1])
        for output, base in zip(outputs, baseline, strict=True)
        for got_pos, want_pos in zip(output["logprobs"], base["logprobs"], strict=True)
        for got, want in zip(got_pos, want_pos, strict=True)
    )
    assert outputs == baseline, f"same tokens, logprobs differ by up to {worst}"


def role(reply: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in reply["stats"] if s["role"] == name)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temp_workdir("pfg-") as path:
        yield path


@pytest.fixture(scope="module")
def node(workdir: Path) -> Iterator[NodeProcess]:
    require_node_bin()
    (workdir / "node").mkdir()
    node = NodeProcess(workdir / "node", 2 << 30, None, dma="cuda")
    node.start()
    yield node
    if node.process is not None and node.process.poll() is None:
        node.stop()


@pytest.fixture(scope="module")
def engines(workdir: Path, node: NodeProcess) -> Iterator[dict[str, EngineProcess]]:
    """Plain vLLM and two engines with the connector, started together (starts dominate the
    module's time); `b` serves nothing until `a` has exited, so it stands for a restart."""
    started = {
        "plain": EngineProcess(workdir, "plain", None),
        "a": EngineProcess(workdir, "a", node.socket),
        "b": EngineProcess(workdir, "b", node.socket),
    }
    for engine in started.values():
        assert engine.reply(START_TIMEOUT_S) == {"ready": True}
    yield started
    for engine in started.values():
        if engine.process.poll() is None:
            engine.process.kill()
            engine.process.wait()


@pytest.fixture(scope="module")
def baseline(engines: dict[str, EngineProcess]) -> dict[str, list[dict[str, Any]]]:
    """Plain vLLM's greedy tokens and top logprobs for every prompt the tests use."""
    plain = engines["plain"]
    outputs = {
        "prompts": plain.generate(PROMPTS)["outputs"],
        "after_kill": plain.generate(AFTER_KILL, KILL_MAX_TOKENS)["outputs"],
        "after_node_restart": plain.generate(AFTER_NODE_RESTART)["outputs"],
    }
    assert plain.close() == 0
    firsts = [json.dumps(o["logprobs"][0]) for batch in outputs.values() for o in batch]
    assert len(set(firsts)) == len(firsts), "prompts must give distinct first-token logprobs"
    return outputs


def per_layer_kv_tensors(layers: int) -> list[Any]:
    """KV tensors as vLLM 0.26 allocates them: one int8 buffer per layer, viewed as bf16
    `(blocks, heads, tokens, 2 * head_dim)` in token-major order."""
    import torch

    raws = [
        torch.zeros(4 * 16 * 2 * 256 * 2, dtype=torch.int8, device="cuda") for _ in range(layers)
    ]
    return [raw.view(torch.bfloat16).view(4, 16, 2, 256).permute(0, 2, 1, 3) for raw in raws]


def test_merge_moves_per_layer_buffers_into_one_allocation() -> None:
    import torch

    from pegaflow.vllm.layout import merge_cuda_tensors

    layers = per_layer_kv_tensors(3)
    attention_views = [layers[1]]  # the attention layers hold the same tensor objects
    shapes = [(tuple(t.shape), t.stride()) for t in layers]
    merge_cuda_tensors(layers, attention_views)
    storage = layers[0].untyped_storage()
    assert all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in layers)
    assert [(tuple(t.shape), t.stride()) for t in layers] == shapes
    assert layers[0].data_ptr() < layers[1].data_ptr() < layers[2].data_ptr()
    assert all(torch.count_nonzero(t) == 0 for t in layers)
    for index, tensor in enumerate(layers):
        tensor.fill_(index + 1)
    for index, tensor in enumerate(layers):
        assert torch.all(tensor == index + 1), f"layer {index} overlaps another"


def test_merge_refuses_a_buffer_held_by_a_tensor_it_cannot_rebind() -> None:
    from pegaflow.vllm.layout import UnsupportedLayout, merge_cuda_tensors

    layers = per_layer_kv_tensors(2)
    before = [t.data_ptr() for t in layers]
    hidden = layers[0][0]  # a view kept somewhere the connector does not know about
    with pytest.raises(UnsupportedLayout, match="held by"):
        merge_cuda_tensors(layers, [])
    assert [t.data_ptr() for t in layers] == before
    assert hidden.data_ptr() == before[0]


def test_vllm_runs_flash_attention_3(
    engines: dict[str, EngineProcess], baseline: dict[str, Any]
) -> None:
    for engine in engines.values():
        assert "Using FlashAttention version 3" in engine.log_path.read_text(), engine.name
    assert "PegaFlow worker: registered 4 layers" in engines["a"].log_path.read_text()


def test_second_pass_is_loaded_and_identical(
    node: NodeProcess, engines: dict[str, EngineProcess], baseline: dict[str, Any]
) -> None:
    engine = engines["a"]
    first = engine.generate(PROMPTS)
    assert_same(first["outputs"], baseline["prompts"])
    assert role(first, "scheduler")["hit_tokens"] == 0
    assert role(first, "worker")["saved_blocks"] >= hit_blocks(PROMPTS)

    before = node.stats()["totals"]
    second = engine.generate(PROMPTS)
    assert_same(second["outputs"], baseline["prompts"])
    assert role(second, "scheduler")["hit_tokens"] == hit_blocks(PROMPTS) * BLOCK
    worker = role(second, "worker")
    assert worker["loaded_blocks"] == hit_blocks(PROMPTS)
    assert worker["load_error_blocks"] == 0
    after = node.stats()["totals"]
    assert after["loaded_blocks"] - before["loaded_blocks"] == hit_blocks(PROMPTS)


def test_engine_restart_loads_the_first_engines_blocks(
    engines: dict[str, EngineProcess], baseline: dict[str, Any]
) -> None:
    assert engines["a"].close() == 0
    engine = engines["b"]
    result = engine.generate(PROMPTS)
    assert_same(result["outputs"], baseline["prompts"])
    assert role(result, "scheduler")["hit_tokens"] == hit_blocks(PROMPTS) * BLOCK
    assert role(result, "worker")["loaded_blocks"] == hit_blocks(PROMPTS)
    assert role(result, "worker")["load_error_blocks"] == 0


def test_vllm_keeps_serving_when_the_node_is_killed_and_uses_it_again_after_a_restart(
    node: NodeProcess, engines: dict[str, EngineProcess], baseline: dict[str, Any]
) -> None:
    engine = engines["b"]
    engine.send(generate=AFTER_KILL, max_tokens=KILL_MAX_TOKENS)
    time.sleep(0.15)
    node.kill()
    assert_same(engine.reply(STEP_TIMEOUT_S)["outputs"], baseline["after_kill"])
    assert_same(engine.generate(PROMPTS)["outputs"], baseline["prompts"])

    node.start()
    time.sleep(1.5)  # the connector retries the node every retry_interval_s (1 s here)
    first = engine.generate(AFTER_NODE_RESTART)
    assert_same(first["outputs"], baseline["after_node_restart"])
    loaded = role(first, "worker")["loaded_blocks"]
    second = engine.generate(AFTER_NODE_RESTART)
    assert_same(second["outputs"], baseline["after_node_restart"])
    assert role(second, "worker")["loaded_blocks"] - loaded == hit_blocks(AFTER_NODE_RESTART)
    assert engine.close() == 0
    assert engine.log().count("unusable (") <= 2
