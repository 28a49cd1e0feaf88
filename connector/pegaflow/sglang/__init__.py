"""SGLang integration: `PegaHiCacheStorage`, a HiCache L3 storage backend (docs/sglang.md).

`storage` (the backend and its options), `host_pool` (the host pool's layout and its move into
shared memory), `page_keys` (node keys from HiCache's page hashes). The backend is imported on
first use, so `page_keys` serves clients without SGLang (e.g. an engine that has token ids).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PegaHiCacheStorage", "StorageOptions"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import storage

        return getattr(storage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
