"""A minimal paged inference engine that uses PegaFlow through the vLLM connector's own halves.

It stands in for vLLM where vLLM cannot run (the GPU benchmark host has no vLLM and no
internet). What the connector sees is what vLLM would show it:

- KV cache: one allocation for every layer, block-major and token-major inside a block, handed
  to `WorkerSide.register_kv_caches` as vLLM's FlashAttention backend hands it: a dict of layer
  name -> `(num_blocks, num_kv_heads, block_size, 2 * head_dim)` view (`vllm_lbnhc`).
- Calls, in vLLM's order: `SchedulerSide.num_new_matched_tokens` (vLLM's
  `get_num_new_matched_tokens`), `after_alloc` (`update_state_after_alloc`), `build_meta`
  (`build_connector_meta`) with a scheduler output of the fields the connector reads; then
  `WorkerSide.start_loads` (`start_load_kv`), per layer `wait_for_layer_load` and `record_layer`
  (`save_kv_layer`), `save` (`wait_for_save`), `finished` (`get_finished`), `load_errors`
  (`get_block_ids_with_load_errors`).

Two departures from vLLM, both on purpose:

- A hit is loaded layer by layer inside the step that computes the rest of the prompt (vLLM's
  synchronous load path), so layer L computes while L + 1 copies. The connector's scheduler
  asks for an asynchronous load; this engine does not park the request for it.
- A prompt is prefilled in two steps, split at the last block boundary before its final token
  (vLLM's chunked prefill also splits long prompts). That boundary is where the longest
  possible hit ends, so a warm request computes exactly the step a cold one computes last, and
  its token and logits must come out bit-identical: the benchmark and the tests check that.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Any

import torch
from pegaflow.vllm.config import ConnectorConfig
from pegaflow.vllm.layout import KvShape
from pegaflow.vllm.metadata import PegaMetadata
from pegaflow.vllm.scheduler import SchedulerSide
from pegaflow.vllm.worker import WorkerSide

from llama import DTYPE, LayerHooks, Llama, ModelConfig

BLOCK_SIZE = 16


@dataclasses.dataclass
class Request:
    """The fields of vLLM's `Request` the connector reads; no decode tokens (TTFT ends at the
    first one)."""

    request_id: str
    prompt_token_ids: list[int]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclasses.dataclass
class Served:
    token: int  # greedy
    logits: torch.Tensor  # of the last prompt token, on the device
    finished_at: float  # perf_counter once the token was on the host
    hit_tokens: int  # the connector's hit (loaded), 0 without it
    recomputed_tokens: int  # loaded tokens whose load failed and were computed instead


def layer_names(config: ModelConfig) -> list[str]:
    return [f"model.layers.{index}.self_attn.attn" for index in range(config.num_layers)]


def allocate_kv_caches(
    config: ModelConfig, num_blocks: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """vLLM's FlashAttention KV cache: one buffer, layer-outermost, each layer's blocks
    `(block_size, kv_heads, 2 * head_dim)` in memory, seen through vLLM's logical
    `(num_blocks, kv_heads, block_size, 2 * head_dim)` view."""
    shape = (
        config.num_layers,
        num_blocks,
        BLOCK_SIZE,
        config.num_kv_heads,
        2 * config.head_dim,
    )
    buffer = torch.zeros(shape, dtype=DTYPE, device=device)
    return {name: buffer[i].permute(0, 2, 1, 3) for i, name in enumerate(layer_names(config))}


def model_id(config: ModelConfig, seed: int) -> str:
    """The namespace's model: engines with other weights (seed) never share blocks."""
    return f"pegaflow-scenarios/{config.name}/random-seed-{seed}"


def kv_shape(config: ModelConfig) -> KvShape:
    """What vLLM's KV cache config tells the connector's scheduler half."""
    return KvShape("bf16", "vllm_lbnhc", BLOCK_SIZE, config.num_layers, config.num_kv_heads,
                   config.head_dim)  # fmt: skip


class BlockPool:
    """Free KV block ids, reused oldest-freed first like vLLM's free block queue."""

    def __init__(self, num_blocks: int) -> None:
        self.free = collections.deque(range(num_blocks))

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free):
            raise RuntimeError(f"out of KV blocks: {count} wanted, {len(self.free)} free")
        return [self.free.popleft() for _ in range(count)]

    def release(self, block_ids: list[int]) -> None:
        self.free.extend(block_ids)


@dataclasses.dataclass
class _NewRequest:
    """vLLM's `NewRequestData`, the fields the connector reads."""

    req_id: str
    block_ids: tuple[list[int]]
    num_computed_tokens: int


@dataclasses.dataclass
class _CachedRequests:
    """vLLM's `CachedRequestData` (no new blocks: a request gets all of them up front)."""

    req_ids: list[str]
    new_block_ids: list[None]
    num_computed_tokens: list[int]
    resumed_req_ids: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class _SchedulerOutput:
    """vLLM's `SchedulerOutput` of a step that runs one request's tokens `[start, end)`."""

    scheduled_new_reqs: list[_NewRequest]
    scheduled_cached_reqs: _CachedRequests
    num_scheduled_tokens: dict[str, int]
    scheduled_spec_decode_tokens: dict[str, list[int]]

    @classmethod
    def step(
        cls, request: Request, block_ids: list[int], start: int, end: int, first: bool
    ) -> _SchedulerOutput:
        rid = request.request_id
        new = [_NewRequest(rid, (block_ids,), start)] if first else []
        cached = _CachedRequests([], [], []) if first else _CachedRequests([rid], [None], [start])
        return cls(new, cached, {rid: end - start}, {})


@dataclasses.dataclass
class _Blocks:
    """vLLM's `KVCacheBlocks` as `update_state_after_alloc` reads it."""

    block_ids: list[int]

    def get_block_ids(self) -> tuple[list[int]]:
        return (self.block_ids,)


class Connector:
    """PegaFlow's scheduler and worker halves, called where vLLM calls `PegaKVConnector`."""

    def __init__(self, socket_path: str, config: ModelConfig, model_id: str) -> None:
        options = ConnectorConfig(socket_path=socket_path, stats_interval_s=3600.0)
        shape = kv_shape(config)
        self.socket_path = socket_path
        self.scheduler = SchedulerSide(options, shape, model_id, tp_size=1)
        # The engine reads its KV only through the registered tensors: no other views to move.
        self.worker = WorkerSide(options, shape, model_id, tp_rank=0, tp_size=1,
                                 forward_context={})  # fmt: skip

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)
        if self.worker.engine is None:
            raise RuntimeError(
                f"the PegaFlow worker could not register its KV cache with the node at "
                f"{self.socket_path} (see the warning logged above)"
            )

    def lookup(self, request: Request, block_ids: list[int]) -> int:
        """Tokens of the prompt the node holds (to be loaded into `block_ids`)."""
        hit, _ = self.scheduler.num_new_matched_tokens(request, 0)
        self.scheduler.after_alloc(request, _Blocks(block_ids), hit)
        return hit

    def begin_step(self, output: _SchedulerOutput) -> PegaMetadata:
        meta = self.scheduler.build_meta(output)
        self.worker.start_loads(meta)
        return meta

    def end_step(self, meta: PegaMetadata) -> set[int]:
        """Finishes the step's saves; returns the block ids whose load failed."""
        self.worker.save(meta)
        done = self.worker.finished(set())
        if done:
            self.scheduler.finished_recving(done)
        return self.worker.load_errors()

    def finish(self, request: Request) -> None:
        self.scheduler.request_finished(request)
        self.worker.finished({request.request_id})

    def close(self) -> None:
        self.scheduler.close()
        self.worker.close()


class ConnectorHooks(LayerHooks):
    """The connector's per-layer calls: wait for the layer's load, mark the end of its writes."""

    def __init__(self, worker: WorkerSide, names: list[str]) -> None:
        self.worker = worker
        self.names = names

    def before_attention(self, layer: int) -> None:
        self.worker.wait_for_layer_load(self.names[layer])

    def after_attention(self, layer: int) -> None:
        self.worker.record_layer(self.names[layer])


class Trace:
    """Timestamps of one request, in ms since it started, for the per-layer timeline.

    GPU: CUDA timing events, recorded on whichever stream is current, read once the request is
    done. The anchor event is recorded at the request's start on an idle GPU, so it fires when
    the host records it and host instants (perf_counter) map onto the event clock to within a
    launch latency (~10 us). CPU: the host clock for everything.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._probe = torch.cuda.Stream(device) if self.cuda else None
        self.host_start = time.perf_counter()
        self.anchor = self._stamp()
        self.layers: dict[str, dict[int, Any]] = collections.defaultdict(dict)
        self.instants: dict[str, float] = {"request_start": self.host_start}

    def _stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, what: str, layer: int) -> None:
        """`what` happened to `layer` now, on the current stream."""
        self.layers[what][layer] = self._stamp()

    def instant(self, what: str) -> None:
        """A host-side moment; the first time counts."""
        self.instants.setdefault(what, time.perf_counter())

    def probe(self) -> contextlib.AbstractContextManager[Any]:
        """A side stream that only waits for loads: its marks say when a copy landed, whatever
        the compute stream was doing."""
        return (
            torch.cuda.stream(self._probe) if self._probe is not None else contextlib.nullcontext()
        )

    def result(self) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize()

        def ms(stamp: Any) -> float:
            if self.cuda:
                return self.anchor.elapsed_time(stamp)
            return (stamp - self.host_start) * 1e3

        return {
            "layers": {what: [ms(s[i]) for i in sorted(s)] for what, s in self.layers.items()},
            "instants": {k: (v - self.host_start) * 1e3 for k, v in self.instants.items()},
        }


class TracedHooks(LayerHooks):
    """Wraps a step's hooks with Trace marks; the load wait runs on the probe stream first."""

    def __init__(self, inner: LayerHooks, trace: Trace) -> None:
        self.inner = inner
        self.trace = trace

    def layer_start(self, layer: int) -> None:
        self.trace.mark("layer_start", layer)

    def before_attention(self, layer: int) -> None:
        self.trace.mark("wait_start", layer)
        with self.trace.probe():
            self.inner.before_attention(layer)
            self.trace.mark("copy_done", layer)
        self.trace.instant("load_reply")
        self.inner.before_attention(layer)
        self.trace.mark("attention_start", layer)

    def after_attention(self, layer: int) -> None:
        self.trace.mark("attention_end", layer)
        self.inner.after_attention(layer)

    def layer_end(self, layer: int) -> None:
        self.trace.mark("layer_end", layer)


class PagedEngine:
    """One model, one paged KV cache, requests served one at a time, first come first served."""

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device,
        seed: int,
        num_blocks: int,
        socket_path: str | None,
    ) -> None:
        self.config = config
        self.device = device
        self.model = Llama(config, device, seed)
        self.names = layer_names(config)
        kv_caches = allocate_kv_caches(config, num_blocks, device)
        self.blocks = BlockPool(num_blocks)
        self.connector: Connector | None = None
        if socket_path is not None:
            self.connector = Connector(socket_path, config, model_id(config, seed))
            self.connector.register(kv_caches)  # CPU: moves the tensors into shared memory
        self.kv_caches = [kv_caches[name] for name in self.names]

    def serve(
        self, request: Request, use_connector: bool = True, trace: Trace | None = None
    ) -> Served:
        """Prefills the prompt and returns its first token."""
        connector = self.connector if use_connector else None
        block_ids = self.blocks.allocate(-(-request.num_tokens // BLOCK_SIZE))
        try:
            hit = connector.lookup(request, block_ids) if connector is not None else 0
            if trace is not None:
                trace.instant("lookup_done")
            hidden, recomputed = self._prefill(request, block_ids, hit, connector, trace)
            logits = self.model.logits(hidden)
            token = int(logits.argmax())
            finished_at = time.perf_counter()
            if trace is not None:
                trace.instant("token")
        finally:
            if connector is not None:
                connector.finish(request)
            self.blocks.release(block_ids)
        return Served(token, logits, finished_at, hit, recomputed)

    def _prefill(
        self,
        request: Request,
        block_ids: list[int],
        computed: int,
        connector: Connector | None,
        trace: Trace | None,
    ) -> tuple[torch.Tensor, int]:
        """Runs the prompt's steps from `computed` tokens on (see the module docstring for the
        split); returns the last token's hidden state and the loaded tokens recomputed after a
        failed load."""
        total = request.num_tokens
        split = (total - 1) // BLOCK_SIZE * BLOCK_SIZE
        slots = self._slots(block_ids, total)
        first, recomputed, step, layer_trace = True, 0, 0, trace
        while True:
            end = split if computed < split else total
            output = _SchedulerOutput.step(request, block_ids, computed, end, first)
            if trace is not None:
                trace.mark("step_start", step)
            hidden, failed = self._step(
                request, output, computed, slots[:end], connector, layer_trace
            )
            if trace is not None:
                trace.mark("step_end", step)  # after the step's saves, as the stream sees them
            first, step, layer_trace = False, step + 1, None  # layer marks: the first step only
            failed_at = [i for i, block in enumerate(block_ids) if block in failed]
            if failed_at:  # vLLM's kv_load_failure_policy "recompute"
                recomputed += computed - failed_at[0] * BLOCK_SIZE
                computed = failed_at[0] * BLOCK_SIZE
            elif end == total:
                return hidden, recomputed
            else:
                computed = end

    def _step(
        self,
        request: Request,
        output: _SchedulerOutput,
        start: int,
        slots: torch.Tensor,
        connector: Connector | None,
        trace: Trace | None,
    ) -> tuple[torch.Tensor, set[int]]:
        """One engine step over the prompt's tokens `[start, len(slots))`: the connector's loads
        start, the model runs (each layer waiting for its load), the saves finish. Returns the
        last token's hidden state and the block ids that failed to load."""
        hooks = LayerHooks()
        meta = None
        if connector is not None:
            meta = connector.begin_step(output)
            hooks = ConnectorHooks(connector.worker, self.names)
        if trace is not None:
            trace.instant("load_submitted")
            hooks = TracedHooks(hooks, trace)
        token_ids = torch.tensor(request.prompt_token_ids[start : len(slots)], device=self.device)
        hidden = self.model.forward(token_ids, self.kv_caches, slots, hooks)
        failed = connector.end_step(meta) if connector is not None and meta is not None else set()
        return hidden, failed

    def _slots(self, block_ids: list[int], tokens: int) -> torch.Tensor:
        """The cache slot of each prompt position."""
        positions = torch.arange(tokens, device=self.device)
        blocks = torch.tensor(block_ids, device=self.device)
        return blocks[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE

    def close(self) -> None:
        """Closes the node connections and, on CPU, removes the shared-memory KV file."""
        if self.connector is not None:
            self.connector.close()

    def __enter__(self) -> PagedEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
