"""`PegaKVConnector`: vLLM's KV connector (KVConnectorBase_V1) backed by pegaflow-node.

Enable with
`--kv-transfer-config '{"kv_connector":"PegaKVConnector","kv_role":"kv_both",
"kv_connector_module_path":"pegaflow.connector"}'`; options in `kv_connector_extra_config`
(docs/vllm.md). vLLM builds one instance per role: the scheduler's looks prompts up and plans
transfers (`pegaflow.vllm.scheduler`), each worker's moves blocks (`pegaflow.vllm.worker`).
Anything unsupported or a node that is down leaves vLLM running exactly as without it.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .vllm.config import ConnectorConfig
from .vllm.layout import KvShape, UnsupportedLayout, shape_of_config
from .vllm.metadata import PegaMetadata
from .vllm.scheduler import SchedulerSide
from .vllm.worker import WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("pegaflow.connector")

_LIVE: weakref.WeakSet[PegaKVConnector] = weakref.WeakSet()


def connector_stats() -> list[dict[str, Any]]:
    """Stats of every live connector in this process (scheduler and worker halves)."""
    return [connector.stats() for connector in list(_LIVE)]


class PegaKVConnector(KVConnectorBase_V1):
    """Prefix KV blocks stored in pegaflow-node, shared across engines and restarts."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer_config = self._kv_transfer_config
        self.config = ConnectorConfig.from_extra(transfer_config.kv_connector_extra_config)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        shape = self._shape(vllm_config, kv_cache_config)
        if shape is None:
            return
        model = self.config.model_id or vllm_config.model_config.model
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        if role == KVConnectorRole.SCHEDULER:
            if (
                self.config.recompute_on_load_error
                and getattr(transfer_config, "kv_load_failure_policy", "recompute") != "recompute"
            ):
                # A store miss is never fatal: a block that fails to load is recomputed.
                transfer_config.kv_load_failure_policy = "recompute"
            stages = self._stage_layers(vllm_config, shape)
            if stages is None:
                return
            self.scheduler = SchedulerSide(self.config, shape, model, tp_size, stages)
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            self.worker = WorkerSide(
                self.config,
                shape,
                model,
                get_tensor_model_parallel_rank(),
                tp_size,
                vllm_config.compilation_config.static_forward_context,
                pp_stage=get_pp_group().rank_in_group,
            )
        _LIVE.add(self)

    def _shape(self, vllm_config: VllmConfig, kv_cache_config: Any) -> KvShape | None:
        """The KV shape, or None (connector off, one warning) when it is not supported."""
        from vllm.platforms import current_platform

        try:
            if kv_cache_config is None:
                raise UnsupportedLayout("this vLLM passes no kv_cache_config (needs >= 0.26)")
            cache_dtype = vllm_config.cache_config.cache_dtype
            if cache_dtype.startswith("fp8") and current_platform.is_fp8_fnuz():
                raise UnsupportedLayout(f"kv_cache_dtype {cache_dtype} is fnuz fp8 here")
            return shape_of_config(kv_cache_config, current_platform.is_cpu(), cache_dtype)
        except UnsupportedLayout as exc:
            log.warning("PegaFlow connector off: %s", exc)
            return None

    def _stage_layers(self, vllm_config: VllmConfig, shape: KvShape) -> list[int] | None:
        """Attention layers per pipeline stage, for the stages' namespaces. The scheduler's
        config holds stage 0's layers only; the others follow vLLM's own split of the decoder
        layers (`get_pp_indices`). Stage 0's count must match, else the split is not one layer
        per decoder layer and the connector stays off (one warning)."""
        pp_size = vllm_config.parallel_config.pipeline_parallel_size
        if pp_size == 1:
            return [shape.num_layers]
        from vllm.distributed.utils import get_pp_indices

        total = vllm_config.model_config.get_total_num_hidden_layers()
        bounds = [get_pp_indices(total, stage, pp_size) for stage in range(pp_size)]
        stages = [end - start for start, end in bounds]
        if stages[0] != shape.num_layers:
            log.warning(
                "PegaFlow connector off: pipeline stage 0 has %d KV layers, not the %d decoder "
                "layers vLLM assigns it; the other stages' layers cannot be known",
                shape.num_layers,
                stages[0],
            )
            return None
        return stages

    def stats(self) -> dict[str, Any]:
        """Counters since start: lookups and hit tokens (scheduler), blocks moved (worker)."""
        side = self.scheduler or self.worker
        role = "scheduler" if self.scheduler else "worker"
        return {"role": role, **(dataclasses.asdict(side.stats) if side else {})}

    # ---- worker role ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.worker is not None:
            self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_loads(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are asynchronous: a request runs only after its load finished."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        """Pages hold every layer, so saves are sent once per step in `wait_for_save`; GPU
        engines mark here, with an event, where on the stream this layer's writes end."""
        if self.worker is not None:
            self.worker.record_layer(layer_name)

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker is None:
            return None, None
        return None, self.worker.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self.worker is None else self.worker.load_errors()

    def _meta(self) -> PegaMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PegaMetadata)
        return meta

    # ---- scheduler role -------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if self.scheduler is None:
            return 0, False
        return self.scheduler.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if self.scheduler is not None:
            self.scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        if self.scheduler is None:
            return PegaMetadata()
        return self.scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.scheduler is not None and connector_output.finished_recving:
            self.scheduler.finished_recving(set(connector_output.finished_recving))

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Blocks are never held past the request (saves finished in `wait_for_save`); a P/D
        router's prefill request gets the keys of its stored blocks back (docs/pd.md)."""
        if self.scheduler is None:
            return False, None
        return False, self.scheduler.request_finished(request)

    def shutdown(self) -> None:
        for side in (self.scheduler, self.worker):
            if side is not None:
                side.close()
