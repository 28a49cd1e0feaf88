"""Block keys, computed exactly as docs/protocol.md "Keys" says.

Keys are engine-neutral: vLLM, SGLang, the Rust node and the scenario harness all hash the same
tokens to the same keys, so a block saved by one engine is found by another. The golden vectors in
tests/golden/keys.json pin the bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Sequence

NAMESPACE_TAG = b"pegaflow-namespace-v1"
KEY_BYTES = 32
_U32 = struct.Struct("<I")


@dataclasses.dataclass(frozen=True)
class Namespace:
    """What makes two engines' KV blocks interchangeable; any difference makes keys differ.

    Field order is the wire order of docs/protocol.md and the hashing order: do not reorder.
    """

    model: str
    dtype: str
    layout: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1
    pp_stage: int = 0

    def to_wire(self) -> dict[str, str | int]:
        """The `namespace` map of a `register` request, fields in protocol order."""
        return dataclasses.asdict(self)

    def digest(self) -> bytes:
        """sha256 over the tag and every field (strings length-prefixed, integers u32 LE)."""
        h = hashlib.sha256(NAMESPACE_TAG)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str):
                raw = value.encode()
                h.update(_U32.pack(len(raw)) + raw)
            else:
                h.update(_pack_u32(field.name, value))
        return h.digest()


def _pack_u32(name: str, value: int) -> bytes:
    try:
        return _U32.pack(value)
    except struct.error:
        raise ValueError(f"namespace field `{name}` must be a u32, got {value!r}") from None


def chain_keys(
    namespace_digest: bytes,
    token_ids: Sequence[int],
    block_size: int,
    parent: bytes | None = None,
) -> list[bytes]:
    """One key per full block of `token_ids`, each chained from the previous one.

    Chaining makes a key name the whole prefix up to its block, so a hit on key i means the
    engine's blocks 0..i can all be reused. A trailing partial block gets no key. `parent` is
    the key of the block just before `token_ids` (None: they start the sequence), so a chain
    grows by its new blocks without hashing the old ones again.
    """
    if len(namespace_digest) != KEY_BYTES:
        raise ValueError(f"namespace digest must be {KEY_BYTES} bytes, got {len(namespace_digest)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if parent is not None and len(parent) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent)}")
    packed = _pack_blocks(token_ids, block_size)
    width = 4 * block_size
    keys: list[bytes] = []
    prev = parent if parent is not None else bytes(KEY_BYTES)
    for start in range(0, len(packed), width):
        prev = hashlib.sha256(namespace_digest + prev + packed[start : start + width]).digest()
        keys.append(prev)
    return keys


def _pack_blocks(token_ids: Sequence[int], block_size: int) -> bytes:
    """The full blocks' token ids as u32 LE, packed in one call (per block it costs as much as
    the hashing); a bad id is reported with its block."""
    tokens = len(token_ids) // block_size * block_size
    try:
        return struct.pack(f"<{tokens}I", *token_ids[:tokens])
    except struct.error:
        block = struct.Struct(f"<{block_size}I")
        for start in range(0, tokens, block_size):
            try:
                block.pack(*token_ids[start : start + block_size])
            except struct.error:
                raise ValueError(
                    f"token ids of block {start // block_size} must be u32: "
                    f"{list(token_ids[start : start + block_size])}"
                ) from None
        raise
