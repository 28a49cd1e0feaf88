"""The package version. It must equal the Cargo workspace version (Cargo.toml), which the wheel's
metadata takes; connector/tests/test_packaging.py holds the three equal."""

from __future__ import annotations

__version__ = "0.1.0"
