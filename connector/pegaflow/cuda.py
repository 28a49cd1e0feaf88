"""CUDA IPC export of torch GPU memory, for registering GPU engines' KV tensors with the node.

The node opens the allocation with the CUDA driver (`cuIpcOpenMemHandle`); nothing here needs a
GPU until a tensor is exported, so the module imports everywhere.
"""

from __future__ import annotations

from typing import Any

#: Size of a `cudaIpcMemHandle_t`, what the node's `region.cuda_ipc` takes.
IPC_HANDLE_BYTES = 64


def raw_ipc_handle(handle: bytes) -> bytes:
    """The bare `cudaIpcMemHandle_t` inside torch's shareable handle.

    torch prefixes the handle with a format version byte and a type byte: `c` for a plain
    cudaMalloc block (shareable by `cudaIpcGetMemHandle`), `e` for an expandable segment
    (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`), which CUDA IPC cannot open.
    """
    if len(handle) == IPC_HANDLE_BYTES:
        return handle
    if len(handle) == IPC_HANDLE_BYTES + 2 and handle[1:2] == b"c":
        return handle[2:]
    if len(handle) > 1 and handle[1:2] == b"e":
        raise ValueError(
            "KV cache lives in an expandable segment, which CUDA IPC cannot share; unset "
            "expandable_segments in PYTORCH_CUDA_ALLOC_CONF"
        )
    raise ValueError(f"unrecognised torch IPC handle of {len(handle)} bytes")


def gpu_uuid(device: int) -> str:
    """The UUID of the GPU torch numbers `device`, which the node names GPUs by: ordinals depend
    on each process's `CUDA_VISIBLE_DEVICES`, UUIDs do not."""
    import torch

    return str(torch.cuda.get_device_properties(device).uuid)


def ipc_region(storage: Any) -> dict[str, Any]:
    """The `register` `region` map of a CUDA tensor storage: handle, offset, size, its GPU."""
    device, handle, size, offset, *_ = storage._share_cuda_()
    return {"cuda_ipc": raw_ipc_handle(bytes(handle)), "offset": offset, "bytes": size,
            "gpu": gpu_uuid(device)}  # fmt: skip
