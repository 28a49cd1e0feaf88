"""Exceptions of the connector; every one derives from `PegaFlowError`."""

from __future__ import annotations


class PegaFlowError(Exception):
    """Base of every error this package raises on purpose."""


class NodeError(PegaFlowError):
    """The node answered a request with an error reply (`ok: false`)."""

    def __init__(self, code: str, message: str, op: str | None = None) -> None:
        self.code = code
        self.message = message
        self.op = op
        prefix = f"{op}: " if op else ""
        super().__init__(f"{prefix}{code}: {message}")


class ConnectionLost(PegaFlowError):
    """The connection to the node could not be made, or dropped with requests in flight."""


class ProtocolError(PegaFlowError):
    """The node sent something the protocol does not allow (bad frame, wrong version)."""


class IncompatibleVersion(ProtocolError):
    """This package and the node cannot work together (docs/protocol.md "Versions"): retrying
    will not help; the message names both versions and which side to upgrade."""
