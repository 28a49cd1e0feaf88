"""torch's shareable CUDA handles turned into what the node opens (no GPU needed)."""

from __future__ import annotations

import pytest

from pegaflow.cuda import IPC_HANDLE_BYTES, raw_ipc_handle


def test_torch_prefix_is_stripped_and_bare_handles_pass() -> None:
    bare = bytes(range(IPC_HANDLE_BYTES))
    assert raw_ipc_handle(b"\x02c" + bare) == bare
    assert raw_ipc_handle(bare) == bare


@pytest.mark.parametrize(
    ("handle", "message"),
    [(b"\x02e" + bytes(80), "expandable segment"), (bytes(10), "10 bytes")],
)
def test_unshareable_handles_are_refused_with_the_reason(handle: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        raw_ipc_handle(handle)
