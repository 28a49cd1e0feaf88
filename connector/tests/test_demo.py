"""scripts/demo.sh as a newcomer runs it: it says which node it started and how to stop it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import NODE_BIN, REPO_ROOT, free_port, require_node_bin

pytestmark = pytest.mark.integration


def test_demo_names_its_node_and_how_to_stop_exactly_it(short_tmp: Path) -> None:
    require_node_bin()
    socket = short_tmp / "demo.sock"
    env = {
        **os.environ,
        "PEGAFLOW_NODE_BIN": str(NODE_BIN),
        "PEGAFLOW_SOCKET__PATH": str(socket),
        "PEGAFLOW_HTTP__ADDR": f"127.0.0.1:{free_port()}",
    }
    try:
        done = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts/demo.sh")],
            capture_output=True, text=True, timeout=600, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        last = done.stdout.splitlines()[-1]
        stop = re.fullmatch(r"pegaflow-node PID: (\d+) +stop it with: kill (\d+)", last)
        assert stop and stop.group(1) == stop.group(2), f"no stop command last:\n{done.stdout}"
        pid = int(stop.group(1))
        assert done.stdout.count(f"PID: {pid}") == 1 and "pkill" not in done.stdout
        assert _node_running(pid), f"PID {pid} is not {NODE_BIN.resolve()}"
        assert f"source {REPO_ROOT}/.venv/bin/activate" in done.stdout
        subprocess.run(["bash", "-c", f"kill {pid}"], check=True)
        while _node_running(pid):
            time.sleep(0.05)
        assert not socket.exists(), "the node left its socket behind"
    finally:  # never leave the demo's node running, whatever failed above
        started = short_tmp / "pegaflow-node.pid"
        if started.exists() and _node_running(int(started.read_text())):
            os.kill(int(started.read_text()), signal.SIGKILL)


def _node_running(pid: int) -> bool:
    """Whether `pid` is still a running pegaflow-node (not exited, reaped or recycled)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")) == NODE_BIN.resolve()
    except OSError:  # gone, or a zombie waiting for its reaper: stopped either way
        return False
