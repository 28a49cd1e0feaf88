"""A TP=4 engine's ranks on a host of 2 NUMA nodes x 2 GPUs, declared for host engines in the
node's `topology`: each rank's `HostKvRegion` names its GPU, and the node serves it on that
GPU's transfer actor and its NUMA node's pool, as it would on a GPU host."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest
from conftest import NodeProcess

from pegaflow import HostKvRegion, Namespace, chain_keys
from pegaflow.errors import NodeError

GPUS = ["rank-0", "rank-1", "rank-2", "rank-3"]
BLOCKS = 6


@pytest.fixture
def two_by_two(
    start_node: Callable[..., NodeProcess], monkeypatch: pytest.MonkeyPatch
) -> NodeProcess:
    gpus = ", ".join(f'{{ uuid = "{gpu}", numa_node = {i // 2} }}' for i, gpu in enumerate(GPUS))
    monkeypatch.setenv("PEGAFLOW_TOPOLOGY__NUMA_NODES", "[0, 1]")
    monkeypatch.setenv("PEGAFLOW_TOPOLOGY__GPUS", f"[{gpus}]")
    return start_node()


def rank_round_trip(node: NodeProcess, rank: int) -> None:
    namespace = Namespace("tp4/model", "bf16", "vllm_lbnhc", block_size=4, num_layers=3,
                          num_kv_heads=2, head_dim=8, tp_rank=rank, tp_size=4)  # fmt: skip
    keys = chain_keys(namespace.digest(), list(range(4 * BLOCKS)), 4)
    rng = random.Random(rank)
    with (
        node.client() as client,
        HostKvRegion(namespace, 2 * BLOCKS, gpu=GPUS[rank]) as region,
    ):
        sources = rng.sample(range(BLOCKS), BLOCKS)
        pages = region.fill_random(sources, seed=rank)
        engine = region.register(client)
        assert client.save(engine, keys, sources).stored == BLOCKS
        targets = list(range(BLOCKS, 2 * BLOCKS))
        assert client.load(engine, keys, targets) == BLOCKS
        assert [region.block_bytes(b) for b in targets] == pages, f"rank {rank}"


def test_tp4_ranks_round_trip_at_once_each_on_its_gpu_and_near_pool(
    two_by_two: NodeProcess,
) -> None:
    failures: list[BaseException] = []

    def rank(index: int) -> None:
        try:
            rank_round_trip(two_by_two, index)
        except BaseException as error:  # reported below, in the test's thread
            failures.append(error)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(len(GPUS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    stats = two_by_two.stats()
    copied = {d["device"]: d["save"]["bytes"] + d["load"]["bytes"] for d in stats["transfers"]}
    assert all(copied[gpu] > 0 for gpu in GPUS), copied
    assert copied["host"] == 0, copied
    assert [(p["numa_node"], p["pages"]) for p in stats["pools"]] == [(0, 12), (1, 12)]
    assert [(g["uuid"], g["numa_node"]) for g in stats["topology"]["gpus"]] == [
        (gpu, i // 2) for i, gpu in enumerate(GPUS)
    ]


def test_a_region_naming_a_gpu_the_node_does_not_serve_is_refused(
    two_by_two: NodeProcess,
) -> None:
    namespace = Namespace("tp4/model", "bf16", "vllm_lbnhc", 4, 3, 2, 8)
    with (
        two_by_two.client() as client,
        HostKvRegion(namespace, 2, gpu="rank-7") as region,
        pytest.raises(NodeError) as refused,
    ):
        region.register(client)
    assert refused.value.code == "bad_field"
    assert "region.gpu" in refused.value.message and "rank-7" in refused.value.message
