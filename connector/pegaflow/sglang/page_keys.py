"""Block keys for SGLang HiCache pages.

HiCache hands a storage backend its own page hashes, never the token ids: `h_0 = sha256(tokens_0)`,
`h_i = sha256(h_{i-1} || tokens_i)`, token ids as u32 LE, hex-encoded
(`sglang.srt.mem_cache.utils.get_hash_str`; a request with `extra_key` or `cache_salt` starts the
chain from a 32-byte seed instead of nothing). PegaFlow's token chain (docs/protocol.md "Keys")
hashes the namespace into every link, so it cannot be derived from these hashes. A page's key is
therefore `sha256(namespace || h_i)`: one key per prefix as before, separated by namespace
(model, dtype, layout, ranks), and computable by any client that has the token ids
(`token_keys`). Keys of the two schemes never collide: their SHA-256 inputs differ in length
(64 bytes here, at least 68 for the token chain).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from ..keys import KEY_BYTES

_HEX_DIGITS = frozenset("0123456789abcdef")


def page_key(namespace_digest: bytes, page_hash: str) -> bytes | None:
    """The key of one HiCache page, or None when `page_hash` is not a SHA-256 hex digest."""
    if len(page_hash) != 2 * KEY_BYTES or not _HEX_DIGITS.issuperset(page_hash):
        return None
    return hashlib.sha256(namespace_digest + bytes.fromhex(page_hash)).digest()


def page_hashes(token_ids: Sequence[int], page_size: int, seed: bytes | None = None) -> list[str]:
    """SGLang's page hashes of every full page of `token_ids`, as HiCache computes them."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    page = struct.Struct(f"<{page_size}I")
    prior = seed or b""
    hashes = []
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        try:
            tokens = page.pack(*token_ids[start : start + page_size])
        except struct.error:
            raise ValueError(f"token ids of page {start // page_size} must be u32") from None
        prior = hashlib.sha256(prior + tokens).digest()
        hashes.append(prior.hex())
    return hashes


def token_keys(namespace_digest: bytes, token_ids: Sequence[int], page_size: int) -> list[bytes]:
    """The keys PegaHiCacheStorage uses for these tokens' pages, for clients with token ids."""
    keys = [page_key(namespace_digest, h) for h in page_hashes(token_ids, page_size)]
    return [key for key in keys if key is not None]
