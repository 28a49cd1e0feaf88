"""Thread-safe, pipelined client of pegaflow-node's Unix socket.

Any number of threads call one `Client` at once: requests go out under one writer lock, and one
reader thread per connection matches replies to `Future`s by `id`, so replies may arrive in any
order and a slow `load` never holds back a `lookup`. Registration is per connection on the node,
so after a reconnect the client registers every engine again and maps each `Engine` handle to
its new id; callers keep using the same handle. Requests in flight when a connection drops fail
with `ConnectionLost`; one that could not even be written (the node went away before this client
noticed) is sent again once, on the new connection.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._version import __version__
from .errors import ConnectionLost, NodeError, PegaFlowError, ProtocolError
from .handshake import check_hello_reply, refused_hello
from .keys import KEY_BYTES, Namespace
from .protocol import DEFAULT_MAX_FRAME_BYTES, HEADER, PROTOCOL_VERSION, encode_frame, read_frame

log = logging.getLogger(__name__)

Reply = dict[str, Any]


class _Unsent(ConnectionLost):
    """The request never left this process: the connection was dead before or while it was
    written, so the node never saw it and it may be sent again on a new connection."""


@dataclass(frozen=True)
class LookupResult:
    """`hits`: length of the longest held prefix; `lease`: id to `release`, if one was taken;
    `remote_hits`: how many of the `hits` only the node's fabric peers hold (a load fetches them
    first, and may get fewer)."""

    hits: int
    lease: int | None
    remote_hits: int = 0


@dataclass(frozen=True)
class SaveResult:
    """Per-save counts: newly `stored`, already `present`, `dropped` (no unleased page to evict)."""

    stored: int
    present: int
    dropped: int


class Engine:
    """A registered KV region; valid across reconnects because the client re-registers it."""

    def __init__(self, fields: Mapping[str, Any], reply: Mapping[str, Any]) -> None:
        self.fields = dict(fields)
        self.namespace: bytes = reply["namespace"]
        self.page_bytes: int = reply["page_bytes"]
        self.layer_events: list[bytes] = []
        self.update(reply)

    def update(self, reply: Mapping[str, Any]) -> None:
        """Takes the per-connection parts of a `register` reply: GPU engines' event handles,
        which `load` replies' `event_slots` index into (new ones after each re-register)."""
        self.layer_events = list(reply.get("layer_events", []))

    def __repr__(self) -> str:
        shm = self.fields["region"].get("shm")
        return f"Engine(shm={shm!r}, namespace={self.namespace.hex()[:12]})"


def join_keys(keys: Sequence[bytes]) -> bytes:
    """The `keys` bin field: 32-byte keys concatenated, each length checked before sending."""
    if isinstance(keys, (bytes, bytearray, memoryview)):
        raise ValueError("keys must be a sequence of 32-byte keys, not one bytes object")
    for index, key in enumerate(keys):
        if len(key) != KEY_BYTES:
            raise ValueError(f"keys[{index}] is {len(key)} bytes, a key is {KEY_BYTES}")
    return b"".join(keys)


class _Connection:
    """One socket: a writer lock, a reader thread, and the futures still waiting for replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
        self.engine_ids: dict[Engine, int] = {}
        self.engine_errors: dict[Engine, PegaFlowError] = {}
        self._rfile = sock.makefile("rb")
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, concurrent.futures.Future[Reply]]] = {}
        self._failure: tuple[type[PegaFlowError], str] | None = None
        self._reader = threading.Thread(target=self._read_loop, name="pegaflow-reader", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._failure is None

    @property
    def failure_reason(self) -> str:
        return self._failure[1] if self._failure else ""

    def engine_id(self, engine: Engine) -> int:
        if engine in self.engine_ids:
            return self.engine_ids[engine]
        if engine in self.engine_errors:
            raise PegaFlowError(
                f"{engine} could not be registered again after a reconnect: "
                f"{self.engine_errors[engine]}"
            )
        raise PegaFlowError(f"{engine} is not registered with this client")

    def send(self, op: str, fields: Mapping[str, Any]) -> concurrent.futures.Future[Reply]:
        """Writes one request; the future fails with ConnectionLost if the connection drops."""
        request_id = next(self._ids)
        frame = encode_frame({"v": PROTOCOL_VERSION, "id": request_id, "op": op, **fields})
        if len(frame) - HEADER.size > self.max_frame_bytes:
            raise ValueError(
                f"{op} request is {len(frame) - HEADER.size} bytes, over the node's limit of "
                f"{self.max_frame_bytes}; split it"
            )
        future: concurrent.futures.Future[Reply] = concurrent.futures.Future()
        with self._lock:
            if self._failure is not None:
                future.set_exception(_Unsent(f"{op}: {self._failure[1]}"))
                return future
            self._pending[request_id] = (op, future)
        with self._write_lock:
            try:
                self.sock.sendall(frame)
            except OSError as exc:
                with self._lock:
                    self._pending.pop(request_id, None)
                self.fail(ConnectionLost, f"sending to pegaflow-node failed: {exc}")
                future.set_exception(_Unsent(f"{op}: sending to pegaflow-node failed: {exc}"))
        return future

    def forget(self, future: concurrent.futures.Future[Reply]) -> None:
        """Drops a timed-out request so a late reply is ignored and nothing accumulates."""
        with self._lock:
            for request_id, (_, pending) in self._pending.items():
                if pending is future:
                    del self._pending[request_id]
                    return

    def fail(self, error_type: type[PegaFlowError], reason: str) -> None:
        """Marks the connection dead and fails every request in flight; idempotent."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = (error_type, reason)
            pending = list(self._pending.values())
            self._pending.clear()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, which closes the socket
        except OSError:
            pass
        for op, future in pending:
            future.set_exception(error_type(f"{op}: {reason}"))

    def close(self) -> None:
        self.fail(ConnectionLost, "client closed")
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def _read_loop(self) -> None:
        try:
            while self.alive:
                reply = read_frame(self._rfile)
                if reply is None:
                    self.fail(ConnectionLost, "pegaflow-node closed the connection")
                else:
                    self._dispatch(reply)
        except OSError as exc:
            self.fail(ConnectionLost, f"reading from pegaflow-node failed: {exc}")
        except ProtocolError as exc:
            self.fail(ProtocolError, f"pegaflow-node sent a bad frame: {exc}")
        finally:
            self._rfile.close()
            self.sock.close()

    def _dispatch(self, reply: Reply) -> None:
        request_id = reply.get("id")
        if request_id is None:
            # The node could not read one of our requests: the stream is no longer trusted.
            self.fail(
                ProtocolError,
                f"pegaflow-node could not parse a request: {reply.get('code')}: "
                f"{reply.get('message')}",
            )
            return
        with self._lock:
            entry = self._pending.pop(request_id, None)
        if entry is None:
            log.debug("reply to forgotten request %s ignored", request_id)
            return
        op, future = entry
        if reply.get("ok") is True:
            future.set_result(reply)
        else:
            code = str(reply.get("code", "missing_code"))
            future.set_exception(NodeError(code, str(reply.get("message", "")), op))


class Client:
    """Connection to one pegaflow-node; see the module docstring for threading and reconnects."""

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float = 30.0,
        reconnect: bool = True,
        max_backoff: float = 2.0,
        client_name: str = f"pegaflow-py/{__version__}",
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.client_name = client_name
        self.node_info: Reply = {}
        self._engines: list[Engine] = []
        self._closed = False
        self._state_lock = threading.Lock()  # guards connecting and the list of engines
        self._conn = self._open(time.monotonic() + timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection; the node then drops this client's engines and leases."""
        with self._state_lock:
            self._closed = True
            self._conn.close()

    def submit(self, op: str, **fields: Any) -> concurrent.futures.Future[Reply]:
        """Sends one request without waiting, for pipelining; the future holds the reply map.

        `Engine` values are sent as their id on the current connection; `keys` must be a sequence
        of 32-byte keys. Error replies fail the future with NodeError.
        """
        conn = self._connection()
        future = conn.send(op, self._wire_fields(conn, fields))
        if future.done() and isinstance(future.exception(), _Unsent):
            # The node closed the connection before this client noticed (a restart): the
            # request never reached it, so it goes again once, on the new connection.
            conn = self._connection()
            future = conn.send(op, self._wire_fields(conn, fields))
        return future

    def _wire_fields(self, conn: _Connection, fields: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self._wire_value(conn, name, value) for name, value in fields.items()}

    def hello(self) -> Reply:
        return self._call("hello", client=self.client_name, version=__version__)

    def register(
        self,
        namespace: Namespace,
        *,
        region: Mapping[str, Any],
        num_blocks: int,
        segment_bytes: int,
        layers: Sequence[Sequence[Sequence[int]]],
        engine_events: Sequence[bytes] = (),
        load_progress: str | None = None,
    ) -> Engine:
        """Registers a KV region; the handle stays valid across reconnects.

        GPU engines may pass `engine_events`: the 64-byte interprocess handles of events they
        created once (`torch.cuda.Event(interprocess=True).ipc_handle()`), which a `save`'s
        `after_events` then name so the node waits for the engine's writes GPU-side, and
        `load_progress`: the shm name of a `progress.ProgressBoard`, so loads are answered before
        their layers are enqueued, with a ticket.
        """
        fields: dict[str, Any] = {
            "namespace": namespace.to_wire(),
            "region": dict(region),
            "num_blocks": num_blocks,
            "segment_bytes": segment_bytes,
            "layers": [[list(segment) for segment in layer] for layer in layers],
        }
        if engine_events:
            fields["engine_events"] = [bytes(handle) for handle in engine_events]
        if load_progress is not None:
            fields["load_progress"] = load_progress
        with self._state_lock:  # a reconnect meanwhile must see this engine in the list
            conn = self._connect_locked()
            reply = self._wait(conn, conn.send("register", fields), "register", self.timeout)
            if reply["namespace"] != namespace.digest():
                raise ProtocolError(
                    f"node hashed the namespace to {reply['namespace'].hex()}, "
                    f"expected {namespace.digest().hex()}"
                )
            engine = Engine(fields, reply)
            conn.engine_ids[engine] = reply["engine"]
            self._engines.append(engine)
        return engine

    def lookup(self, keys: Sequence[bytes], lease: bool = False) -> LookupResult:
        reply = self._call("lookup", keys=keys, lease=lease)
        return LookupResult(reply["hits"], reply.get("lease"), reply.get("remote_hits", 0))

    def save(
        self,
        engine: Engine,
        keys: Sequence[bytes],
        block_ids: Sequence[int],
        after_events: Sequence[int] = (),
    ) -> SaveResult:
        """Copies blocks into the node; `after_events`: per layer, the `engine_events` slot
        recorded after the engine wrote that layer (the node's copy waits on it, GPU-side)."""
        fields = _transfer_fields(engine, keys, block_ids)
        if after_events:
            fields["after_events"] = list(after_events)
        reply = self._call("save", **fields)
        return SaveResult(reply["stored"], reply["present"], reply["dropped"])

    def load(self, engine: Engine, keys: Sequence[bytes], block_ids: Sequence[int]) -> int:
        """Copies held blocks into the region; returns how many leading blocks were loaded."""
        return self._call("load", **_transfer_fields(engine, keys, block_ids))["loaded"]

    def release(self, lease: int) -> int:
        return self._call("release", lease=lease)["released"]

    def stats(self) -> dict[str, Any]:
        return self._call("stats")["stats"]

    def _call(self, op: str, **fields: Any) -> Reply:
        future = self.submit(op, **fields)
        return self._wait(self._conn, future, op, self.timeout)

    @staticmethod
    def _wait(
        conn: _Connection, future: concurrent.futures.Future[Reply], op: str, timeout: float
    ) -> Reply:
        try:
            return future.result(timeout=max(timeout, 0.0))
        except concurrent.futures.TimeoutError:
            conn.forget(future)
            raise TimeoutError(
                f"pegaflow-node did not answer `{op}` within {timeout:g} s"
            ) from None

    @staticmethod
    def _wire_value(conn: _Connection, name: str, value: Any) -> Any:
        if isinstance(value, Engine):
            return conn.engine_id(value)
        if name == "keys":
            return join_keys(value)
        return value

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn.alive:
            return conn
        with self._state_lock:
            return self._connect_locked()

    def _connect_locked(self) -> _Connection:
        """The live connection, reconnecting first if it dropped; caller holds _state_lock."""
        if self._closed:
            raise PegaFlowError("client is closed")
        if self._conn.alive:
            return self._conn
        if not self.reconnect:
            raise ConnectionLost(
                f"connection to pegaflow-node at {self.socket_path} lost "
                f"({self._conn.failure_reason}) and reconnect is off"
            )
        self._conn = self._reconnect()
        return self._conn

    def _reconnect(self) -> _Connection:
        """Retries with exponential backoff, capped at max_backoff, for at most `timeout`."""
        deadline = time.monotonic() + self.timeout
        delay = min(0.05, self.max_backoff)
        while True:
            try:
                return self._open(deadline)
            except (ConnectionLost, TimeoutError) as exc:
                last_error = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLost(
                    f"cannot reconnect to pegaflow-node at {self.socket_path} within "
                    f"{self.timeout:g} s: {last_error}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, self.max_backoff)

    def _open(self, deadline: float) -> _Connection:
        """Connects, says hello, and registers every known engine on the new connection."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(self.socket_path)
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise ConnectionLost(
                f"cannot connect to pegaflow-node at {self.socket_path}: {exc}"
            ) from exc
        conn = _Connection(sock)
        try:
            hello = self._hello(conn, deadline)
            conn.max_frame_bytes = hello.get("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)
            self.node_info = hello
            self._register_all(conn, deadline)
        except BaseException:
            conn.close()
            raise
        return conn

    def _hello(self, conn: _Connection, deadline: float) -> Reply:
        """Says hello; raises `IncompatibleVersion` when this package and the node cannot work
        together, whichever side noticed (docs/protocol.md "Versions")."""
        request = {"client": self.client_name, "version": __version__}
        try:
            hello = self._wait(
                conn, conn.send("hello", request), "hello", deadline - time.monotonic()
            )
        except NodeError as exc:
            incompatible = refused_hello(exc)
            if incompatible is not None:
                raise incompatible from exc
            raise
        check_hello_reply(hello, __version__)
        return hello

    def _register_all(self, conn: _Connection, deadline: float) -> None:
        sent = [(engine, conn.send("register", engine.fields)) for engine in self._engines]
        for engine, future in sent:
            try:
                reply = self._wait(conn, future, "register", deadline - time.monotonic())
            except NodeError as exc:
                log.warning("%s could not be registered again: %s", engine, exc)
                conn.engine_errors[engine] = exc
                continue
            conn.engine_ids[engine] = reply["engine"]
            engine.update(reply)


def _transfer_fields(
    engine: Engine, keys: Sequence[bytes], block_ids: Sequence[int]
) -> dict[str, Any]:
    if len(keys) != len(block_ids):
        raise ValueError(f"{len(keys)} keys but {len(block_ids)} block ids; need one per key")
    return {"engine": engine, "keys": keys, "block_ids": list(block_ids)}
