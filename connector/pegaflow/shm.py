"""Shared-memory files the node maps (CPU KV regions, SGLang host pools, load progress boards).

Every file the connector hands the node by name is made here: under `/dev/shm`, named after the
kind, this process and a random suffix, created exclusively and readable only by this user.
"""

from __future__ import annotations

import os
import secrets

SHM_ROOT = "/dev/shm"


def create(kind: str, size: int) -> tuple[str, str, int]:
    """A new file of `size` bytes: its shm name (what the node is told), its path, and a
    read-write descriptor the caller closes."""
    name = f"pegaflow-{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path = f"{SHM_ROOT}/{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        unlink(path)
        raise
    return name, path, fd


def unlink(path: str) -> None:
    """Removes a file made by `create`; one already gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
