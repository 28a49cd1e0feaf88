"""The engine's side of the load progress board: what each word the node writes means to a
waiting engine, and that the file lives exactly as long as the board. (The node's side is
tested in gpu-dma/src/progress.rs; the whole path runs on the GPU machine, test_gpu_node.py.)"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterator

import pytest

from pegaflow.progress import FAILED, SLOTS, ProgressBoard


@pytest.fixture
def board() -> Iterator[ProgressBoard]:
    board = ProgressBoard()
    yield board
    board.close()


class NodeSide:
    """The node's mapping of the same file, writing words as `ProgressBoard` (Rust) does."""

    def __init__(self, name: str) -> None:
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, SLOTS * 8)
        finally:
            os.close(fd)
        self.words = memoryview(self.map).cast("Q")

    def arm(self, slot: int, ticket: int) -> None:
        self.words[slot] = ticket

    def fail(self, slot: int, ticket: int) -> None:
        self.words[slot] = ticket | FAILED

    def close(self) -> None:
        self.words.release()
        self.map.close()


def test_a_word_says_recorded_failed_or_not_yet_for_a_ticket(board: ProgressBoard) -> None:
    node = NodeSide(board.name)
    try:
        assert board.armed(3, 5) is None  # never written
        node.arm(3, 4)
        assert board.armed(3, 5) is None  # an earlier load's record
        node.arm(3, 5)
        assert board.armed(3, 5) is True
        node.arm(3, 6)
        assert board.armed(3, 5) is True  # a later load re-recorded it: the wait only lengthens
        node.fail(4, 5)
        assert board.armed(4, 5) is False
        node.fail(4, 6)
        assert board.armed(4, 5) is True  # ours was recorded before a later load failed there
        node.fail(5, 4)
        assert board.armed(5, 5) is None  # an earlier load's failure says nothing of ours
    finally:
        node.close()


def test_wait_returns_once_the_node_arms_or_at_the_deadline(board: ProgressBoard) -> None:
    node = NodeSide(board.name)
    try:
        arming = threading.Timer(0.05, node.arm, (7, 9))
        arming.start()
        assert board.wait(7, 9, time.monotonic() + 10)
        arming.join()
        failing = threading.Timer(0.05, node.fail, (8, 9))
        failing.start()
        assert not board.wait(8, 9, time.monotonic() + 10)
        failing.join()
        started = time.monotonic()
        assert not board.wait(9, 9, started + 0.05)
    finally:
        node.close()


def test_the_file_exists_while_the_board_does() -> None:
    board = ProgressBoard()
    path = f"/dev/shm/{board.name}"
    assert os.stat(path).st_size == SLOTS * 8
    assert os.stat(path).st_mode & 0o777 == 0o600
    board.close()
    assert not os.path.exists(path)
