"""Scheduler half: looks prompts up, plans async loads and saves of newly full blocks.

Runs in vLLM's engine-core process, single-threaded, on every scheduling step, so every call
to the node is bounded by a timeout and skipped entirely while the node is down.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ..keys import Namespace, chain_keys
from .config import ConnectorConfig
from .layout import KvShape
from .metadata import ChainExtension, PegaMetadata, Transfer
from .node_link import NodeLink

log = logging.getLogger("pegaflow.connector")

# The `kv_transfer_params` key of the P/D handoff: `true` in a request asks for the keys of its
# stored prompt blocks, which come back under the same key in the response (docs/pd.md).
HANDOFF = "pegaflow_handoff"


@dataclasses.dataclass
class _Request:
    """What the scheduler tracks per live request."""

    request: Any  # vllm.v1.request.Request, kept for its growing token ids
    block_ids: list[int] = dataclasses.field(default_factory=list)
    sent_blocks: int = 0  # blocks whose tokens the workers already have
    saved_blocks: int = 0  # blocks saved or loaded: never saved again
    hit_blocks: int = 0  # from the last lookup
    leases: list[int] = dataclasses.field(default_factory=list)
    load: Transfer | None = None


@dataclasses.dataclass
class SchedulerStats:
    lookups: int = 0
    looked_up_tokens: int = 0  # prompt tokens asked about (beyond vLLM's own prefix cache)
    hit_tokens: int = 0  # tokens promised from PegaFlow
    saved_blocks_planned: int = 0


class SchedulerSide:
    def __init__(
        self,
        config: ConnectorConfig,
        shape: KvShape,
        model: str,
        tp_size: int,
        stage_layers: list[int] | None = None,
    ) -> None:
        """`stage_layers`: KV layers of each pipeline stage (default: one stage, `shape`'s)."""
        self.config = config
        self.block_size = shape.block_size
        # One namespace per pipeline stage and tensor-parallel rank: a prefix is a hit only if
        # every one holds it. MLA's ranks share one (their latent caches are identical).
        stages = stage_layers or [shape.num_layers]
        self.namespaces: list[Namespace] = list(
            dict.fromkeys(
                dataclasses.replace(shape, num_layers=layers).namespace(model, rank, tp_size, stage)
                for stage, layers in enumerate(stages)
                for rank in range(tp_size)
            )
        )
        self.digests = [ns.digest() for ns in self.namespaces]
        self.link = NodeLink(config, "scheduler")
        self.requests: dict[str, _Request] = {}
        self.stats = SchedulerStats()
        self._last_log = time.monotonic()

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        state = self.requests.get(request.request_id)
        if state is None:
            state = self.requests[request.request_id] = _Request(request)
        self._release(state)
        # At least one prompt token must stay uncached: vLLM computes it to sample the next one.
        max_blocks = (request.num_tokens - 1) // self.block_size
        if max_blocks * self.block_size <= num_computed_tokens:
            return 0, False
        self.stats.lookups += 1
        self.stats.looked_up_tokens += request.num_tokens - num_computed_tokens
        tokens = list(request.all_token_ids[: max_blocks * self.block_size])
        futures = []
        for digest in self.digests:
            keys = chain_keys(digest, tokens, self.block_size)
            future = self.link.submit("lookup", keys=keys, lease=True)
            if future is None:
                return 0, False
            futures.append(future)
        hits = max_blocks
        for future in futures:
            reply = self.link.wait(future, self.config.lookup_timeout_s)
            if reply is None:
                hits = 0
                continue
            if reply.get("lease") is not None:
                state.leases.append(reply["lease"])
            hits = min(hits, reply["hits"])
        hit_tokens = hits * self.block_size
        if hit_tokens <= num_computed_tokens:
            self._release(state)
            return 0, False
        state.hit_blocks = hits
        self.stats.hit_tokens += hit_tokens - num_computed_tokens
        return hit_tokens - num_computed_tokens, True

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        state = self.requests.get(request.request_id)
        if state is None:
            return
        state.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens == 0:
            self._release(state)
            return
        end = state.hit_blocks
        first = end - num_external_tokens // self.block_size
        state.load = Transfer(request.request_id, first, state.block_ids[first:end])
        state.saved_blocks = max(state.saved_blocks, end)

    def build_meta(self, scheduler_output: Any) -> PegaMetadata:
        meta = PegaMetadata()
        for state in self.requests.values():
            if state.load is not None:
                self._send_tokens(meta, state, state.load.first_block + len(state.load.block_ids))
                meta.loads.append(state.load)
                state.load = None
        if self.config.save:
            self._plan_saves(meta, scheduler_output)
        self._maybe_log()
        return meta

    def _plan_saves(self, meta: PegaMetadata, out: Any) -> None:
        computed: dict[str, int] = {}
        for new in out.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                computed[new.req_id] = new.num_computed_tokens
        cached = out.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        flags = getattr(cached, "resumed_from_preemption", None)  # older vLLM spelling
        if flags:
            resumed.update(r for r, flag in zip(cached.req_ids, flags, strict=False) if flag)
        for index, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[index]
            if req_id in resumed:
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])
            computed[req_id] = cached.num_computed_tokens[index]
        spec = out.scheduled_spec_decode_tokens
        for req_id, before in computed.items():
            state = self.requests[req_id]
            scheduled = out.num_scheduled_tokens.get(req_id, 0) - len(spec.get(req_id, ()))
            request = state.request
            limit = request.num_tokens if self.config.save_decode else request.num_prompt_tokens
            full = min(before + scheduled, limit, len(state.block_ids) * self.block_size)
            full //= self.block_size
            if full <= state.saved_blocks:
                continue
            self._send_tokens(meta, state, full)
            first = state.saved_blocks
            meta.saves.append(Transfer(req_id, first, state.block_ids[first:full]))
            self.stats.saved_blocks_planned += full - first
            state.saved_blocks = full

    def _send_tokens(self, meta: PegaMetadata, state: _Request, blocks: int) -> None:
        if blocks <= state.sent_blocks:
            return
        tokens = state.request.all_token_ids[
            state.sent_blocks * self.block_size : blocks * self.block_size
        ]
        meta.chains.append(ChainExtension(state.request.request_id, state.sent_blocks, tokens))
        state.sent_blocks = blocks

    def finished_recving(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            state = self.requests.get(req_id)
            if state is not None:
                self._release(state)

    def request_finished(self, request: Any) -> dict[str, Any] | None:
        """Forgets the request; returns its handoff params when it asked for them."""
        state = self.requests.pop(request.request_id, None)
        if state is None:
            return None
        self._release(state)
        params = getattr(request, "kv_transfer_params", None) or {}
        return self._handoff(state) if params.get(HANDOFF) is True else None

    def _handoff(self, state: _Request) -> dict[str, Any]:
        """For the P/D router's prefill request: per tensor-parallel rank, the keys of the
        prompt's blocks this engine saved or found stored. The router sends the request on to a
        decode engine only once the node holds them all, so the decode side's lookup never
        races this side's save (docs/pd.md). The namespace and block size also let the router
        ask the node which host holds how much of a later prompt, to choose its prefill engine."""
        blocks = min(state.saved_blocks, state.request.num_prompt_tokens // self.block_size)
        tokens = list(state.request.all_token_ids[: blocks * self.block_size])
        ranks = [
            {
                "namespace": digest.hex(),
                "block_size": self.block_size,
                "keys": [key.hex() for key in chain_keys(digest, tokens, self.block_size)],
            }
            for digest in self.digests
        ]
        return {HANDOFF: {"ranks": ranks}}

    def _release(self, state: _Request) -> None:
        """Unpins the request's leased pages; errors are ignored (the lease dies with us)."""
        for lease in state.leases:
            self.link.submit("release", lease=lease)
        state.leases.clear()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.config.stats_interval_s:
            self._last_log = now
            log.info("PegaFlow scheduler: %s", dataclasses.asdict(self.stats))

    def close(self) -> None:
        self.link.close()
