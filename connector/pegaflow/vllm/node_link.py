"""The connector's way to the node: a lazily (re)made client behind a circuit breaker.

Both roles use it so that a node that is down, slow or restarting costs each engine step at
most one bounded attempt per retry interval, and never an exception; a node whose version cannot
work with this package turns PegaFlow off for good, with one warning saying what to upgrade.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from ..client import Client
from ..errors import IncompatibleVersion, PegaFlowError
from .config import ConnectorConfig, NodeHealth

Reply = dict[str, Any]


class NodeLink:
    """Owns one `Client`; `submit` returns None instead of raising while the node is down."""

    def __init__(
        self,
        config: ConnectorConfig,
        role: str,
        on_connect: Callable[[Client], None] | None = None,
    ) -> None:
        self.config = config
        self.health = NodeHealth(config, role)
        self._on_connect = on_connect
        self._client: Client | None = None

    def client(self) -> Client | None:
        """The client, connecting first if needed; None while the node is considered down."""
        if self._client is not None:
            return self._client
        if not self.health.usable():
            return None
        try:
            client = Client(self.config.socket_path, timeout=self.config.connect_timeout_s)
            if self._on_connect is not None:
                self._on_connect(client)
        except (PegaFlowError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None
        self._client = client
        self.health.recovered()
        return client

    def submit(self, op: str, **fields: Any) -> concurrent.futures.Future[Reply] | None:
        client = self.client() if self.health.usable() else None
        if client is None:
            return None
        try:
            return client.submit(op, **fields)
        except (PegaFlowError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None

    def wait(self, future: concurrent.futures.Future[Reply], timeout: float) -> Reply | None:
        """The reply, or None after logging once if it failed or took longer than `timeout`."""
        try:
            reply = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            self.health.failed(TimeoutError(f"no reply within {timeout:g} s"))
            return None
        except (PegaFlowError, OSError) as exc:
            self._failed(exc)
            return None
        self.health.recovered()
        return reply

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, IncompatibleVersion):
            self.health.disable(error)
            self.close()
        else:
            self.health.failed(error)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
