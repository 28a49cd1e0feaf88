"""The engine's side of the node's load progress board (docs/protocol.md "Load progress").

A GPU engine's stream may wait on the node's event for layer `L` only once the node has recorded
it for this load. With a board the node answers a load at once with a ticket and, as it enqueues
each layer, writes that ticket into the layer's slot word; the engine waits on the host for the
word before its stream waits on the event. Without one the node answers only once every layer is
enqueued, which for a long prompt takes about as long as the copies themselves.
"""

from __future__ import annotations

import mmap
import os
import time
import weakref

from . import shm

#: Set in a slot's word when the load with that ticket stopped before recording the slot.
FAILED = 1 << 63
#: Words in a board: one 4 KiB page, more than the node's event ring (256 slots) needs.
SLOTS = 512
#: Host-side polls that only yield the GIL before the wait starts sleeping between polls.
_YIELDING_POLLS = 2000
_SLEEP_S = 100e-6


class ProgressBoard:
    """A board in shared memory, registered with the engine (`register`'s `load_progress`). The
    file lives as long as this object: the client re-registers it after a node restart."""

    def __init__(self) -> None:
        self.name, path, fd = shm.create("progress", SLOTS * 8)
        try:
            self._map = mmap.mmap(fd, SLOTS * 8)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("Q")
        self._unlink = weakref.finalize(self, shm.unlink, path)  # also runs at interpreter exit

    def armed(self, slot: int, ticket: int) -> bool | None:
        """True once the load `ticket` recorded `slot`'s event (or a later load re-recorded it,
        which only makes a wait longer), False if the load failed before recording it, None
        while it has not got there yet."""
        word = self._words[slot]
        if word == ticket | FAILED:
            return False
        if word == ticket or (word & ~FAILED) > ticket:
            return True
        return None

    def wait(self, slot: int, ticket: int, deadline: float) -> bool:
        """Polls until `armed` decides, or `deadline` (monotonic) passes: then False."""
        polls = 0
        while (state := self.armed(slot, ticket)) is None:
            if time.monotonic() >= deadline:
                return False
            polls += 1
            time.sleep(0 if polls < _YIELDING_POLLS else _SLEEP_S)
        return state

    def close(self) -> None:
        """Unmaps and removes the file; the node keeps its own mapping until it unregisters."""
        self._words.release()
        self._map.close()
        self._unlink()
