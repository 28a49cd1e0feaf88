"""The Python codec against the golden frames and key vectors both test suites share."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pegaflow import Namespace, ProtocolError, chain_keys, decode_frame, encode_frame
from pegaflow.protocol import ERROR_CODES

GOLDEN = Path(__file__).parent / "golden"
FRAMES = json.loads((GOLDEN / "frames.json").read_text())
KEY_VECTORS = json.loads((GOLDEN / "keys.json").read_text())
PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _load_generator() -> Any:
    """The golden files' generator, whose `to_wire` turns `{"$bin": hex}` back into bytes."""
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


to_wire = _load_generator().to_wire


@pytest.mark.parametrize("golden", FRAMES, ids=[frame["name"] for frame in FRAMES])
def test_golden_frame_encodes_exactly(golden: dict[str, Any]) -> None:
    assert encode_frame(to_wire(golden["value"])).hex() == golden["frame"]


@pytest.mark.parametrize("golden", FRAMES, ids=[frame["name"] for frame in FRAMES])
def test_golden_frame_decodes_exactly(golden: dict[str, Any]) -> None:
    assert decode_frame(bytes.fromhex(golden["frame"])) == to_wire(golden["value"])


@pytest.mark.parametrize("vector", KEY_VECTORS, ids=lambda v: v["namespace_fields"]["model"])
def test_golden_keys(vector: dict[str, Any]) -> None:
    namespace = Namespace(**vector["namespace_fields"])
    assert namespace.to_wire() == vector["namespace_fields"]
    assert list(namespace.to_wire()) == list(vector["namespace_fields"])  # wire order
    assert namespace.digest().hex() == vector["namespace"]
    keys = chain_keys(namespace.digest(), vector["tokens"], namespace.block_size)
    assert [key.hex() for key in keys] == vector["keys"]


def test_trailing_partial_block_has_no_key() -> None:
    digest = Namespace("m", "bf16", "vllm_lbnhc", 4, 1, 1, 8).digest()
    full = chain_keys(digest, list(range(8)), 4)
    assert len(full) == 2
    assert chain_keys(digest, list(range(11)), 4) == full
    assert chain_keys(digest, list(range(3)), 4) == []


def test_a_chain_continued_from_its_parent_equals_the_whole_chain() -> None:
    digest = Namespace("m", "bf16", "vllm_lbnhc", 16, 32, 8, 128).digest()
    tokens = list(range(10_000))
    whole = chain_keys(digest, tokens, 16)
    head = chain_keys(digest, tokens[:4_000], 16)
    tail = chain_keys(digest, tokens[4_000:], 16, parent=head[-1])
    assert len(whole) == 625 and head + tail == whole
    with pytest.raises(ValueError, match="parent key must be 32 bytes"):
        chain_keys(digest, tokens, 16, parent=b"short")


def test_bad_token_or_namespace_values_are_clear_errors() -> None:
    digest = Namespace("m", "bf16", "vllm_lbnhc", 2, 1, 1, 8).digest()
    with pytest.raises(ValueError, match="block 1 must be u32"):
        chain_keys(digest, [1, 2, 3, -1], 2)
    with pytest.raises(ValueError, match="`tp_rank` must be a u32"):
        Namespace("m", "bf16", "vllm_lbnhc", 2, 1, 1, 8, tp_rank=1 << 32).digest()


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb({"v": 1, "id": 1})[:-1],  # truncated
        msgpack.packb({"v": 1}) + b"\x00",  # trailing bytes
        msgpack.packb([1, 2]),  # not a map
    ],
    ids=["truncated", "trailing", "not_a_map"],
)
def test_bad_payloads_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(struct.pack("<I", len(payload)) + payload)


def test_error_codes_match_the_spec_table() -> None:
    table = PROTOCOL_MD.read_text().split("### Error codes", 1)[1].split("## Ops", 1)[0]
    documented = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert documented == ERROR_CODES
