"""A KV region in POSIX shared memory, for engines without a GPU (tests, vLLM CPU).

The node maps the same shared-memory file and copies blocks between it and its pool, so this
module only has to lay the region out the way vLLM does and describe that layout in the
`register` fields. All layers share one buffer; each layer's blocks follow each other, so layer
`l`'s segment starts at `l * num_blocks * layer_block_bytes` with stride `layer_block_bytes`
(packed layouts; split layouts put the V plane after the K plane).
Only memoryviews are used: numpy is not required.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Iterable, Sequence
from multiprocessing import shared_memory
from typing import Any

from .client import Client, Engine
from .keys import Namespace

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8_e4m3": 1, "fp8_e5m2": 1}
LAYOUTS = ("vllm_lbnhc", "vllm_lbhnc", "kv_split", "mla")


def segment_bytes(namespace: Namespace) -> int:
    """Bytes of one block of one layer in one segment, per the table in docs/protocol.md."""
    if namespace.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {namespace.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    if namespace.layout not in LAYOUTS:
        raise ValueError(f"layout {namespace.layout!r} is not one of {list(LAYOUTS)}")
    tokens = namespace.block_size * DTYPE_BYTES[namespace.dtype]
    if namespace.layout == "mla":
        if namespace.num_kv_heads != 1:
            raise ValueError(f"layout mla needs num_kv_heads 1, got {namespace.num_kv_heads}")
        return tokens * namespace.head_dim
    channels = namespace.head_dim if namespace.layout == "kv_split" else 2 * namespace.head_dim
    return tokens * namespace.num_kv_heads * channels


def page_bytes(namespace: Namespace) -> int:
    """Bytes of one stored block: every layer, every segment."""
    segments = 2 if namespace.layout == "kv_split" else 1
    return namespace.num_layers * segments * segment_bytes(namespace)


class HostKvRegion:
    """One engine's KV cache for every layer, in a shared-memory file the node maps."""

    def __init__(self, namespace: Namespace, num_blocks: int, gpu: str | None = None) -> None:
        """`gpu`: a GPU of the node's `topology.gpus` this engine stands for (its transfer actor
        and nearest pool serve it), or none."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.namespace = namespace
        self.num_blocks = num_blocks
        self.gpu = gpu
        self.segment_bytes = segment_bytes(namespace)
        self.segments = 2 if namespace.layout == "kv_split" else 1
        self.layer_block_bytes = self.segments * self.segment_bytes  # one block of one layer
        self.page_bytes = page_bytes(namespace)
        layer_bytes = num_blocks * self.layer_block_bytes
        if self.segments == 2:
            # [2, num_blocks, block_size, heads, head_dim]: the V plane follows the K plane.
            plane = num_blocks * self.segment_bytes
            self.layers = [
                [[base, self.segment_bytes], [base + plane, self.segment_bytes]]
                for base in range(0, namespace.num_layers * layer_bytes, layer_bytes)
            ]
        else:
            self.layers = [
                [[base, self.layer_block_bytes]]
                for base in range(0, namespace.num_layers * layer_bytes, layer_bytes)
            ]
        self.bytes = namespace.num_layers * layer_bytes
        name = f"pegaflow-kv-{os.getpid()}-{secrets.token_hex(4)}"
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=self.bytes)
        self.name = self._shm.name
        self.buf = self._shm.buf[: self.bytes]

    def __enter__(self) -> HostKvRegion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        self.unlink()

    def register_fields(self) -> dict[str, Any]:
        """The fields of a `register` request describing this region."""
        region: dict[str, Any] = {"shm": self.name, "bytes": self.bytes}
        if self.gpu is not None:
            region["gpu"] = self.gpu
        return {
            "namespace": self.namespace.to_wire(),
            "region": region,
            "num_blocks": self.num_blocks,
            "segment_bytes": self.segment_bytes,
            "layers": self.layers,
        }

    def register(self, client: Client) -> Engine:
        fields = self.register_fields()
        del fields["namespace"]
        return client.register(self.namespace, **fields)

    def element_offset(self, layer: int, block_id: int, head: int, token: int, channel: int) -> int:
        """Byte offset of one element, indexed as vLLM's `(blocks, heads, block_size, 2*head_dim)`
        view (channels `[0, head_dim)` are K, the rest V; mla has one head and `head_dim`)."""
        ns = self.namespace
        width = DTYPE_BYTES[ns.dtype]
        segment = 0
        if ns.layout == "kv_split":
            segment, channel = divmod(channel, ns.head_dim)
            index = (token * ns.num_kv_heads + head) * ns.head_dim + channel
        elif ns.layout == "vllm_lbhnc":
            index = (head * ns.block_size + token) * 2 * ns.head_dim + channel
        elif ns.layout == "mla":
            index = token * ns.head_dim + channel
        else:
            index = (token * ns.num_kv_heads + head) * 2 * ns.head_dim + channel
        offset, stride = self.layers[layer][segment]
        return offset + block_id * stride + index * width

    def block_bytes(self, block_id: int) -> bytes:
        """The page the node stores for this block: every layer, every segment, in order."""
        return b"".join(
            self.buf[start : start + self.segment_bytes] for start in self._spans(block_id)
        )

    def write_block(self, block_id: int, data: bytes) -> None:
        """Writes one page (as `block_bytes` returns it) into the block's segments."""
        if len(data) != self.page_bytes:
            raise ValueError(f"a page is {self.page_bytes} bytes, got {len(data)}")
        view = memoryview(data)
        for index, start in enumerate(self._spans(block_id)):
            part = index * self.segment_bytes
            self.buf[start : start + self.segment_bytes] = view[part : part + self.segment_bytes]

    def fill_random(self, block_ids: Iterable[int], seed: int) -> list[bytes]:
        """Writes reproducible random pages into `block_ids`; returns them in the same order."""
        rng = random.Random(seed)
        pages = []
        for block_id in block_ids:
            page = rng.randbytes(self.page_bytes)
            self.write_block(block_id, page)
            pages.append(page)
        return pages

    def close(self) -> None:
        """Unmaps this process's view; the file stays until `unlink`."""
        self.buf.release()
        self._shm.close()

    def unlink(self) -> None:
        """Removes the shared-memory file; mappings (the node's included) stay valid."""
        self._shm.unlink()

    def _spans(self, block_id: int) -> Sequence[int]:
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block {block_id} is not below num_blocks {self.num_blocks}")
        return [offset + block_id * stride for layer in self.layers for offset, stride in layer]
