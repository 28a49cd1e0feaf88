"""Fixtures: short temporary directories, and the real pegaflow-node for integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from enginekit import http_get

from pegaflow import Client, ConnectionLost

REPO_ROOT = Path(__file__).resolve().parents[2]
CONNECTOR_DIR = REPO_ROOT / "connector"
NODE_BIN = Path(os.environ.get("PEGAFLOW_NODE_BIN", REPO_ROOT / "target/debug/pegaflow-node"))
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class NodeProcess:
    """A pegaflow-node child process on a private socket, HTTP port and log file."""

    def __init__(
        self,
        workdir: Path,
        pool_size: int,
        max_page_size: int | None,
        ssd: dict[str, str] | None = None,
        dma: str = "host",
    ) -> None:
        self.dma = dma
        self.socket = workdir / "node.sock"
        self.log_path = workdir / "node.log"
        self.http_port = free_port()
        self.pool_size = pool_size
        self.max_page_size = max_page_size
        self.ssd = ssd or {}  # flag name without "--ssd-" -> value, e.g. {"dir": ..., "size": ...}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            str(NODE_BIN), "--socket", str(self.socket),
            "--http-addr", f"127.0.0.1:{self.http_port}", "--pool-size", f"{self.pool_size}B",
            "--dma", self.dma, "--log-level", "info",
        ]  # fmt: skip
        if self.max_page_size is not None:
            command += ["--max-page-size", f"{self.max_page_size}B"]
        for name, value in self.ssd.items():
            command += [f"--ssd-{name}", str(value)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(
                    f"pegaflow-node exited with {self.process.returncode} at start:\n{self.log()}"
                )
            try:
                Client(str(self.socket), reconnect=False, timeout=2).close()  # hello answered
                return
            except ConnectionLost:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"pegaflow-node did not accept on {self.socket} within "
                        f"{START_TIMEOUT_S} s:\n{self.log()}"
                    )
                time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, then the exit status; fails if the node does not drain within 10 s."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"pegaflow-node ignored SIGTERM for {STOP_TIMEOUT_S} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric on /metrics."""
        _, _, body = http_get(self.http_port, "/metrics")
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"metric {name} not exported")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20_000:]

    def client(self, **options: Any) -> Client:
        return Client(str(self.socket), **options)

    def stats(self) -> dict[str, Any]:
        status, _, body = http_get(self.http_port, "/api/stats")
        assert status == 200, body
        return json.loads(body)

    def engine_process(self, *args: str) -> subprocess.Popen[str]:
        """Starts tests/enginekit.py as an engine process talking to this node."""
        env = {**os.environ, "PYTHONPATH": str(CONNECTOR_DIR)}
        command = [sys.executable, str(CONNECTOR_DIR / "tests/enginekit.py"), *args,
                   "--socket", str(self.socket)]  # fmt: skip
        return subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attaches the logs of the test's nodes to its failure report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for index, node in enumerate(getattr(item, "pegaflow_nodes", [])):
            report.sections.append((f"pegaflow-node {index} log", node.log()))


def require_node_bin() -> None:
    """Fails (never skips) when the node binary is missing: the tests exist to run against it."""
    if not NODE_BIN.is_file():
        pytest.fail(
            f"pegaflow-node binary not found at {NODE_BIN}: run `cargo build` at the repo "
            "root, or set PEGAFLOW_NODE_BIN"
        )


@contextlib.contextmanager
def temp_workdir(prefix: str) -> Iterator[Path]:
    """A fresh directory under /tmp (short enough for Unix socket paths), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_node(workdir: Path) -> Iterator[NodeProcess]:
    """One node in `workdir` for a whole test module (engines are slow to start, so modules
    share one), stopped afterwards."""
    require_node_bin()
    workdir.mkdir()
    node = NodeProcess(workdir, 256 << 20, None)
    node.start()
    try:
        yield node
    finally:
        if node.process is not None and node.process.poll() is None:
            node.stop()


@pytest.fixture
def start_node(
    short_tmp: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., NodeProcess]]:
    """Starts real nodes (fails, never skips, without the binary); checks they exit 0 on SIGTERM."""
    require_node_bin()
    nodes: list[NodeProcess] = []
    request.node.pegaflow_nodes = nodes

    def start(
        pool_size: int = 256 << 20,
        max_page_size: int | None = None,
        ssd: dict[str, str] | None = None,
        dma: str = "host",
    ) -> NodeProcess:
        workdir = short_tmp / f"n{len(nodes)}"
        workdir.mkdir()
        nodes.append(NodeProcess(workdir, pool_size, max_page_size, ssd, dma))
        nodes[-1].start()
        return nodes[-1]

    yield start
    for node in nodes:
        if node.process is not None and node.process.returncode is None:
            status = node.stop()
            assert status == 0, f"pegaflow-node exited with {status} after SIGTERM:\n{node.log()}"


@pytest.fixture
def node(start_node: Callable[..., NodeProcess]) -> NodeProcess:
    return start_node()
