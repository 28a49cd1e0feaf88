"""Regenerates frames.json and keys.json, the wire contract both test suites check.

Run only when the protocol changes on purpose: `python make_golden.py`. The frame bytes are
msgpack as the Python `msgpack` package writes it; the Rust suite must produce the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import msgpack

HERE = Path(__file__).parent

NAMESPACE = {
    "model": "meta-llama/Llama-3.1-8B",
    "dtype": "bf16",
    "layout": "vllm_lbnhc",
    "block_size": 16,
    "num_layers": 2,
    "num_kv_heads": 8,
    "head_dim": 128,
    "tp_rank": 0,
    "tp_size": 1,
    "pp_stage": 0,
}
STR_FIELDS = ("model", "dtype", "layout")
FIELD_ORDER = tuple(NAMESPACE)


def namespace_hash(fields: dict) -> bytes:
    h = hashlib.sha256(b"pegaflow-namespace-v1")
    for name in FIELD_ORDER:
        value = fields[name]
        if name in STR_FIELDS:
            raw = value.encode()
            h.update(struct.pack("<I", len(raw)) + raw)
        else:
            h.update(struct.pack("<I", value))
    return h.digest()


def chain_keys(namespace: bytes, tokens: list[int], block_size: int) -> list[bytes]:
    keys, prev = [], bytes(32)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        prev = hashlib.sha256(namespace + prev + struct.pack(f"<{block_size}I", *block)).digest()
        keys.append(prev)
    return keys


def bin_(raw: bytes) -> dict:
    return {"$bin": raw.hex()}


def frames() -> list[dict]:
    ns = namespace_hash(NAMESPACE)
    keys = b"".join(chain_keys(ns, list(range(48)), 16))
    seg = 16 * 8 * 2 * 128 * 2
    return [
        (
            "hello_request",
            {"v": 1, "id": 1, "op": "hello", "client": "pegaflow-py/0.1.0", "version": "0.1.0"},
        ),
        # A client older than the version check sends no `version`; the node still accepts it.
        (
            "hello_without_version_request",
            {"v": 1, "id": 1, "op": "hello", "client": "pegaflow-py/0.1.0"},
        ),
        (
            "hello_reply",
            {
                "id": 1,
                "ok": True,
                "protocol": 1,
                "node": "pegaflow-node 0.1.0",
                "version": "0.1.0",
                "dma": "host",
                "pool_bytes": 1 << 30,
                "max_frame_bytes": 8 << 20,
            },
        ),
        (
            "register_request",
            {
                "v": 1,
                "id": 2,
                "op": "register",
                "namespace": NAMESPACE,
                "region": {"shm": "pegaflow-kv-1234", "bytes": 2 * 4 * seg},
                "num_blocks": 4,
                "segment_bytes": seg,
                "layers": [[[0, seg]], [[4 * seg, seg]]],
            },
        ),
        (
            "register_reply",
            {"id": 2, "ok": True, "engine": 1, "namespace": bin_(ns), "page_bytes": 2 * seg},
        ),
        ("lookup_request", {"v": 1, "id": 3, "op": "lookup", "keys": bin_(keys), "lease": True}),
        ("lookup_reply", {"id": 3, "ok": True, "hits": 2, "lease": 7}),
        ("lookup_reply_no_lease", {"id": 3, "ok": True, "hits": 0, "lease": None}),
        (
            "save_request",
            {
                "v": 1,
                "id": 4,
                "op": "save",
                "engine": 1,
                "keys": bin_(keys),
                "block_ids": [0, 1, 3],
            },
        ),
        ("save_reply", {"id": 4, "ok": True, "stored": 2, "present": 1, "dropped": 0}),
        (
            "load_request",
            {
                "v": 1,
                "id": 5,
                "op": "load",
                "engine": 1,
                "keys": bin_(keys),
                "block_ids": [2, 0, 1],
            },
        ),
        ("load_reply", {"id": 5, "ok": True, "loaded": 3}),
        ("release_request", {"v": 1, "id": 6, "op": "release", "lease": 7}),
        ("release_reply", {"id": 6, "ok": True, "released": 2}),
        ("stats_request", {"v": 1, "id": 7, "op": "stats"}),
        (
            "error_reply",
            {
                "id": 8,
                "ok": False,
                "code": "out_of_range",
                "message": "field `block_ids[1]`: block id 9 is not below num_blocks 4",
            },
        ),
        (
            "error_reply_no_id",
            {
                "id": None,
                "ok": False,
                "code": "bad_frame",
                "message": "payload is not a msgpack map: unexpected end of data",
            },
        ),
    ]


def to_wire(value):
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_wire(v) for v in value]
    return value


def main() -> None:
    out = []
    for name, value in frames():
        payload = msgpack.packb(to_wire(value), use_bin_type=True)
        out.append(
            {
                "name": name,
                "value": value,
                "frame": (struct.pack("<I", len(payload)) + payload).hex(),
            }
        )
    (HERE / "frames.json").write_text(json.dumps(out, indent=1) + "\n")

    vectors = []
    for ns_fields, tokens in [
        (NAMESPACE, list(range(40))),
        ({**NAMESPACE, "tp_rank": 1, "tp_size": 2}, list(range(40))),
        (
            {
                **NAMESPACE,
                "model": "Qwen/Qwen3-0.6B",
                "dtype": "fp8_e4m3",
                "layout": "mla",
                "block_size": 4,
                "num_kv_heads": 1,
                "head_dim": 576,
            },
            [7, 4294967295, 0, 42] * 3 + [1],
        ),
    ]:
        ns = namespace_hash(ns_fields)
        vectors.append(
            {
                "namespace_fields": ns_fields,
                "namespace": ns.hex(),
                "tokens": tokens,
                "keys": [k.hex() for k in chain_keys(ns, tokens, ns_fields["block_size"])],
            }
        )
    (HERE / "keys.json").write_text(json.dumps(vectors, indent=1) + "\n")


if __name__ == "__main__":
    main()
