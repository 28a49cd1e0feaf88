"""The client against a scripted fake node: pipelining, errors, reconnects, timeouts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pegaflow import (
    Client,
    ConnectionLost,
    IncompatibleVersion,
    Namespace,
    NodeError,
    PegaFlowError,
    ProtocolError,
    __version__,
    chain_keys,
    encode_frame,
)
from pegaflow.protocol import read_frame

NAMESPACE = Namespace("fake/model", "bf16", "vllm_lbnhc", 16, 1, 1, 16)
KEYS = chain_keys(NAMESPACE.digest(), list(range(16 * 8)), 16)
REGION_FIELDS: dict[str, Any] = {
    "region": {"shm": "pegaflow-kv-fake", "bytes": 1024},
    "num_blocks": 8,
    "segment_bytes": 128,
    "layers": [[[0, 128]]],
}


class FakeConnection:
    """One accepted connection; handlers answer through it."""

    def __init__(self, node: FakeNode, sock: socket.socket, index: int) -> None:
        self.node = node
        self.sock = sock
        self.index = index
        self.engines = 0
        self.send_lock = threading.Lock()

    def reply(self, request: dict[str, Any], **fields: Any) -> None:
        self.send({"id": request["id"], "ok": True, **fields})

    def error(self, request: dict[str, Any], code: str, message: str) -> None:
        self.send({"id": request["id"], "ok": False, "code": code, "message": message})

    def send(self, message: dict[str, Any]) -> None:
        with self.send_lock:
            self.sock.sendall(encode_frame(message))

    def drop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)


Handler = Callable[[FakeConnection, dict[str, Any]], None]


def standard(conn: FakeConnection, request: dict[str, Any]) -> None:
    """What a healthy node answers; engine ids differ per connection (100 * index + n)."""
    op = request["op"]
    count = len(request.get("keys", b"")) // 32
    if op == "hello":
        conn.reply(
            request,
            protocol=1,
            node="fake",
            dma="host",
            pool_bytes=1 << 20,
            max_frame_bytes=1 << 20,
        )
    elif op == "register":
        conn.engines += 1
        conn.reply(
            request,
            engine=100 * conn.index + conn.engines,
            page_bytes=128,
            namespace=Namespace(**request["namespace"]).digest(),
        )
    elif op == "lookup":
        conn.reply(request, hits=count, lease=7 if request.get("lease") else None)
    elif op == "save":
        conn.reply(request, stored=count, present=0, dropped=0)
    elif op == "load":
        conn.reply(request, loaded=count)
    elif op == "stats":
        conn.reply(request, stats={"pool": {"pages": 0}})
    else:
        conn.error(request, "unknown_op", f"unknown op `{op}`")


class FakeNode:
    """A Unix-socket server thread that records requests and answers through `handler`."""

    def __init__(self, path: Path, handler: Handler = standard) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[tuple[int, dict[str, Any]]] = []  # (connection index, request)
        self.failures: list[BaseException] = []
        self.connections: list[FakeConnection] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._listener.settimeout(0.05)
        self._stopped = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def ops(self, connection: int) -> list[str]:
        return [request["op"] for index, request in self.requests if index == connection]

    def stop(self) -> None:
        """Stops accepting, drops every connection and removes the socket file."""
        self._stopped.set()
        self._listener.close()
        for conn in self.connections:
            try:
                conn.drop()
            except OSError:
                pass
        self.path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = FakeConnection(self, sock, len(self.connections))
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: FakeConnection) -> None:
        stream = conn.sock.makefile("rb")
        try:
            while (request := read_frame(stream)) is not None:
                self.requests.append((conn.index, request))
                self.handler(conn, request)
        except OSError:
            pass  # dropped on purpose by a test
        except BaseException as exc:  # surfaced by the fixture, never swallowed
            self.failures.append(exc)
        finally:
            conn.sock.close()


@pytest.fixture
def fake_node(short_tmp: Path) -> Iterator[Callable[..., FakeNode]]:
    nodes: list[FakeNode] = []

    def start(handler: Handler = standard) -> FakeNode:
        nodes.append(FakeNode(short_tmp / "fake.sock", handler))
        return nodes[-1]

    yield start
    for node in nodes:
        node.stop()
        assert not node.failures, node.failures


def reversed_batches(op: str, size: int) -> Handler:
    """Holds `op` requests until `size` arrived, then answers them last first."""
    held: list[dict[str, Any]] = []

    def handler(conn: FakeConnection, request: dict[str, Any]) -> None:
        if request["op"] != op:
            return standard(conn, request)
        held.append(request)
        if len(held) == size:
            for waiting in reversed(held):
                standard(conn, waiting)
            held.clear()

    return handler


def failing_op(op: str, action: Callable[[FakeConnection, dict[str, Any]], None]) -> Handler:
    def handler(conn: FakeConnection, request: dict[str, Any]) -> None:
        if request["op"] == op:
            action(conn, request)
        else:
            standard(conn, request)

    return handler


def test_hello_is_sent_on_connect(fake_node: Callable[..., FakeNode]) -> None:
    node = fake_node()
    with Client(str(node.path)) as client:
        assert client.node_info["node"] == "fake"
        assert node.requests[0][1]["client"].startswith("pegaflow-py/")
    assert node.ops(0) == ["hello"]


def test_threads_share_one_connection_with_out_of_order_replies(
    fake_node: Callable[..., FakeNode],
) -> None:
    threads = 8
    node = fake_node(reversed_batches("lookup", threads))
    results: dict[int, int] = {}
    with Client(str(node.path), timeout=5) as client:

        def worker(count: int) -> None:
            results[count] = client.lookup(KEYS[:count]).hits

        workers = [threading.Thread(target=worker, args=(n,)) for n in range(1, threads + 1)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    assert results == {n: n for n in range(1, threads + 1)}
    assert len(node.connections) == 1


def test_submit_pipelines_and_matches_replies_by_id(fake_node: Callable[..., FakeNode]) -> None:
    node = fake_node(reversed_batches("save", 4))
    with Client(str(node.path), timeout=5) as client:
        engine = client.register(NAMESPACE, **REGION_FIELDS)
        futures = [
            client.submit("save", engine=engine, keys=KEYS[:n], block_ids=list(range(n)))
            for n in range(1, 5)
        ]
        assert [future.result(5)["stored"] for future in futures] == [1, 2, 3, 4]
    saves = [request for _, request in node.requests if request["op"] == "save"]
    assert all(request["engine"] == 1 for request in saves)
    assert saves[2]["keys"] == b"".join(KEYS[:3])


def test_error_reply_raises_node_error_and_keeps_the_connection(
    fake_node: Callable[..., FakeNode],
) -> None:
    message = "field `block_ids[0]`: block id 9 is not below num_blocks 8"
    node = fake_node(failing_op("load", lambda c, r: c.error(r, "out_of_range", message)))
    with Client(str(node.path)) as client:
        engine = client.register(NAMESPACE, **REGION_FIELDS)
        with pytest.raises(NodeError) as raised:
            client.load(engine, KEYS[:1], [9])
        assert raised.value.code == "out_of_range"
        assert raised.value.message == message
        assert "out_of_range" in str(raised.value) and message in str(raised.value)
        assert client.lookup(KEYS[:2]).hits == 2
    assert len(node.connections) == 1


def test_connection_loss_fails_in_flight_then_reconnects_and_reregisters(
    fake_node: Callable[..., FakeNode],
) -> None:
    def first_connection_hangs_then_dies(conn: FakeConnection, request: dict[str, Any]) -> None:
        if conn.index > 0 or request["op"] in ("hello", "register"):
            standard(conn, request)
        elif request["op"] == "save":
            conn.drop()  # lookups before it are still unanswered

    node = fake_node(first_connection_hangs_then_dies)
    with Client(str(node.path), timeout=5) as client:
        engines = [client.register(NAMESPACE, **REGION_FIELDS) for _ in range(2)]
        in_flight = [client.submit("lookup", keys=KEYS[:1]) for _ in range(3)]
        in_flight.append(client.submit("save", engine=engines[1], keys=KEYS[:1], block_ids=[0]))
        for future in in_flight:
            assert isinstance(future.exception(5), ConnectionLost)
        assert client.save(engines[1], KEYS[:2], [0, 1]).stored == 2
        assert client.save(engines[0], KEYS[:1], [0]).stored == 1
    assert node.ops(1) == ["hello", "register", "register", "save", "save"]
    first = [r for i, r in node.requests if i == 0 and r["op"] == "register"]
    again = [r for i, r in node.requests if i == 1 and r["op"] == "register"]
    assert [{k: v for k, v in r.items() if k != "id"} for r in again] == [
        {k: v for k, v in r.items() if k != "id"} for r in first
    ]
    saves = [r["engine"] for i, r in node.requests if i == 1 and r["op"] == "save"]
    assert saves == [102, 101]  # the new connection's ids, in handle order


def test_reconnect_waits_with_backoff_for_a_restarted_node(
    fake_node: Callable[..., FakeNode],
) -> None:
    node = fake_node()
    with Client(str(node.path), timeout=5, max_backoff=0.1) as client:
        engine = client.register(NAMESPACE, **REGION_FIELDS)
        node.stop()
        restarted: list[FakeNode] = []
        timer = threading.Timer(0.4, lambda: restarted.append(fake_node()))
        timer.start()
        start = time.monotonic()
        assert client.load(engine, KEYS[:3], [0, 1, 2]) == 3
        assert 0.3 < time.monotonic() - start < 3
        timer.join()
        assert restarted[0].ops(0) == ["hello", "register", "load"]


def test_reconnect_gives_up_after_timeout(fake_node: Callable[..., FakeNode]) -> None:
    node = fake_node()
    with Client(str(node.path), timeout=0.5, max_backoff=0.1) as client:
        node.stop()
        with pytest.raises(ConnectionLost):  # may still go out on the dying connection
            client.stats()
        start = time.monotonic()
        with pytest.raises(ConnectionLost, match="cannot reconnect .* within 0.5 s"):
            client.stats()
        assert 0.4 < time.monotonic() - start < 2


def test_no_reconnect_when_disabled(fake_node: Callable[..., FakeNode]) -> None:
    node = fake_node(failing_op("save", lambda conn, request: conn.drop()))
    with Client(str(node.path), reconnect=False) as client:
        engine = client.register(NAMESPACE, **REGION_FIELDS)
        with pytest.raises(ConnectionLost):
            client.save(engine, KEYS[:1], [0])
        with pytest.raises(ConnectionLost, match="reconnect is off"):
            client.stats()
    assert len(node.connections) == 1


def test_timeout_names_the_op_and_late_replies_are_ignored(
    fake_node: Callable[..., FakeNode],
) -> None:
    held: list[dict[str, Any]] = []
    node = fake_node(failing_op("stats", lambda conn, request: held.append(request)))
    with Client(str(node.path), timeout=0.2) as client:
        with pytest.raises(TimeoutError, match="`stats`"):
            client.stats()
        standard(node.connections[0], held[0])  # the late reply
        assert client.lookup(KEYS[:1]).hits == 1


def test_wrong_protocol_version_is_refused(fake_node: Callable[..., FakeNode]) -> None:
    node = fake_node(
        failing_op("hello", lambda conn, request: conn.reply(request, protocol=2, node="fake"))
    )
    with pytest.raises(IncompatibleVersion) as refused:
        Client(str(node.path))
    assert str(refused.value) == (
        f"pegaflow {__version__} (client) speaks protocol 1, fake speaks protocol 2; "
        "upgrade the pegaflow package"
    )


def test_a_node_of_another_minor_release_is_refused_by_the_client(
    fake_node: Callable[..., FakeNode],
) -> None:
    """A node that does not check versions itself: the client's own check refuses it."""
    major, minor = (int(part) for part in __version__.split(".")[:2])
    newer = f"{major}.{minor + 1}.0"
    node = fake_node(
        failing_op("hello", lambda conn, request: conn.reply(request, protocol=1, version=newer))
    )
    with pytest.raises(IncompatibleVersion) as refused:
        Client(str(node.path), reconnect=False)
    assert str(refused.value) == (
        f"pegaflow {__version__} (client) and pegaflow-node {newer} are incompatible "
        f"(major.minor must match); upgrade the pegaflow package to {major}.{minor + 1}.x"
    )
    assert node.requests[0][1]["version"] == __version__


def test_error_without_id_fails_pending_requests(fake_node: Callable[..., FakeNode]) -> None:
    def no_id(conn: FakeConnection, request: dict[str, Any]) -> None:
        conn.send({"id": None, "ok": False, "code": "bad_frame", "message": "truncated"})

    node = fake_node(failing_op("stats", no_id))
    with Client(str(node.path), reconnect=False) as client:
        with pytest.raises(ProtocolError, match="bad_frame: truncated"):
            client.stats()


def test_keys_are_checked_before_sending(fake_node: Callable[..., FakeNode]) -> None:
    node = fake_node()
    with Client(str(node.path)) as client:
        engine = client.register(NAMESPACE, **REGION_FIELDS)
        with pytest.raises(ValueError, match=r"keys\[1\] is 31 bytes"):
            client.lookup([KEYS[0], KEYS[1][:31]])
        with pytest.raises(ValueError, match="not one bytes object"):
            client.lookup(KEYS[0])
        with pytest.raises(ValueError, match="2 keys but 1 block ids"):
            client.save(engine, KEYS[:2], [0])
    assert node.ops(0) == ["hello", "register"]


def test_cannot_connect_is_a_clear_error(short_tmp: Path) -> None:
    with pytest.raises(ConnectionLost, match="cannot connect to pegaflow-node at .*missing"):
        Client(str(short_tmp / "missing.sock"))


def test_closed_client_refuses_calls(fake_node: Callable[..., FakeNode]) -> None:
    node = fake_node()
    client = Client(str(node.path))
    client.close()
    with pytest.raises(PegaFlowError, match="closed"):
        client.stats()
