"""Worker half: owns the KV region, keeps each request's key chain, runs loads and saves.

Loads are asynchronous: submitted when the scheduler parks a request, reported finished (with
any blocks that did not arrive) once the node answered, so vLLM recomputes what is missing.
Saves are ordered before vLLM may reuse the blocks inside `wait_for_save`. On a GPU the worker
records an interprocess event per layer in `save_kv_layer` and the node's copies wait on them
GPU-side; the node answers once the copies are queued and the engine's stream waits on their
last event, so `wait_for_save` never waits on the host for the GPU. A load is answered at once
and each layer is waited for through the load progress board, so layer 0 computes while later
layers are still being enqueued.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..client import Client, Engine
from ..keys import Namespace, chain_keys
from ..progress import ProgressBoard
from .config import ConnectorConfig
from .layout import (
    KvShape,
    Region,
    UnsupportedLayout,
    export_cuda_tensors,
    layer_tensors,
    merge_cuda_tensors,
    shape_of_tensors,
    share_cpu_tensors,
)
from .metadata import PegaMetadata, Transfer
from .node_link import NodeLink, Reply

log = logging.getLogger("pegaflow.connector")


@dataclasses.dataclass
class WorkerStats:
    loaded_blocks: int = 0
    load_error_blocks: int = 0
    saved_blocks: int = 0  # newly stored by the node
    present_blocks: int = 0  # the node already held them
    dropped_blocks: int = 0  # the node had no free page
    save_error_blocks: int = 0


@dataclasses.dataclass
class _Load:
    future: concurrent.futures.Future[Reply]
    block_ids: list[int]
    deadline: float
    failed: bool = False  # the board said the node stopped before recording a layer


class WorkerSide:
    def __init__(
        self,
        config: ConnectorConfig,
        expected: KvShape,
        model: str,
        tp_rank: int,
        tp_size: int,
        forward_context: Mapping[str, Any],
        pp_stage: int = 0,
    ) -> None:
        self.config = config
        self.expected = expected
        self.block_size = expected.block_size
        self.model = model
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.pp_stage = pp_stage
        # MLA: every rank holds the same latent blocks under one namespace; rank 0 saves them.
        self.saves_blocks = tp_rank == 0 or not expected.shared_across_tp
        self.forward_context = forward_context
        self.namespace: Namespace | None = None
        self.region: Region | None = None
        self.engine: Engine | None = None
        self.link = NodeLink(config, "worker", on_connect=self._register)
        self._events: tuple[tuple[bytes, ...], list[Any]] = ((), [])
        # GPU: one interprocess event per layer, created once; the node opens their handles.
        self._layer_index: dict[str, int] = {}
        self._save_events: list[torch.cuda.Event] = []
        self._save_handles: list[bytes] = []
        self._recorded: set[int] = set()  # layers whose event was recorded this step
        self._board: ProgressBoard | None = None  # GPU: which layer events a load recorded
        self._saving = False  # this step's metadata has saves
        self.stats = WorkerStats()
        self._tokens: dict[str, list[int]] = {}
        self._keys: dict[str, list[bytes]] = {}
        self._loads: dict[str, _Load] = {}
        self._done_recving: set[str] = set()
        self._load_errors: set[int] = set()
        self._finished: set[str] = set()  # finished requests whose chains wait for their load
        self._applied: PegaMetadata | None = None
        self._last_log = time.monotonic()

    # ---- registration ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        """Describes the KV tensors, then registers them. CPU: they move into shared memory;
        GPU: layers vLLM allocated one by one move into one allocation (CUDA IPC shares one
        allocation per handle)."""
        names, tensors = layer_tensors(kv_caches)
        try:
            shape = shape_of_tensors(tensors, self.expected)
            if shape != self.expected:
                raise UnsupportedLayout(
                    f"KV tensors are {shape}, the scheduler derived {self.expected}"
                )
            if tensors[0].is_cuda:
                merge_cuda_tensors(tensors, self._layer_views())
                self.region = export_cuda_tensors(tensors, shape)
                self._create_save_events(names, tensors[0].device)
                self._board = ProgressBoard()
            else:
                self.region = share_cpu_tensors(tensors, self._layer_views(), shape)
        except UnsupportedLayout as exc:
            log.warning("PegaFlow worker: KV cache not supported (%s); connector off", exc)
            return
        self.namespace = shape.namespace(self.model, self.tp_rank, self.tp_size, self.pp_stage)
        self.link.client()

    def _create_save_events(self, names: list[str], device: torch.device) -> None:
        """The event ring a save's `after_events` index: slot `i` is layer `i`'s. Re-recording
        a slot next step is safe because `save` waits for the node's reply, and the node issued
        its waits before replying."""
        self._layer_index = {name: index for index, name in enumerate(names)}
        with torch.cuda.device(device):
            self._save_events = [torch.cuda.Event(interprocess=True) for _ in names]
            self._save_handles = [bytes(event.ipc_handle()) for event in self._save_events]

    def _layer_views(self) -> Iterable[torch.Tensor]:
        """Tensors the attention layers hold; they must follow the KV buffer into shared memory."""
        for layer in self.forward_context.values():
            cache = getattr(layer, "kv_cache", None)
            for tensor in cache if isinstance(cache, (list, tuple)) else [cache]:
                if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                    yield tensor

    def _register(self, client: Client) -> None:
        if self.region is None or self.namespace is None:
            return
        self.engine = client.register(
            self.namespace,
            region=self.region.region,
            num_blocks=self.region.num_blocks,
            segment_bytes=self.region.segment_bytes,
            layers=self.region.layers,
            engine_events=self._save_handles,
            load_progress=self._board.name if self._board is not None else None,
        )
        log.info(
            "PegaFlow worker: registered %d layers x %d blocks (%s, %s) with %s",
            len(self.region.layers),
            self.region.num_blocks,
            self.namespace.layout,
            self.namespace.dtype,
            self.config.socket_path,
        )

    # ---- per step -------------------------------------------------------------------------

    def apply_chains(self, meta: PegaMetadata) -> None:
        """Appends the step's tokens to each request's chain, once per metadata object."""
        if meta is self._applied:
            return
        self._applied = meta
        for ext in meta.chains:
            tokens = self._tokens.setdefault(ext.req_id, [])
            start = ext.first_block * self.block_size
            if len(tokens) < start:
                log.debug("PegaFlow worker: chain of %s has a gap; dropped", ext.req_id)
                self._tokens.pop(ext.req_id)
                continue
            del tokens[start:]
            tokens.extend(ext.token_ids)
            keys = self._keys.get(ext.req_id)
            if keys is not None:
                del keys[ext.first_block :]

    def start_loads(self, meta: PegaMetadata) -> None:
        self.apply_chains(meta)
        self._saving = bool(meta.saves)
        self._recorded.clear()
        for transfer in meta.loads:
            future = self._submit_load(transfer)
            if future is None:
                self._fail_load(transfer.req_id, transfer.block_ids)
            else:
                deadline = time.monotonic() + self.config.load_timeout_s
                self._loads[transfer.req_id] = _Load(future, transfer.block_ids, deadline)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layer-wise loading: called before a layer's attention reads its KV, so that layer `L`
        computes while `L + 1` still copies. The host waits for each load's reply, then (GPU, with
        a ticket) for the progress board to show the node recorded this layer's event; the
        current stream then waits GPU-side on that event. Host engines copy before replying. A
        load that failed or timed out is left to `finished`, which reports its blocks as load
        errors."""
        index = self._layer_index.get(layer_name)
        for load in self._loads.values():
            reply = self.link.wait(load.future, max(load.deadline - time.monotonic(), 0.0))
            slots = reply.get("event_slots") if reply is not None else None
            if load.failed or not slots or index is None or index >= len(slots):
                continue
            ticket = reply.get("ticket") if reply is not None else None
            if ticket is not None and not self._layer_recorded(slots[index], ticket, load):
                continue
            self._stream_waits_for(slots[index])

    def _layer_recorded(self, slot: int, ticket: int, load: _Load) -> bool:
        """Waits on the board for the node to record `slot` for the load `ticket`; a load the
        node gave up on (or that ran out of time) is marked failed."""
        if self._board is None or not self._board.wait(slot, ticket, load.deadline):
            load.failed = True
            return False
        return True

    def record_layer(self, layer_name: str) -> None:
        """GPU: marks, on the current stream, where this step's writes to the layer end; the
        node's copy of the layer waits on it. Only in steps that save, and never while a CUDA
        graph is being captured (the record would become part of the graph)."""
        index = self._layer_index.get(layer_name)
        if not self._saving or index is None or torch.cuda.is_current_stream_capturing():
            return
        assert self.region is not None
        self._save_events[index].record(torch.cuda.current_stream(self.region.device))
        self._recorded.add(index)

    def save(self, meta: PegaMetadata) -> None:
        """Saves the step's newly full blocks so vLLM can reuse them afterwards: on a GPU the
        node answers once the copies are queued and the engine's stream waits on the copies'
        last event, so nothing the engine runs next can overwrite a block still being read."""
        self.apply_chains(meta)
        recorded, self._recorded = self._recorded, set()
        if not meta.saves or self.engine is None or not self.saves_blocks:
            return
        after_events: list[int] = []
        if self.region is not None and self.region.device.type == "cuda":
            if self._save_events and len(recorded) == len(self._save_events):
                after_events = list(range(len(self._save_events)))
            else:  # a layer's event is missing: the node cannot wait GPU-side for it
                torch.cuda.current_stream(self.region.device).synchronize()
        keys, block_ids = self._save_batch(meta.saves)
        if not keys:
            return
        queued = {"after_events": after_events, "answer_when_queued": True} if after_events else {}
        future = self.link.submit(
            "save", engine=self.engine, keys=keys, block_ids=block_ids, **queued
        )
        reply = None if future is None else self.link.wait(future, self.config.save_timeout_s)
        if reply is None:
            self.stats.save_error_blocks += len(block_ids)
            return
        if reply.get("event_slots"):
            # The node's copy stream reads the blocks in order: its last event covers them all.
            self._stream_waits_for(reply["event_slots"][-1])
        self.stats.saved_blocks += reply["stored"]
        self.stats.present_blocks += reply["present"]
        self.stats.dropped_blocks += reply["dropped"]

    def _save_batch(self, saves: list[Transfer]) -> tuple[list[bytes], list[int]]:
        """Every request's new blocks of the step, as one save: one round trip, and on a GPU
        one reservation in the node's event ring, however many requests filled blocks."""
        keys: list[bytes] = []
        block_ids: list[int] = []
        for transfer in saves:
            own = self._transfer_keys(transfer)
            if own is None:
                self.stats.save_error_blocks += len(transfer.block_ids)
                continue
            keys += own
            block_ids += transfer.block_ids
        return keys, block_ids

    def _stream_waits_for(self, slot: int) -> None:
        """The engine's current stream waits (GPU-side, no host thread blocks) for the node's
        event in `slot`: a load's layer landed, or a save's copies read their blocks."""
        assert self.region is not None
        stream = torch.cuda.current_stream(self.region.device)
        stream.wait_event(self._layer_events()[slot])

    def finished(self, finished_req_ids: set[str]) -> set[str] | None:
        """Requests whose load ended (well or not); forgets the chains of finished requests."""
        now = time.monotonic()
        for req_id, load in list(self._loads.items()):
            if not load.future.done() and now < load.deadline:
                continue
            reply = self.link.wait(load.future, 0.0)
            if reply is not None and not self._copies_done(load, reply) and now < load.deadline:
                continue
            del self._loads[req_id]
            loaded = 0
            if reply is not None and not load.failed:
                loaded = min(reply["loaded"], len(load.block_ids))
            self.stats.loaded_blocks += loaded
            self._fail_load(req_id, load.block_ids[loaded:])
        self._finished |= finished_req_ids
        for req_id in self._finished - set(self._loads):
            self._tokens.pop(req_id, None)
            self._keys.pop(req_id, None)
        self._finished &= set(self._loads)
        done, self._done_recving = self._done_recving, set()
        self._maybe_log()
        return done or None

    def _copies_done(self, load: _Load, reply: Reply) -> bool:
        """GPU engines: the node answers with the event slot it records after each layer (once
        the copies are queued, or at once with a ticket); the last layer's event says the whole
        load ran (one stream, in order), once the board shows it recorded. Host engines copy
        before answering."""
        slots = reply.get("event_slots")
        if load.failed or not slots or self.engine is None or self.region is None:
            return True
        ticket = reply.get("ticket")
        if ticket is not None and self._board is not None:
            recorded = self._board.armed(slots[-1], ticket)
            if recorded is None:
                return False
            load.failed = not recorded
            if load.failed:
                return True
        return self._layer_events()[slots[-1]].query()

    def _layer_events(self) -> list[Any]:
        """The node's events for this engine, opened once per registration (a re-register after
        a node restart brings new handles)."""
        assert self.engine is not None and self.region is not None
        handles = tuple(self.engine.layer_events)
        if self._events[0] != handles:
            device = self.region.device
            self._events = (handles, [torch.cuda.Event.from_ipc_handle(device, h) for h in handles])
        return self._events[1]

    def load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _fail_load(self, req_id: str, block_ids: list[int]) -> None:
        self._done_recving.add(req_id)
        self._load_errors.update(block_ids)
        self.stats.load_error_blocks += len(block_ids)

    def _submit_load(self, transfer: Transfer) -> concurrent.futures.Future[Reply] | None:
        if self.engine is None:
            self.link.client()  # (re)connecting registers the region
        keys = self._transfer_keys(transfer)
        if self.engine is None or keys is None:
            return None
        return self.link.submit("load", engine=self.engine, keys=keys, block_ids=transfer.block_ids)

    def _transfer_keys(self, transfer: Transfer) -> list[bytes] | None:
        """The keys of the transfer's blocks; None while the request's tokens do not reach them."""
        end = transfer.first_block + len(transfer.block_ids)
        chain = self._chain(transfer.req_id, end)
        return None if chain is None else chain[transfer.first_block :]

    def _chain(self, req_id: str, blocks: int) -> list[bytes] | None:
        """The request's first `blocks` keys, extending its cached chain by the new blocks."""
        keys = self._keys.setdefault(req_id, [])
        if len(keys) < blocks:
            tokens = self._tokens.get(req_id, [])
            assert self.namespace is not None
            new = tokens[len(keys) * self.block_size : blocks * self.block_size]
            parent = keys[-1] if keys else None
            keys += chain_keys(self.namespace.digest(), new, self.block_size, parent)
        return keys[:blocks] if len(keys) >= blocks else None

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.config.stats_interval_s:
            self._last_log = now
            log.info("PegaFlow worker: %s", dataclasses.asdict(self.stats))

    def close(self) -> None:
        self.link.close()
        if self.region is not None and self.region.close is not None:
            self.region.close()
        if self._board is not None:
            self._board.close()
