"""PegaFlow connector: keys, the node's socket protocol, and a shared-memory KV region."""

from __future__ import annotations

from ._version import __version__
from .client import Client, Engine, LookupResult, SaveResult
from .errors import ConnectionLost, IncompatibleVersion, NodeError, PegaFlowError, ProtocolError
from .host_engine import DTYPE_BYTES, LAYOUTS, HostKvRegion, page_bytes, segment_bytes
from .keys import Namespace, chain_keys
from .protocol import PROTOCOL_VERSION, decode_frame, encode_frame

__all__ = [
    "DTYPE_BYTES",
    "LAYOUTS",
    "PROTOCOL_VERSION",
    "Client",
    "ConnectionLost",
    "Engine",
    "HostKvRegion",
    "IncompatibleVersion",
    "LookupResult",
    "Namespace",
    "NodeError",
    "PegaFlowError",
    "ProtocolError",
    "SaveResult",
    "__version__",
    "chain_keys",
    "decode_frame",
    "encode_frame",
    "page_bytes",
    "segment_bytes",
]
