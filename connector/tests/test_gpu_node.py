"""The CUDA data path end to end on a GPU machine: one torch process registers its KV buffer
by CUDA IPC, saves blocks and exits; a second loads them into other block ids, layer by layer,
its stream waiting on the node's per-layer events. Run with `pytest -m gpu` where a GPU is."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CONNECTOR_DIR, NodeProcess

ENGINE = Path(__file__).parent / "gpu_engine.py"


def run_engine(node: NodeProcess, mode: str, blocks_file: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(ENGINE), mode, "--socket", str(node.socket),
         "--blocks-file", str(blocks_file)],
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
    assert node.stats()["pool"]["leased_bytes"] == 0
