"""The README's Python example runs as written against a real node."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NodeProcess

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.integration
def test_readme_python_example_prints_the_hits(node: NodeProcess) -> None:
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has a python example"
    code = match.group(1).replace("/tmp/pegaflow.sock", str(node.socket))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8"
