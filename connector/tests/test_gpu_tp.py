"""Tensor parallelism on a GPU machine: two ranks of one engine (TP=2) as two processes, each
with its own KV buffer in HBM and its own namespace (`tp_rank` 0 and 1), registered with the
UUID of their GPU, save and load at the same time, byte-exact. On a one-GPU host both ranks sit
on that GPU (two regions, one transfer actor); with two GPUs visible each rank takes its own
(`CUDA_VISIBLE_DEVICES` per rank) and its own transfer actor. Run with `pytest -m gpu` where a
GPU is."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CONNECTOR_DIR, NodeProcess

RANK = Path(__file__).parent / "gpu_tp_rank.py"
TP_SIZE = 2


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.integration
def test_gpu_tp2_ranks_save_and_load_byte_exact_at_once(
    start_node: Callable[..., NodeProcess],
) -> None:
    node = start_node(dma="cuda")
    gpus = node.stats()["topology"]["gpus"]
    assert gpus and all(g["kind"] == "cuda" for g in gpus), gpus
    spread = visible_gpus() >= TP_SIZE
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                str(RANK),
                "--socket",
                str(node.socket),
                "--rank",
                str(rank),
                "--tp-size",
                str(TP_SIZE),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                "PYTHONPATH": str(CONNECTOR_DIR),
                "PATH": "/usr/bin:/bin",
                "CUDA_VISIBLE_DEVICES": str(rank if spread else 0),
            },
        )
        for rank in range(TP_SIZE)
    ]
    outputs = [rank.communicate(timeout=180) for rank in ranks]
    for rank, (process, (out, err)) in enumerate(zip(ranks, outputs, strict=True)):
        assert process.returncode == 0, f"rank {rank} failed:\n{out}\n{err}"
        assert f"rank {rank} byte-exact on GPU-" in out, out
    stats = node.stats()
    assert stats["pool"]["pages"] == 8 * TP_SIZE, "each rank's blocks under its own namespace"
    assert stats["pool"]["leased_bytes"] == 0
