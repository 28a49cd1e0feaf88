"""The version rule of `hello` (docs/protocol.md "Versions"), applied to the node's reply.

The node applies the same rule to the client's `version` and answers `incompatible_version`
with the same line; checking here too covers nodes that do not check, and makes both refusals
the same typed error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import IncompatibleVersion, NodeError
from .protocol import INCOMPATIBLE_VERSION, PROTOCOL_VERSION, UNSUPPORTED_VERSION


def major_minor(version: str) -> tuple[int, int] | None:
    """`(major, minor)` of a version such as "0.1.3"; None when it is not one."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def incompatibility(client_version: str, node_version: str) -> str | None:
    """The one-line reason `client_version` cannot work with `node_version`, or None."""
    client, node = major_minor(client_version), major_minor(node_version)
    if client is None or node is None:
        return (
            f"pegaflow {client_version} (client) cannot tell whether pegaflow-node "
            f"{node_version} is compatible: not versions such as 0.1.0"
        )
    if client == node:
        return None
    if client < node:
        upgrade = f"upgrade the pegaflow package to {node[0]}.{node[1]}.x"
    else:
        upgrade = f"upgrade pegaflow-node to {client[0]}.{client[1]}.x"
    return (
        f"pegaflow {client_version} (client) and pegaflow-node {node_version} are incompatible "
        f"(major.minor must match); {upgrade}"
    )


def check_hello_reply(reply: Mapping[str, Any], client_version: str) -> None:
    """Raises `IncompatibleVersion` when the node of this `hello` reply cannot serve us."""
    protocol = reply.get("protocol")
    if protocol != PROTOCOL_VERSION:
        older_node = isinstance(protocol, int) and protocol < PROTOCOL_VERSION
        upgrade = "pegaflow-node" if older_node else "the pegaflow package"
        raise IncompatibleVersion(
            f"pegaflow {client_version} (client) speaks protocol {PROTOCOL_VERSION}, "
            f"{reply.get('node', 'pegaflow-node')} speaks protocol {protocol!r}; upgrade {upgrade}"
        )
    node_version = reply.get("version")
    if node_version is None:  # a node older than the version check: protocol alone decides
        return
    reason = incompatibility(client_version, str(node_version))
    if reason is not None:
        raise IncompatibleVersion(reason)


def refused_hello(error: NodeError) -> IncompatibleVersion | None:
    """The typed error for a `hello` the node refused over versions, else None."""
    if error.code in (INCOMPATIBLE_VERSION, UNSUPPORTED_VERSION):
        return IncompatibleVersion(error.message)
    return None
