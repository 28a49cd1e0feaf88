"""PegaHiCacheStorage against the real SGLang package (HiCacheStorage, host pools, the dynamic
backend factory) and the real node.

SGLang itself cannot serve on this CPU-only machine (its runtime needs sglang-kernel, a CUDA
build), so these tests drive HiCache's storage interface as its cache controller does: real
`MHATokenToKVPoolHost` pools, SGLang's page hashes, the node doing every copy. Needs the venv
of scripts/install-sglang.sh (the vLLM CPU venv with SGLang added).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeProcess

import pegaflow
import pegaflow.client
from pegaflow import HostKvRegion, Namespace, chain_keys

if os.environ.get("PEGAFLOW_SKIP_SGLANG") == "1":
    pytest.skip("PEGAFLOW_SKIP_SGLANG=1: SGLang tests skipped on request", allow_module_level=True)
try:
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
except ImportError as exc:
    pytest.fail(
        f"SGLang is not importable ({exc}): run scripts/install-sglang.sh and run pytest with "
        "that venv's python (.venv-vllm), or set PEGAFLOW_SKIP_SGLANG=1 to skip these tests "
        "explicitly",
        pytrace=False,
    )

from sglang_support.pools import HEAD_DIM, HEADS, LAYERS, PAGE, PAGES, kv, make_pool

from pegaflow.sglang import PegaHiCacheStorage
from pegaflow.sglang.host_pool import describe_pool
from pegaflow.sglang.page_keys import page_hashes, page_key, token_keys
from pegaflow.vllm.layout import KvShape

LAYOUTS = ["layer_first", "page_first", "page_first_direct"]
MODEL = "tiny-model"


def storage_config(socket: Path | str, **extra: Any) -> HiCacheStorageConfig:
    """What HiCache passes for `--hicache-storage-backend dynamic` with our extra config."""
    return HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name=MODEL,
        extra_config={
            "backend_name": "pegaflow",
            "module_path": "pegaflow.sglang",
            "class_name": "PegaHiCacheStorage",
            "interface_v1": 1,
            "socket_path": str(socket),
            "retry_interval_s": 0.5,
            **extra,
        },
    )


@pytest.fixture
def attach() -> Iterator[Callable[..., tuple[PegaHiCacheStorage, Any]]]:
    """Builds backends exactly as SGLang's cache controller attaches storage."""
    backends: list[PegaHiCacheStorage] = []

    def attach(socket: Path | str, layout: str = "page_first", **extra: Any) -> tuple[Any, Any]:
        pool = make_pool(layout)
        backend = StorageBackendFactory.create_backend(
            "dynamic", storage_config(socket, **extra), pool
        )
        backend.register_mem_pool_host(pool)
        backends.append(backend)
        return backend, pool

    yield attach
    for backend in backends:
        backend.close()


def prompt(seed: int, pages: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(pages * PAGE)]


def slots(pages: list[int]) -> torch.Tensor:
    """HiCache's `host_indices`: every token slot of each page, in order."""
    return torch.tensor([p * PAGE + t for p in pages for t in range(PAGE)], dtype=torch.int64)


def fill(pool: Any, pages: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for page in pages:
        data = pool.get_data_page(page * PAGE, flat=False)
        data.copy_(torch.randn(data.shape, generator=generator).to(data.dtype))


def assert_same_kv(a: Any, a_pages: list[int], b: Any, b_pages: list[int]) -> None:
    """Byte-exact per layer, K/V, token and head, whatever the two pools' layouts."""
    for pa, pb in zip(a_pages, b_pages, strict=True):
        for layer in range(LAYERS):
            for kind in (0, 1):
                for t in range(PAGE):
                    left = kv(a, kind, layer, pa * PAGE + t).view(torch.int16)
                    right = kv(b, kind, layer, pb * PAGE + t).view(torch.int16)
                    assert torch.equal(left, right), (pa, pb, layer, kind, t)


def test_dynamic_backend_is_a_hicache_storage(node: NodeProcess, attach: Any) -> None:
    backend, pool = attach(node.socket)
    assert isinstance(backend, PegaHiCacheStorage)
    assert isinstance(backend, HiCacheStorage)
    assert backend.namespace is not None and backend.namespace.layout == "kv_split"
    assert (backend.namespace.block_size, backend.namespace.num_layers) == (PAGE, LAYERS)
    assert (backend.namespace.num_kv_heads, backend.namespace.head_dim) == (HEADS, HEAD_DIM)
    assert backend.namespace.model == MODEL
    assert pool.kv_buffer.untyped_storage().nbytes() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_v1_round_trip_is_byte_exact(node: NodeProcess, attach: Any, layout: str) -> None:
    backend, pool = attach(node.socket, layout)
    hashes = page_hashes(prompt(1, 5), PAGE)
    fill(pool, [0, 1, 2, 3, 4], seed=1)
    assert backend.batch_exists(hashes) == 0
    assert backend.batch_set_v1(hashes, slots([0, 1, 2, 3, 4])) == [True] * 5
    assert backend.batch_exists(hashes) == 5
    # Pages 9..13 held nothing; loading fills them with exactly what pages 0..4 held.
    assert backend.batch_get_v1(hashes, slots([9, 10, 11, 12, 13])) == [True] * 5
    assert_same_kv(pool, [0, 1, 2, 3, 4], pool, [9, 10, 11, 12, 13])
    assert backend.stats()["saved_pages"] == 5 and backend.stats()["loaded_pages"] == 5


def test_batch_semantics_count_leading_hits(node: NodeProcess, attach: Any) -> None:
    backend, pool = attach(node.socket, pages_per_request=2)
    hashes = page_hashes(prompt(2, 6), PAGE)
    fill(pool, range(6), seed=2)
    stored = [0, 1, 3, 4]  # page 2 never stored
    assert backend.batch_set_v1([hashes[i] for i in stored], slots(stored)) == [True] * 4
    assert backend.batch_exists(hashes) == 2
    assert backend.batch_exists(hashes[3:5]) == 2
    assert backend.batch_exists([]) == 0
    # A load stops at the first page the node lacks; later pages are not reported loaded.
    assert backend.batch_get_v1(hashes[:3], slots([10, 11, 12])) == [True, True, False]
    assert backend.exists(hashes[0]) and not backend.exists(hashes[2])
    # Slots that are not whole pages never reach the node.
    assert backend.batch_get_v1(hashes[:1], torch.arange(1, 1 + PAGE)) == [False]
    assert backend.batch_exists(["not-a-page-hash", *hashes]) == 0


def test_layouts_share_pages(node: NodeProcess, attach: Any) -> None:
    """layer_first, page_first and page_first_direct store the same page bytes: an engine on
    one layout loads what an engine on another saved."""
    writer, source = attach(node.socket, "page_first")
    hashes = page_hashes(prompt(3, 4), PAGE)
    fill(source, [2, 3, 4, 5], seed=3)
    assert writer.batch_set_v1(hashes, slots([2, 3, 4, 5])) == [True] * 4
    for layout in ("layer_first", "page_first_direct"):
        reader, target = attach(node.socket, layout)
        assert reader.namespace == writer.namespace
        assert reader.batch_get_v1(hashes, slots([7, 0, 12, 1])) == [True] * 4
        assert_same_kv(source, [2, 3, 4, 5], target, [7, 0, 12, 1])


def test_generic_interface_round_trips_flat_pages(node: NodeProcess, attach: Any) -> None:
    backend, pool = attach(node.socket, "page_first", staging_pages=2)
    hashes = page_hashes(prompt(4, 5), PAGE)
    fill(pool, range(5), seed=4)
    pages = [pool.get_data_page(p * PAGE).clone() for p in range(5)]
    assert backend.set(hashes[0], pages[0])
    assert backend.batch_set(hashes[1:4], pages[1:4])
    assert backend.exists(hashes[3]) and not backend.exists(hashes[4])
    got = backend.get(hashes[2], pool.get_dummy_flat_data_page())
    assert got is not None and torch.equal(got.view(torch.int16), pages[2].view(torch.int16))
    results = backend.batch_get(hashes, [pool.get_dummy_flat_data_page() for _ in hashes])
    for page, result in zip(pages[:4], results[:4], strict=True):
        assert result is not None and torch.equal(result.view(torch.int16), page.view(torch.int16))
    assert results[4] is None
    assert backend.get(hashes[4]) is None
    # Pages set through the generic path are the v1 path's pages too.
    assert backend.batch_get_v1(hashes[:4], slots([12, 13, 14, 15])) == [True] * 4
    assert_same_kv(pool, [0, 1, 2, 3], pool, [12, 13, 14, 15])


def test_split_kv_engine_shares_pages_with_sglang(node: NodeProcess, attach: Any) -> None:
    """An engine with token ids and a kv_split region (split-K/V attention, the scenario
    harness) computes the same keys and page bytes: SGLang loads what it saved."""
    backend, pool = attach(node.socket, "page_first")
    tokens = prompt(5, 3)
    assert backend.namespace is not None
    region = HostKvRegion(backend.namespace, num_blocks=4)
    try:
        region.fill_random([1, 2, 3], seed=5)
        with node.client() as client:
            engine = region.register(client)
            keys = token_keys(backend.namespace.digest(), tokens, PAGE)
            assert client.save(engine, keys, [1, 2, 3]).stored == 3
        assert backend.batch_exists(page_hashes(tokens, PAGE)) == 3
        assert backend.batch_get_v1(page_hashes(tokens, PAGE), slots([5, 6, 7])) == [True] * 3
        width = 2  # bf16
        for block, page in zip([1, 2, 3], [5, 6, 7], strict=True):
            for layer in range(LAYERS):
                for kind in (0, 1):
                    for t in range(PAGE):
                        for head in range(HEADS):
                            at = region.element_offset(layer, block, head, t, kind * HEAD_DIM)
                            want = bytes(region.buf[at : at + HEAD_DIM * width])
                            got = kv(pool, kind, layer, page * PAGE + t)[head]
                            assert got.view(torch.uint8).numpy().tobytes() == want
    finally:
        region.close()
        region.unlink()


def test_vllm_blocks_are_never_served_to_sglang(node: NodeProcess, attach: Any) -> None:
    """vLLM packs K and V per token (vllm_lbnhc / vllm_lbhnc): other page bytes, so another
    namespace, and keys from the token chain: a vLLM block is a miss for SGLang, never bytes."""
    backend, _ = attach(node.socket, "page_first")
    tokens = prompt(6, 3)
    assert backend.namespace is not None
    for layout in ("vllm_lbnhc", "vllm_lbhnc"):
        shape = KvShape("bf16", layout, PAGE, LAYERS, HEADS, HEAD_DIM)
        vllm_ns = shape.namespace(MODEL, 0, 1, 0)
        assert vllm_ns.digest() != backend.namespace.digest()
        with HostKvRegion(vllm_ns, num_blocks=3) as region, node.client() as client:
            engine = region.register(client)
            region.fill_random([0, 1, 2], seed=6)
            vllm_keys = chain_keys(vllm_ns.digest(), tokens, PAGE)
            assert client.save(engine, vllm_keys, [0, 1, 2]).stored == 3
        sglang_keys = token_keys(backend.namespace.digest(), tokens, PAGE)
        assert not set(vllm_keys) & set(sglang_keys)
    assert backend.batch_exists(page_hashes(tokens, PAGE)) == 0


def test_page_keys_follow_sglang_hashes() -> None:
    """Our page hashes are SGLang's: sha256 chain over u32 LE token ids, hex."""
    import hashlib
    import struct

    tokens = list(range(100, 100 + 2 * PAGE))
    first = hashlib.sha256(struct.pack(f"<{PAGE}I", *tokens[:PAGE])).digest()
    second = hashlib.sha256(first + struct.pack(f"<{PAGE}I", *tokens[PAGE:])).digest()
    assert page_hashes(tokens + [7], PAGE) == [first.hex(), second.hex()]
    namespace = Namespace(MODEL, "bf16", "kv_split", PAGE, LAYERS, HEADS, HEAD_DIM)
    key = page_key(namespace.digest(), first.hex())
    assert key == hashlib.sha256(namespace.digest() + first).digest()
    assert page_key(namespace.digest(), "ABC") is None
    assert token_keys(namespace.digest(), tokens, PAGE)[0] == key


def test_node_down_means_misses_not_errors(
    short_tmp: Path, node: NodeProcess, attach: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hashes = page_hashes(prompt(7, 2), PAGE)
    with caplog.at_level(logging.WARNING, logger="pegaflow"):
        started = time.monotonic()
        absent, _ = attach(short_tmp / "no-node.sock")
        assert absent.batch_exists(hashes) == 0
        assert absent.batch_set_v1(hashes, slots([0, 1])) == [False, False]
        assert absent.batch_get_v1(hashes, slots([0, 1])) == [False, False]
        assert absent.get(hashes[0]) is None
        assert not absent.set(hashes[0], absent.mem_pool_host.get_data_page(0))
        assert time.monotonic() - started < 10
    assert any("unusable" in r.getMessage() for r in caplog.records)

    backend, pool = attach(node.socket)
    fill(pool, [0, 1], seed=7)
    assert backend.batch_set_v1(hashes, slots([0, 1])) == [True, True]
    node.kill()
    started = time.monotonic()
    assert backend.batch_exists(hashes) == 0
    assert backend.batch_get_v1(hashes, slots([2, 3])) == [False, False]
    assert backend.batch_set_v1(hashes, slots([0, 1])) == [False, False]
    assert time.monotonic() - started < 10


def test_an_incompatible_node_turns_storage_off_with_one_warning(
    node: NodeProcess, attach: Any, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    major, minor = (int(part) for part in pegaflow.__version__.split(".")[:2])
    monkeypatch.setattr(pegaflow.client, "__version__", f"{major}.{minor + 1}.0")
    hashes = page_hashes(prompt(9, 2), PAGE)
    with caplog.at_level(logging.WARNING, logger="pegaflow"):
        backend, pool = attach(node.socket)
        fill(pool, [0, 1], seed=9)
        assert backend.batch_set_v1(hashes, slots([0, 1])) == [False, False]
        assert backend.batch_exists(hashes) == 0
        assert backend.batch_get_v1(hashes, slots([2, 3])) == [False, False]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("pegaflow") and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1, warnings
    assert "upgrade pegaflow-node" in warnings[0] and "PegaFlow is off" in warnings[0]
    assert node.stats()["totals"]["saved_blocks"] == 0


def test_unsupported_pools_turn_the_backend_off(
    node: NodeProcess, attach: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pegaflow"):
        backend, _ = attach(node.socket, "page_head")
    assert backend.namespace is None
    assert any("page_head" in r.getMessage() for r in caplog.records)
    hashes = page_hashes(prompt(8, 1), PAGE)
    assert backend.batch_set_v1(hashes, slots([0])) == [False]
    assert backend.batch_exists(hashes) == 0


def test_options_are_checked(node: NodeProcess, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="pages_per_request"):
        PegaHiCacheStorage(storage_config(node.socket, pages_per_request=0), {})
    with caplog.at_level(logging.WARNING, logger="pegaflow"):
        PegaHiCacheStorage(storage_config(node.socket, socket_pth="x"), {}).close()
    assert any("socket_pth" in r.getMessage() for r in caplog.records)


def test_describe_pool_matches_sglang_page_meta() -> None:
    """Our per-layer offsets agree with SGLang's own zero-copy page pointers."""
    for layout in LAYOUTS:
        pool = make_pool(layout, pages=PAGES)
        described = describe_pool(pool)
        base = pool.kv_buffer.data_ptr()
        pointers, sizes = pool.get_page_buffer_meta(slots([3]))
        if layout == "layer_first":  # per layer: K run, V run
            runs = [base + o + 3 * s for layer in described.layers for o, s in layer]
            assert pointers == runs and sizes[0] == described.segment_bytes
        else:  # one K and one V run per page, over all layers
            first_k, first_v = described.layers[0][0], described.layers[0][-1]
            assert pointers[0] == base + first_k[0] + 3 * first_k[1]
            assert pointers[1] <= base + first_v[0] + 3 * first_v[1] < pointers[1] + sizes[1]
