"""Framing of docs/protocol.md: a u32 LE payload length, then one msgpack map.

Pure functions over bytes plus one blocking reader, shared by the client and the raw-socket tests
so both frame exactly alike.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import msgpack

from .errors import ProtocolError

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<I")
DEFAULT_MAX_FRAME_BYTES = 8 << 20

# Error codes of the table in docs/protocol.md.
BAD_FRAME = "bad_frame"
FRAME_TOO_LARGE = "frame_too_large"
UNSUPPORTED_VERSION = "unsupported_version"
INCOMPATIBLE_VERSION = "incompatible_version"
UNKNOWN_OP = "unknown_op"
BAD_FIELD = "bad_field"
BAD_KEY = "bad_key"
NOT_REGISTERED = "not_registered"
OUT_OF_RANGE = "out_of_range"
LAYOUT_MISMATCH = "layout_mismatch"
REGION_UNAVAILABLE = "region_unavailable"
PAGE_TOO_LARGE = "page_too_large"
UNKNOWN_LEASE = "unknown_lease"
LIMIT_EXCEEDED = "limit_exceeded"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"

ERROR_CODES = frozenset(
    {
        BAD_FRAME,
        FRAME_TOO_LARGE,
        UNSUPPORTED_VERSION,
        INCOMPATIBLE_VERSION,
        UNKNOWN_OP,
        BAD_FIELD,
        BAD_KEY,
        NOT_REGISTERED,
        OUT_OF_RANGE,
        LAYOUT_MISMATCH,
        REGION_UNAVAILABLE,
        PAGE_TOO_LARGE,
        UNKNOWN_LEASE,
        LIMIT_EXCEEDED,
        SHUTTING_DOWN,
        INTERNAL,
    }
)


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """The wire bytes of one message: length prefix and msgpack payload (bytes as `bin`)."""
    payload = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parses one payload, which must be exactly one msgpack map."""
    try:
        value = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack documents no narrower base for its parse errors
        raise ProtocolError(f"payload is not a msgpack map: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"payload is a {type(value).__name__}, not a msgpack map")
    return value


def decode_frame(frame: bytes) -> dict[str, Any]:
    """Parses one whole frame; the length prefix must match the bytes that follow."""
    if len(frame) < HEADER.size:
        raise ProtocolError(f"frame of {len(frame)} bytes has no length prefix")
    (length,) = HEADER.unpack_from(frame)
    if length != len(frame) - HEADER.size:
        raise ProtocolError(
            f"length prefix says {length} bytes, frame carries {len(frame) - HEADER.size}"
        )
    return decode_payload(frame[HEADER.size :])


def read_frame(stream: BinaryIO, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> dict[str, Any] | None:
    """Reads one frame from a buffered stream; None on a clean end of stream between frames."""
    header = stream.read(HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise ProtocolError("stream ended inside a length prefix")
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes is over the limit of {max_bytes}")
    payload = stream.read(length)
    if len(payload) < length:
        raise ProtocolError(f"stream ended after {len(payload)} of {length} payload bytes")
    return decode_payload(payload)
