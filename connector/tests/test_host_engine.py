"""Layouts of the shared-memory KV region: sizes per docs/protocol.md, segments that fit."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from pegaflow import HostKvRegion, Namespace, segment_bytes


def namespace(layout: str, dtype: str = "bf16", heads: int = 2) -> Namespace:
    return Namespace(
        "test/model", dtype, layout, block_size=4, num_layers=3, num_kv_heads=heads, head_dim=8
    )


@pytest.mark.parametrize(
    ("layout", "dtype", "heads", "expected"),
    [
        ("vllm_lbnhc", "bf16", 2, 4 * 2 * 2 * 8 * 2),
        ("vllm_lbhnc", "fp32", 2, 4 * 2 * 2 * 8 * 4),
        ("kv_split", "fp8_e4m3", 2, 4 * 2 * 8 * 1),
        ("mla", "fp16", 1, 4 * 8 * 2),
    ],
)
def test_segment_bytes_follow_the_spec_table(
    layout: str, dtype: str, heads: int, expected: int
) -> None:
    assert segment_bytes(namespace(layout, dtype, heads)) == expected


@pytest.mark.parametrize(
    ("ns", "message"),
    [
        (namespace("mla", heads=2), "num_kv_heads 1"),
        (namespace("vllm_lbnhc", dtype="int4"), "dtype"),
        (namespace("paged"), "layout"),
    ],
)
def test_unsupported_shapes_are_rejected(ns: Namespace, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HostKvRegion(ns, 4)


@pytest.mark.parametrize("layout", ["vllm_lbnhc", "vllm_lbhnc", "kv_split", "mla"])
def test_segments_tile_the_region_exactly(layout: str) -> None:
    """Every block of every layer and segment is its own span, and together they fill the file."""
    with HostKvRegion(namespace(layout, heads=1 if layout == "mla" else 2), 5) as region:
        spans = sorted(
            offset + block * stride
            for layer in region.layers
            for offset, stride in layer
            for block in range(region.num_blocks)
        )
        assert spans == list(range(0, region.bytes, region.segment_bytes))
        assert region.page_bytes == 3 * region.segments * region.segment_bytes
        assert Path("/dev/shm", region.name).stat().st_size >= region.bytes
        fields = region.register_fields()
        assert fields["region"] == {"shm": region.name, "bytes": region.bytes}
        assert len(fields["layers"]) == 3
        assert all(len(layer) == region.segments for layer in fields["layers"])


@pytest.mark.parametrize("layout", ["vllm_lbnhc", "vllm_lbhnc", "kv_split", "mla"])
def test_pages_round_trip_and_blocks_stay_apart(layout: str) -> None:
    with HostKvRegion(namespace(layout, heads=1 if layout == "mla" else 2), 4) as region:
        pages = region.fill_random([2, 0], seed=7)
        assert region.block_bytes(2) == pages[0]
        assert region.block_bytes(0) == pages[1]
        assert region.block_bytes(1) == bytes(region.page_bytes)
        assert region.fill_random([3], seed=7)[0] == pages[0]  # reproducible
        with pytest.raises(ValueError, match="page is"):
            region.write_block(1, b"short")
        with pytest.raises(IndexError, match="not below num_blocks 4"):
            region.block_bytes(4)


def test_element_offsets_follow_each_layout() -> None:
    """Offsets index vLLM's (blocks, heads, block_size, 2*head_dim) view; strides differ."""
    width = 2  # bf16
    with HostKvRegion(namespace("vllm_lbnhc"), 4) as lbnhc:
        # block-major: tokens outermost inside a block, then heads, then K|V channels
        assert lbnhc.element_offset(0, 0, 0, 1, 0) == 2 * 16 * width
        assert lbnhc.element_offset(0, 0, 1, 0, 0) == 16 * width
        assert (
            lbnhc.element_offset(1, 2, 0, 0, 0)
            == lbnhc.layers[1][0][0] + 2 * lbnhc.layer_block_bytes
        )
    with HostKvRegion(namespace("vllm_lbhnc"), 4) as lbhnc:
        assert lbhnc.element_offset(0, 0, 1, 0, 0) == 4 * 16 * width
        assert lbhnc.element_offset(0, 0, 0, 1, 0) == 16 * width
    with HostKvRegion(namespace("kv_split"), 4) as split:
        value = split.element_offset(2, 1, 1, 3, 8 + 5)  # channel 13: V plane, channel 5
        assert value == split.layers[2][1][0] + split.segment_bytes + ((3 * 2 + 1) * 8 + 5) * width


def test_each_element_lands_in_its_own_page_position() -> None:
    """Writing through element offsets and reading the page agree for every element."""
    ns = Namespace(
        "m", "fp8_e4m3", "kv_split", block_size=2, num_layers=2, num_kv_heads=2, head_dim=3
    )
    with HostKvRegion(ns, 3) as region:
        positions = set()
        for layer, head, token, channel in itertools.product(
            range(2), range(2), range(2), range(6)
        ):
            positions.add(region.element_offset(layer, 1, head, token, channel))
        assert len(positions) == region.page_bytes
        for value, offset in enumerate(sorted(positions)):
            region.buf[offset] = value
        assert region.block_bytes(1) == bytes(range(region.page_bytes))
        assert region.block_bytes(0) == region.block_bytes(2) == bytes(region.page_bytes)
