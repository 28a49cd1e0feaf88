"""`python -m pegaflow` without a node: a clear message and a non-zero status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CONNECTOR_DIR = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["demo", "stats"])
def test_no_node_is_a_clear_error(command: str, short_tmp: Path) -> None:
    path = short_tmp / "absent.sock"
    done = subprocess.run(
        [sys.executable, "-m", "pegaflow", command, "--socket", str(path)],
        capture_output=True, text=True, timeout=30, cwd=CONNECTOR_DIR,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"cannot connect to pegaflow-node at {path}: is it running?" in done.stderr
