"""The version handshake (docs/protocol.md "Versions") against the real node: an incompatible
pair is refused at `hello` with one line naming both versions and what to upgrade, whichever
side is older; a patch difference and a client older than the check keep working."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from conftest import CONNECTOR_DIR, NodeProcess
from enginekit import RawConnection

import pegaflow.client
from pegaflow import Client, IncompatibleVersion, __version__
from pegaflow.protocol import INCOMPATIBLE_VERSION, UNSUPPORTED_VERSION
from pegaflow.vllm.config import ConnectorConfig
from pegaflow.vllm.node_link import NodeLink

MAJOR, MINOR = (int(part) for part in __version__.split(".")[:2])


def claim_version(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    """Makes this process's client say it is `version` of the pegaflow package."""
    monkeypatch.setattr(pegaflow.client, "__version__", version)


def refusal(node: NodeProcess) -> str:
    """The one-line message of the `IncompatibleVersion` a connect to `node` raises."""
    with pytest.raises(IncompatibleVersion) as refused:
        Client(str(node.socket), reconnect=False, timeout=5)
    message = str(refused.value)
    assert "\n" not in message
    return message


@pytest.mark.integration
def test_a_newer_client_is_told_to_upgrade_the_node(
    node: NodeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    newer = f"{MAJOR}.{MINOR + 1}.0"
    claim_version(monkeypatch, newer)
    assert refusal(node) == (
        f"pegaflow {newer} (client) and pegaflow-node {__version__} are incompatible "
        f"(major.minor must match); upgrade pegaflow-node to {MAJOR}.{MINOR + 1}.x"
    )


@pytest.mark.integration
def test_an_older_client_is_told_to_upgrade_the_package(
    node: NodeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    claim_version(monkeypatch, "0.0.1")
    assert refusal(node) == (
        f"pegaflow 0.0.1 (client) and pegaflow-node {__version__} are incompatible "
        f"(major.minor must match); upgrade the pegaflow package to {MAJOR}.{MINOR}.x"
    )


@pytest.mark.integration
def test_the_node_answers_incompatible_version_and_logs_it(node: NodeProcess) -> None:
    raw = RawConnection(node.socket)
    try:
        reply = raw.request("hello", client="raw", version=f"{MAJOR + 1}.0.0")
        assert reply["ok"] is False and reply["code"] == INCOMPATIBLE_VERSION
        assert f"pegaflow {MAJOR + 1}.0.0 (client)" in reply["message"]
        assert raw.request("hello", client="raw", version="latest")["code"] == "bad_field"
    finally:
        raw.close()
    assert "hello refused" in node.log()


@pytest.mark.integration
def test_a_different_protocol_names_both_protocols_and_what_to_upgrade(
    node: NodeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pegaflow.client, "PROTOCOL_VERSION", 2)
    message = refusal(node)
    assert message.endswith(
        f"protocol 2 is not supported by pegaflow-node {__version__}, which speaks protocol 1; "
        "upgrade pegaflow-node"
    ), message
    raw = RawConnection(node.socket)
    try:
        assert raw.request("hello", client="raw", v=2)["code"] == UNSUPPORTED_VERSION
    finally:
        raw.close()


@pytest.mark.integration
def test_a_patch_difference_and_a_client_without_a_version_keep_working(
    node: NodeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    claim_version(monkeypatch, f"{MAJOR}.{MINOR}.99")
    with node.client(reconnect=False) as client:
        assert client.node_info["version"] == __version__
        assert client.lookup([bytes(32)]).hits == 0
    raw = RawConnection(node.socket)
    try:  # a client older than the check: `hello` without `version`
        reply = raw.request("hello", client="pegaflow-py/0.1.0")
        assert reply["ok"] is True and reply["version"] == __version__
    finally:
        raw.close()


@pytest.mark.integration
def test_the_connectors_link_turns_itself_off_with_one_warning(
    node: NodeProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    claim_version(monkeypatch, f"{MAJOR}.{MINOR + 1}.0")
    config = ConnectorConfig(socket_path=str(node.socket), retry_interval_s=0.001)
    link = NodeLink(config, "worker")
    with caplog.at_level(logging.WARNING, logger="pegaflow.connector"):
        for _ in range(3):
            assert link.client() is None
            assert link.submit("lookup", keys=bytes(32)) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "upgrade pegaflow-node" in warnings[0] and "PegaFlow is off" in warnings[0]
    assert not link.health.usable()

    claim_version(monkeypatch, f"{MAJOR}.{MINOR}.99")
    patched = NodeLink(config, "worker")
    assert patched.client() is not None
    patched.close()


@pytest.mark.integration
def test_the_command_line_says_the_one_line_and_exits_2(node: NodeProcess) -> None:
    newer = f"{MAJOR}.{MINOR + 1}.0"
    script = (
        f"import sys, pegaflow.client; pegaflow.client.__version__ = {newer!r}; "
        "from pegaflow.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "stats", "--socket", str(node.socket)],
        capture_output=True, text=True, timeout=60, cwd=CONNECTOR_DIR, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"pegaflow stats: pegaflow {newer} (client) and pegaflow-node {__version__} are "
        f"incompatible (major.minor must match); upgrade pegaflow-node to {MAJOR}.{MINOR + 1}.x\n"
    )
