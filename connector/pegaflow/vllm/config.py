"""The connector's options, read from `kv_connector_extra_config`.

Every option has a default so the bare `--kv-transfer-config` of the quick start works; unknown
keys are an error because a misspelt option silently ignored costs hours.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("pegaflow.connector")

DEFAULT_SOCKET = "/tmp/pegaflow.sock"


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """`kv_connector_extra_config` keys; see docs/vllm.md for each one."""

    socket_path: str = DEFAULT_SOCKET
    connect_timeout_s: float = 2.0
    lookup_timeout_s: float = 1.0
    load_timeout_s: float = 30.0
    save_timeout_s: float = 30.0
    retry_interval_s: float = 10.0
    save: bool = True
    save_decode: bool = True
    model_id: str | None = None
    stats_interval_s: float = 30.0
    recompute_on_load_error: bool = True

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        """Builds the config, naming the offending key on any error."""
        extra = dict(extra or {})
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(fields))
        if unknown:
            raise ValueError(
                f"kv_connector_extra_config: unknown key(s) {unknown}; known: {sorted(fields)}"
            )
        values: dict[str, Any] = {}
        for name, value in extra.items():
            default = fields[name].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"kv_connector_extra_config.{name} must be true or false")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(
                        f"kv_connector_extra_config.{name} must be a positive number of seconds"
                    )
                value = float(value)
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"kv_connector_extra_config.{name} must be a string")
            values[name] = value
        return cls(**values)


class NodeHealth:
    """Circuit breaker around the node: after a failure, calls are skipped for a while.

    The client reconnects by itself, but each attempt can block for `connect_timeout_s`; an
    engine step must not pay that every time, so a down node is retried once per
    `retry_interval_s`. The first failure is a warning, later ones are debug lines. A node
    whose version cannot work with this package (`disable`) is never retried.
    """

    def __init__(self, config: ConnectorConfig, role: str) -> None:
        self._retry_interval = config.retry_interval_s
        self._socket = config.socket_path
        self._role = role
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._warned = False
        self._disabled = False

    def usable(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._down_until

    def disable(self, error: BaseException) -> None:
        """Turns PegaFlow off for good, with one warning: retrying cannot fix `error`
        (incompatible versions; the message says what to upgrade)."""
        with self._lock:
            if self._disabled:
                return
            self._disabled = True
            self._down_until = float("inf")
            log.warning(
                "PegaFlow %s: %s; PegaFlow is off, serving without the cache", self._role, error
            )

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self._disabled:
                return
            self._down_until = time.monotonic() + self._retry_interval
            if not self._warned:
                self._warned = True
                log.warning(
                    "PegaFlow %s: node at %s unusable (%s); serving without the cache, "
                    "retrying every %g s",
                    self._role,
                    self._socket,
                    error,
                    self._retry_interval,
                )
            else:
                log.debug("PegaFlow %s: node still unusable: %s", self._role, error)

    def recovered(self) -> None:
        with self._lock:
            if self._disabled:
                return
            if self._warned:
                log.info("PegaFlow %s: node at %s is back", self._role, self._socket)
            self._warned = False
            self._down_until = 0.0
