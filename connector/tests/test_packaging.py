"""One version for Rust and Python, and `python -m pegaflow node` finding the installed node.

scripts/test-wheel.sh runs this module again with the interpreter of a fresh venv that holds only
the built wheel, so "installed" there means the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tomllib
from conftest import CONNECTOR_DIR, REPO_ROOT

import pegaflow

INSTALLED = """
import json, pegaflow
from importlib import metadata
print(json.dumps({"version": pegaflow.__version__, "metadata": metadata.version("pegaflow"),
                  "file": pegaflow.__file__}))
"""


def cargo_workspace_version() -> str:
    with (REPO_ROOT / "Cargo.toml").open("rb") as manifest:
        return tomllib.load(manifest)["workspace"]["package"]["version"]


def test_the_node_crate_takes_the_workspace_version() -> None:
    """The wheel's version is the version of actors/Cargo.toml, the crate of pegaflow-node."""
    with (REPO_ROOT / "actors/Cargo.toml").open("rb") as manifest:
        package = tomllib.load(manifest)["package"]
    assert package["version"] == {"workspace": True}


def test_the_source_carries_the_cargo_workspace_version() -> None:
    assert pegaflow.__version__ == cargo_workspace_version()


def test_the_installed_package_and_its_metadata_carry_the_cargo_workspace_version() -> None:
    # -I: the installed package, not the checkout that pytest puts on sys.path.
    done = subprocess.run(
        [sys.executable, "-I", "-c", INSTALLED],
        capture_output=True, text=True, timeout=60, cwd="/", check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    installed = json.loads(done.stdout)
    assert (installed["version"], installed["metadata"]) == (cargo_workspace_version(),) * 2, (
        f"installed pegaflow at {installed['file']}"
    )


def fake_distribution(root: Path, record: list[str]) -> Path:
    """A `pegaflow` distribution's metadata in `root`, which comes before the installed one on
    PYTHONPATH, whose RECORD lists `record`."""
    info = root / "pegaflow-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pegaflow\nVersion: 0.0.0\n")
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in record))
    return root


def run_node_command(site: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{CONNECTOR_DIR}"}
    return subprocess.Popen(
        [sys.executable, "-m", "pegaflow", "node", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/",
    )  # fmt: skip


def test_node_command_becomes_the_installed_binary_with_every_argument(short_tmp: Path) -> None:
    site = fake_distribution(short_tmp / "site", ["pegaflow/__init__.py", "bin/pegaflow-node"])
    binary = site / "bin/pegaflow-node"
    binary.parent.mkdir()
    binary.write_text('#!/bin/sh\necho "pid $$"\nfor arg in "$@"; do echo "arg $arg"; done\n')
    binary.chmod(0o755)
    process = run_node_command(site, "--pool-size", "1GiB", "--help", "a b")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    # Same pid: the interpreter was replaced, so the node gets signals sent to it directly.
    assert stdout.splitlines() == [
        f"pid {process.pid}", "arg --pool-size", "arg 1GiB", "arg --help", "arg a b",
    ]  # fmt: skip


def test_node_command_without_an_installed_binary_says_how_to_get_one(short_tmp: Path) -> None:
    site = fake_distribution(short_tmp / "site", ["pegaflow/__init__.py"])
    process = run_node_command(site, "--print-config")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stdout == ""
    assert stderr.startswith("pegaflow-node is not installed with this pegaflow package"), stderr
    assert "install the pegaflow wheel" in stderr
