"""`PegaHiCacheStorage`: SGLang HiCache's L3 storage backend on pegaflow-node.

SGLang loads it with `--hicache-storage-backend dynamic` (docs/sglang.md) and builds it as
`PegaHiCacheStorage(storage_config, kwargs)`, then hands it the host memory pool. The pool's
memory is registered with the node once, so the zero-copy calls (`batch_get_v1`,
`batch_set_v1`) send only keys and page numbers: the node copies the bytes. The generic calls
(`get`, `set`, ...) go through a small staging region of the same layout. A node that is down
costs one warning and turns every call into a miss or a failed write; SGLang then recomputes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from ..client import Client, Engine
from ..errors import PegaFlowError
from ..host_engine import HostKvRegion
from ..keys import Namespace
from ..vllm.config import DEFAULT_SOCKET, ConnectorConfig
from ..vllm.node_link import NodeLink
from .host_pool import PoolLayout, SharedBuffer, UnsupportedPool, describe_pool, share_in_place
from .page_keys import page_key

log = logging.getLogger("pegaflow.sglang")

# Keys of --hicache-storage-backend-extra-config that SGLang itself reads.
SGLANG_KEYS = frozenset(
    {
        "backend_name",
        "module_path",
        "class_name",
        "interface_v1",
        "allocator",
        "tp_lcm_size",
        "prefetch_threshold",
        "prefetch_timeout_base",
        "prefetch_timeout_per_ki_token",
        "hicache_storage_pass_prefix_keys",
    }
)


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """Our keys of `--hicache-storage-backend-extra-config`; see docs/sglang.md."""

    socket_path: str = DEFAULT_SOCKET
    model_id: str | None = None
    connect_timeout_s: float = 2.0
    lookup_timeout_s: float = 1.0
    transfer_timeout_s: float = 30.0
    retry_interval_s: float = 10.0
    pages_per_request: int = 32
    staging_pages: int = 8

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> StorageOptions:
        """Reads our keys, checking types; SGLang's keys pass, others get a warning.

        Unknown keys are not an error (unlike the vLLM connector's options): the dict is shared
        with SGLang, whose own keys change between versions.
        """
        extra = dict(extra or {})
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(fields) - SGLANG_KEYS)
        if unknown:
            log.warning(
                "PegaFlow sglang: extra-config key(s) %s ignored; ours: %s", unknown, sorted(fields)
            )
        values: dict[str, Any] = {}
        for name in fields.keys() & extra.keys():
            value, default = extra[name], fields[name].default
            if isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"hicache extra-config `{name}` must be a positive number")
                value = float(value)
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(f"hicache extra-config `{name}` must be a positive integer")
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"hicache extra-config `{name}` must be a string")
            values[name] = value
        return cls(**values)


@dataclasses.dataclass
class StorageStats:
    """Pages asked for and moved since start (`PegaHiCacheStorage.stats()`)."""

    looked_up_pages: int = 0
    hit_pages: int = 0
    loaded_pages: int = 0
    load_failed_pages: int = 0
    saved_pages: int = 0
    save_failed_pages: int = 0


class PegaHiCacheStorage(HiCacheStorage):
    """HiCache pages stored in pegaflow-node, shared across engines and engine restarts."""

    def __init__(
        self, storage_config: HiCacheStorageConfig, kwargs: Mapping[str, Any] | None = None
    ) -> None:
        """SGLang's dynamic factory calls `backend_class(storage_config, kwargs)`; `kwargs` are
        its further arguments, of which none concern this backend."""
        self.storage_config = storage_config
        self.options = StorageOptions.from_extra(storage_config.extra_config)
        self.stats_counters = StorageStats()
        self.layout: PoolLayout | None = None
        self.namespace: Namespace | None = None
        self._digest = b""
        self._shared: SharedBuffer | None = None
        self._engine: Engine | None = None
        self._staging: HostKvRegion | None = None
        self._staging_engine: Engine | None = None
        self._staging_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        link_config = ConnectorConfig(
            socket_path=self.options.socket_path,
            connect_timeout_s=self.options.connect_timeout_s,
            retry_interval_s=self.options.retry_interval_s,
        )
        self._link = NodeLink(link_config, "sglang", on_connect=self._register)

    # ---- setup ----------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Describes the host pool and moves its memory into shared memory the node maps."""
        super().register_mem_pool_host(mem_pool_host)
        config = self.storage_config
        try:
            if config.attn_cp_size > 1 or config.dcp_size > 1 or config.should_split_heads:
                raise UnsupportedPool("context parallelism or split heads")
            layout = describe_pool(mem_pool_host)
            empty = mem_pool_host.available_size() >= mem_pool_host.size
            shared = share_in_place(mem_pool_host.kv_buffer, keep_contents=not empty)
        except (UnsupportedPool, OSError) as exc:
            log.warning("PegaFlow sglang: storage off, every page misses: %s", exc)
            return
        model = self.options.model_id or config.model_name or ""
        self.layout, self._shared = layout, shared
        self.namespace = layout.namespace(model, config.tp_rank, config.tp_size, config.pp_rank)
        self._digest = self.namespace.digest()
        log.info(
            "PegaFlow sglang: %s, %d pages of %d tokens",
            self.namespace,
            layout.num_pages,
            layout.page_size,
        )
        self._link.client()  # connect and register now, not on the first request

    def _register(self, client: Client) -> None:
        """Registers the host pool on a new client (NodeLink's on_connect); the client
        registers it again by itself after a reconnect."""
        assert self.layout is not None and self.namespace is not None and self._shared
        try:
            self._engine = client.register(
                self.namespace,
                region={"shm": self._shared.name, "bytes": self._shared.bytes},
                num_blocks=self.layout.num_pages,
                segment_bytes=self.layout.segment_bytes,
                layers=self.layout.layers,
            )
            if self._staging is not None:
                self._staging_engine = self._staging.register(client)
        except BaseException:
            client.close()
            raise

    def close(self) -> None:
        """Disconnects (the node drops this engine) and removes the shared-memory files."""
        self._link.close()
        if self._staging is not None:
            self._staging.close()
            self._staging.unlink()
            self._staging = None
        if self._shared is not None:
            self._shared.close()

    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            return dataclasses.asdict(self.stats_counters)

    # ---- zero-copy interface (interface_v1) -----------------------------------------------

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """How many leading pages of `keys` the node holds."""
        wire = self._wire_keys(keys)
        hits = 0
        if wire:
            reply = self._wait(
                self._link.submit("lookup", keys=wire), self.options.lookup_timeout_s
            )
            hits = reply["hits"] if reply else 0
        self._count(looked_up_pages=len(keys), hit_pages=hits)
        return hits

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Loads pages into the host pool's slots `host_indices` (`page_size` per key)."""
        done = self._transfer("load", keys, self._page_ids(host_indices, len(keys)))
        self._count(loaded_pages=sum(done), load_failed_pages=len(keys) - sum(done))
        return done

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Saves the host pool's pages at `host_indices` under `keys`."""
        done = self._transfer("save", keys, self._page_ids(host_indices, len(keys)))
        self._count(saved_pages=sum(done), save_failed_pages=len(keys) - sum(done))
        return done

    # ---- generic interface (copies through a staging region) --------------------------------

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(
        self,
        key: str,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(
        self,
        keys: list[str],
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> list[torch.Tensor | None]:
        """Flat data pages (the pool's `get_data_page` format); None from the first miss on."""
        targets = list(target_locations or [None] * len(keys))
        results: list[torch.Tensor | None] = [None] * len(keys)
        with self._staging_lock:
            staging = self._staging_region()
            step = self.options.staging_pages
            for start in range(0, len(keys), step):
                batch = keys[start : start + step]
                loaded = sum(self._transfer("load", batch, list(range(len(batch))), staging))
                for i in range(loaded):
                    results[start + i] = self._read_staged(i, targets[start + i])
                if loaded < len(batch):
                    break
        self._count(loaded_pages=sum(r is not None for r in results))
        return results

    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Saves flat data pages; True only if every page is stored."""
        pages = list(values or [])
        if len(pages) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(pages)} values")
        stored = 0
        with self._staging_lock:
            staging = self._staging_region()
            step = self.options.staging_pages
            for start in range(0, len(keys), step):
                batch = keys[start : start + step]
                if self._staging_engine is not None:
                    for i, page in enumerate(pages[start : start + step]):
                        self._write_staged(i, page)
                stored += sum(self._transfer("save", batch, list(range(len(batch))), staging))
        self._count(saved_pages=stored, save_failed_pages=len(keys) - stored)
        return stored == len(keys)

    # ---- helpers --------------------------------------------------------------------------

    def _wire_keys(self, keys: Sequence[str]) -> list[bytes]:
        """Node keys of the leading `keys` that are page hashes; empty before registration."""
        if self.layout is None:
            return []
        wire = []
        for key in keys:
            node_key = page_key(self._digest, key)
            if node_key is None:
                log.warning(
                    "PegaFlow sglang: key %r is not a SHA-256 page hash; treated as a miss", key
                )
                break
            wire.append(node_key)
        return wire

    def _page_ids(self, host_indices: torch.Tensor, num_keys: int) -> list[int] | None:
        """Host pool page numbers, one per key; None unless each key has one whole page."""
        if self.layout is None:
            return None
        size = self.layout.page_size
        slots = host_indices.detach().to("cpu", torch.int64).flatten()
        if slots.numel() != num_keys * size:
            log.warning(
                "PegaFlow sglang: %d host slots for %d pages of %d", slots.numel(), num_keys, size
            )
            return None
        pages = slots.view(num_keys, size)
        first = pages[:, :1]
        whole = bool((first % size == 0).all()) and bool(
            (pages - first == torch.arange(size)).all()
        )
        if not whole:
            log.warning("PegaFlow sglang: host slots are not whole pages; treated as a miss")
            return None
        return (first.flatten() // size).tolist()

    def _transfer(
        self,
        op: str,
        keys: Sequence[str],
        page_ids: list[int] | None,
        region: HostKvRegion | None = None,
    ) -> list[bool]:
        """Per key, whether `op` moved its page: requests of `pages_per_request` pipelined.

        A load reports the leading pages the node held; a save counts only when nothing of its
        request was dropped. Waits for every reply, so no copy still runs on a page SGLang
        gets back (up to `transfer_timeout_s`, after which the node is considered down).
        """
        done = [False] * len(keys)
        engine = self._engine if region is None else self._staging_engine
        wire = self._wire_keys(keys)
        if page_ids is None or not wire or (region is None and self._shared is None):
            return done
        if self._link.client() is None or engine is None:
            return done
        step = self.options.pages_per_request
        pending: list[tuple[int, int, concurrent.futures.Future[dict[str, Any]] | None]] = []
        for start in range(0, len(wire), step):
            count = min(step, len(wire) - start)
            future = self._link.submit(
                op,
                engine=engine,
                keys=wire[start : start + count],
                block_ids=page_ids[start : start + count],
            )
            pending.append((start, count, future))
        for start, count, future in pending:
            reply = self._wait(future, self.options.transfer_timeout_s)
            if reply is None:
                continue
            moved = reply["loaded"] if op == "load" else (0 if reply["dropped"] else count)
            done[start : start + moved] = [True] * moved
        return done

    def _wait(
        self, future: concurrent.futures.Future[dict[str, Any]] | None, timeout: float
    ) -> dict[str, Any] | None:
        return None if future is None else self._link.wait(future, timeout)

    def _staging_region(self) -> HostKvRegion | None:
        """The staging region of the generic calls, made and registered on first use."""
        if self._staging is None and self.namespace is not None:
            self._staging = HostKvRegion(self.namespace, self.options.staging_pages)
            client = self._link.client()
            if client is not None:
                try:
                    self._staging_engine = self._staging.register(client)
                except PegaFlowError as exc:
                    log.warning("PegaFlow sglang: staging region refused: %s", exc)
        return self._staging

    def _read_staged(self, block: int, target: torch.Tensor | None) -> torch.Tensor:
        """Staging block `block` as the pool's flat data page, written into `target` if given."""
        assert self.layout is not None and self._staging is not None
        layout = self.layout
        node_shape = tuple(layout.flat_shape[i] for i in layout.to_node_order)
        raw = torch.frombuffer(bytearray(self._staging.block_bytes(block)), dtype=torch.uint8)
        dtype = self.mem_pool_host.dtype
        page = raw.view(dtype).view(node_shape).permute(_inverse(layout.to_node_order)).flatten()
        if target is None:
            return page.clone()
        target.view(-1).copy_(page)
        return target

    def _write_staged(self, block: int, value: torch.Tensor) -> None:
        assert self.layout is not None and self._staging is not None
        page = value.reshape(self.layout.flat_shape).permute(self.layout.to_node_order)
        raw = page.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        self._staging.write_block(block, raw)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats_counters, name, getattr(self.stats_counters, name) + delta)


def _inverse(permutation: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(permutation)
    for position, axis in enumerate(permutation):
        inverse[axis] = position
    return tuple(inverse)
