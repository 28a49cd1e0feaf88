"""The CUDA data path end to end on a GPU machine: one torch process registers its KV buffer
by CUDA IPC, saves blocks and exits; a second loads them into other block ids, layer by layer,
its stream waiting on the node's per-layer events (and, with a load progress board, answered
before the node enqueued them). A save may also be sent before the engine's
stream wrote the blocks, naming the engine's per-layer events for the node to wait on, and be
answered once its copies are queued. Run with `pytest -m gpu` where a GPU is."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CONNECTOR_DIR, NodeProcess

ENGINE = Path(__file__).parent / "gpu_engine.py"


def run_engine(node: NodeProcess, mode: str, blocks_file: Path, first_token: int = 0) -> str:
    result = subprocess.run(
        [sys.executable, str(ENGINE), mode, "--socket", str(node.socket),
         "--blocks-file", str(blocks_file), "--first-token", str(first_token)],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PYTHONPATH": str(CONNECTOR_DIR), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, f"{mode} engine failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.gpu
@pytest.mark.integration
def test_gpu_blocks_outlive_their_engine_and_load_layer_by_layer(
    start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = start_node(dma="cuda")
    assert node.stats()["dma"] == "cuda"
    blocks_file = tmp_path / "saved.pt"
    assert "saved 8 blocks" in run_engine(node, "save", blocks_file)
    assert "byte-exact" in run_engine(node, "load", blocks_file)
    assert "byte-exact" in run_engine(node, "load-board", blocks_file)
    assert node.stats()["pool"]["leased_bytes"] == 0


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.parametrize(
    ("mode", "says", "first_token"),
    [
        ("save-events", "saved 8 blocks after events; stream busy at send: True", 100_000),
        ("save-queued", "answered while the stream was busy; a load into half of them landed "
                        "after it", 200_000),
    ],
    ids=["answered-when-done", "answered-when-queued"],
)  # fmt: skip
def test_gpu_save_sent_before_the_engines_writes_copies_what_they_wrote(
    start_node: Callable[..., NodeProcess], tmp_path: Path, mode: str, says: str, first_token: int
) -> None:
    node = start_node(dma="cuda")
    blocks_file = tmp_path / "saved.pt"
    assert says in run_engine(node, mode, blocks_file, first_token=first_token)
    assert "byte-exact" in run_engine(node, "load", blocks_file, first_token=first_token)
    assert node.stats()["pool"]["leased_bytes"] == 0
