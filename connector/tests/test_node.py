"""Integration tests against the real pegaflow-node binary (`cargo build` first)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from conftest import CONNECTOR_DIR, NodeProcess
from enginekit import (
    CHURN_BLOCKS,
    CHURN_NAMESPACE,
    RawConnection,
    assert_pages_equal,
    http_get,
    make_namespace,
    prompt_keys,
    prompt_pages,
    wait_for,
    write_pages,
)

from pegaflow import (
    Client,
    HostKvRegion,
    Namespace,
    NodeError,
    SaveResult,
    __version__,
    page_bytes,
)
from pegaflow.protocol import (
    BAD_FIELD,
    BAD_FRAME,
    BAD_KEY,
    FRAME_TOO_LARGE,
    HEADER,
    LAYOUT_MISMATCH,
    NOT_REGISTERED,
    OUT_OF_RANGE,
    REGION_UNAVAILABLE,
    UNKNOWN_LEASE,
    UNKNOWN_OP,
    UNSUPPORTED_VERSION,
)

pytestmark = pytest.mark.integration

LAYOUTS = ("vllm_lbnhc", "vllm_lbhnc", "kv_split", "mla")


def run_threads(*targets: Callable[[], None]) -> None:
    """Runs every target on its own thread at once and re-raises the first failure."""
    failures: list[BaseException] = []

    def guard(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # re-raised below, on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=guard, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def round_trip(node: NodeProcess, namespace: Namespace, seed: int, blocks: int = 12) -> None:
    """Saves random blocks from scattered ids of one region, loads them into another's."""
    rng = random.Random(seed)
    capacity = blocks + 4
    with (
        node.client() as client,
        HostKvRegion(namespace, capacity) as source,
        HostKvRegion(namespace, capacity) as target,
    ):
        source_ids = rng.sample(range(capacity), blocks)
        target_ids = rng.sample(range(capacity), blocks)
        keys = prompt_keys(namespace, seed, blocks)
        pages = prompt_pages(source.page_bytes, seed, blocks)
        write_pages(source, source_ids, pages)
        saver, loader = source.register(client), target.register(client)
        assert saver.page_bytes == source.page_bytes
        assert client.lookup(keys).hits == 0
        assert client.save(saver, keys, source_ids) == SaveResult(blocks, 0, 0)
        assert client.save(saver, keys[:3], source_ids[:3]) == SaveResult(0, 3, 0)
        assert client.lookup(keys).hits == blocks
        assert client.load(loader, keys, target_ids) == blocks
        assert_pages_equal([target.block_bytes(b) for b in target_ids], pages, str(namespace))
        untouched = sorted(set(range(capacity)) - set(target_ids))
        assert_pages_equal(
            [target.block_bytes(b) for b in untouched],
            [bytes(target.page_bytes)] * len(untouched),
            "blocks not loaded",
        )


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp8_e4m3"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_byte_exact_round_trips_four_engines_at_once(
    node: NodeProcess, block_size: int, dtype: str
) -> None:
    """One engine per layout, each with its own connection, region and namespace."""
    run_threads(
        *[
            lambda layout=layout, seed=seed: round_trip(
                node, make_namespace(layout, dtype, block_size, model=f"test/{layout}"), seed
            )
            for seed, layout in enumerate(LAYOUTS)
        ]
    )
    stats = node.stats()["pool"]
    assert stats["leased_bytes"] == 0
    assert stats["pages"] == 4 * 12


def test_lookup_and_load_stop_at_the_first_missing_key(node: NodeProcess) -> None:
    namespace = make_namespace()
    keys = prompt_keys(namespace, 1, 6)
    with (
        node.client() as client,
        HostKvRegion(namespace, 8) as source,
        HostKvRegion(namespace, 8) as target,
    ):
        pages = prompt_pages(source.page_bytes, 1, 6)
        write_pages(source, range(6), pages)
        saver, loader = source.register(client), target.register(client)
        held = [0, 1, 2, 4, 5]  # block 3 is never saved
        assert client.save(saver, [keys[i] for i in held], held).stored == 5
        assert client.lookup(keys).hits == 3
        assert client.load(loader, keys, [7, 6, 5, 4, 3, 2]) == 3
        assert_pages_equal([target.block_bytes(b) for b in (7, 6, 5)], pages[:3], "loaded")
        zero = [bytes(target.page_bytes)] * 3
        assert_pages_equal([target.block_bytes(b) for b in (4, 3, 2)], zero, "after the miss")


def load_prompt(client: Client, namespace: Namespace, seed: int, blocks: int) -> list[bytes]:
    """Looks a prompt up and loads its held prefix into a fresh region; returns those pages."""
    keys = prompt_keys(namespace, seed, blocks)
    with HostKvRegion(namespace, blocks) as region:
        hits = client.lookup(keys).hits
        assert client.load(region.register(client), keys[:hits], range(hits)) == hits
        return [region.block_bytes(block) for block in range(hits)]


def test_the_cache_outlives_its_engines(node: NodeProcess) -> None:
    """One engine exits normally after saving, another is SIGKILLed right after its reply."""
    blocks = 8
    exits = node.engine_process("save", "--seed", "11", "--blocks", str(blocks))
    killed = node.engine_process("save", "--seed", "12", "--blocks", str(blocks), "--hang")
    assert json.loads(killed.stdout.readline()) == {"stored": blocks, "dropped": 0}
    killed.send_signal(signal.SIGKILL)
    assert json.loads(exits.stdout.readline()) == {"stored": blocks, "dropped": 0}
    assert exits.wait(30) == 0
    assert killed.wait(30) == -signal.SIGKILL
    namespace = make_namespace(model="test/outlives")
    with node.client() as client:
        for seed in (11, 12):
            expected = prompt_pages(page_bytes(namespace), seed, blocks)
            assert_pages_equal(load_prompt(client, namespace, seed, blocks), expected, str(seed))


def test_killed_engines_leak_nothing(node: NodeProcess) -> None:
    """Engines SIGKILLed mid-save, mid-load and holding leases; what survives is exact."""
    modes = {"churn-save": 1, "churn-load": 2, "churn-lease": 3}  # mode -> seed
    engines = {mode: node.engine_process(mode, "--seed", str(seed)) for mode, seed in modes.items()}
    prompts: dict[str, int] = {}  # mode -> prompts that may have been (partly) stored
    for mode, process in engines.items():
        prompts[mode] = json.loads(process.stdout.readline())["prompts"]
        assert json.loads(process.stdout.readline()) == {"ready": True}, mode
    assert node.stats()["pool"]["leased_bytes"] > 0
    for mode, process in engines.items():
        process.stdin.write("go\n")
        process.stdin.flush()
        in_flight = json.loads(process.stdout.readline())  # a batch is on the wire: kill now
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL, mode
        assert in_flight["submitted"] == ("save" if mode == "churn-save" else "load")
        prompts[mode] = max(prompts[mode], in_flight["prompts"])
    stats = wait_for(
        node.stats,
        lambda s: (s["pool"]["leased_bytes"], s["sessions"], s["engines"]) == (0, 0, 0),
        10,
        "no leases, sessions or engines after the engines died",
    )
    churn_page_bytes = page_bytes(CHURN_NAMESPACE)
    assert stats["pool"]["used_bytes"] == stats["pool"]["pages"] * churn_page_bytes
    with node.client() as client:
        survivors = 0
        for mode, seed in modes.items():
            for prompt in range(prompts[mode]):
                prompt_seed = seed * 10_000 + prompt
                loaded = load_prompt(client, CHURN_NAMESPACE, prompt_seed, CHURN_BLOCKS)
                expected = prompt_pages(churn_page_bytes, prompt_seed, CHURN_BLOCKS)[: len(loaded)]
                assert_pages_equal(loaded, expected, f"{mode} prompt {prompt}")
                survivors += len(loaded)
    assert survivors > 0


def test_full_pool_evicts_least_recently_used(start_node: Callable[..., NodeProcess]) -> None:
    """8 MiB pool, 1 MiB pages: saves beyond capacity evict the oldest untouched pages."""
    node = start_node(pool_size=8 << 20, max_page_size=1 << 20)
    namespace = make_namespace(dtype="fp32", model="test/lru", num_layers=8, heads=8, head_dim=128)
    names = [f"A{i}" for i in range(8)] + [f"B{i}" for i in range(4)]
    keys = {name: prompt_keys(namespace, 500 + i, 1)[0] for i, name in enumerate(names)}
    with (
        node.client() as client,
        HostKvRegion(namespace, len(names)) as source,
        HostKvRegion(namespace, len(names)) as target,
    ):
        assert source.page_bytes == 1 << 20
        pages = dict(zip(names, source.fill_random(range(len(names)), seed=5), strict=True))
        saver, loader = source.register(client), target.register(client)
        capacity = node.stats()["pool"]["capacity_bytes"] // source.page_bytes
        lru: list[str] = []  # the model: least recently used first

        def save(name: str) -> None:
            result = client.save(saver, [keys[name]], [names.index(name)])
            assert result == SaveResult(1, 0, 0), name
            lru.append(name)
            del lru[: max(len(lru) - capacity, 0)]

        def touch(name: str) -> None:
            lru.remove(name)
            lru.append(name)

        for name in names[:8]:
            save(name)
        assert client.lookup([keys["A0"]]).hits == 1
        touch("A0")
        assert client.load(loader, [keys["A1"]], [0]) == 1
        touch("A1")
        for name in names[8:]:
            save(name)
        held = {name for name in names if client.lookup([keys[name]]).hits == 1}
        assert held == set(lru), f"pool kept {sorted(held)}, LRU keeps {sorted(lru)}"
        assert {"A0", "A1"} <= held
        for index, name in enumerate(sorted(held)):
            assert client.load(loader, [keys[name]], [index]) == 1
            assert_pages_equal([target.block_bytes(index)], [pages[name]], name)
        pool = node.stats()["pool"]
        assert pool["pages"] == len(held)
        assert pool["used_bytes"] == len(held) * source.page_bytes
        assert pool["evictions"] == len(names) - len(held)


def test_bad_frames_get_error_replies(node: NodeProcess) -> None:
    raw = RawConnection(node.socket)
    max_frame = raw.request("hello", client="raw")["max_frame_bytes"]
    cut = msgpack.packb({"v": 1, "id": 9, "op": "hello", "client": "raw"})[:-4]
    wrong = []
    for payload, problem in [
        (cut, "truncated"),
        (msgpack.packb({"v": 1, "id": 9, "op": "hello"}) + b"\xc0", "trailing bytes"),
        (msgpack.packb([1, 9, "hello"]), "array, not a map"),
        (msgpack.packb(5), "integer, not a map"),
    ]:
        reply = raw.send_payload(payload)
        if (reply["ok"], reply["id"], reply["code"]) != (False, None, BAD_FRAME):
            wrong.append(f"{problem}: {reply}")
        assert raw.request("hello", client="raw")["ok"] is True, f"connection after {problem}"
    reply = raw.exchange(HEADER.pack(max_frame + 1))
    assert (reply["ok"], reply["id"], reply["code"]) == (False, None, FRAME_TOO_LARGE)
    assert str(max_frame) in reply["message"]
    assert raw.at_eof(), "the node must close a connection after frame_too_large"
    raw.close()
    assert not wrong, "expected bad_frame with a nil id:\n" + "\n".join(wrong)


def bad_requests(engine: int, region: HostKvRegion) -> list[tuple[str, dict[str, Any], str, str]]:
    """(op, fields, code, text the message must contain): one case per documented error."""
    key = prompt_keys(region.namespace, 77, 1)[0]
    fields = region.register_fields()
    transfer = {"engine": engine, "keys": key}
    layers = region.namespace.num_layers  # a shared-memory region has no engine events
    return [
        ("frobnicate", {}, UNKNOWN_OP, "frobnicate"),
        ("hello", {"v": 2, "client": "raw"}, UNSUPPORTED_VERSION, "2"),
        ("save", {**transfer, "block_ids": "abc"}, BAD_FIELD, "block_ids"),
        ("save", {**transfer, "keys": key * 2, "block_ids": [0, "x"]}, BAD_FIELD, "block_ids[1]"),
        ("load", transfer, BAD_FIELD, "block_ids"),
        ("lookup", {"keys": "not bytes"}, BAD_FIELD, "keys"),
        ("save", {**transfer, "engine": "one", "block_ids": [0]}, BAD_FIELD, "engine"),
        ("lookup", {"keys": key + b"\x00"}, BAD_KEY, "keys"),
        ("save", {**transfer, "keys": key * 2, "block_ids": [0]}, BAD_KEY, "keys"),
        ("save", {**transfer, "block_ids": [region.num_blocks]}, OUT_OF_RANGE, "block_ids[0]"),
        (
            "save",
            {**transfer, "block_ids": [0], "after_events": [0] * (layers + 1)},
            BAD_FIELD,
            "after_events",
        ),
        (
            "save",
            {**transfer, "block_ids": [0], "after_events": [0] * layers},
            OUT_OF_RANGE,
            "after_events[0]",
        ),
        ("register", {**fields, "engine_events": [bytes(64)]}, BAD_FIELD, "engine_events"),
        ("register", {**fields, "load_progress": "pegaflow-x"}, BAD_FIELD, "load_progress"),
        (
            "load",
            {**transfer, "engine": engine + 1000, "block_ids": [0]},
            NOT_REGISTERED,
            str(engine + 1000),
        ),
        ("release", {"lease": 424242}, UNKNOWN_LEASE, "424242"),
        ("register", {**fields, "layers": fields["layers"][:-1]}, LAYOUT_MISMATCH, "layers"),
        (
            "register",
            {**fields, "segment_bytes": region.segment_bytes * 2},
            LAYOUT_MISMATCH,
            "segment_bytes",
        ),
        (
            "register",
            {**fields, "namespace": {**fields["namespace"], "num_layers": 5}},
            LAYOUT_MISMATCH,
            "num_layers",
        ),
        (
            "register",
            {**fields, "namespace": {**fields["namespace"], "block_size": "16"}},
            BAD_FIELD,
            "block_size",
        ),
        (
            "register",
            {k: v for k, v in fields.items() if k != "num_blocks"},
            BAD_FIELD,
            "num_blocks",
        ),
        (
            "register",
            {**fields, "region": {"shm": "pegaflow-kv-missing", "bytes": region.bytes}},
            REGION_UNAVAILABLE,
            "pegaflow-kv-missing",
        ),
        (
            "register",
            {**fields, "region": {"shm": region.name, "bytes": region.bytes * 2}},
            REGION_UNAVAILABLE,
            region.name,
        ),
        (
            "register",
            {**fields, "region": {"shm": region.name, "bytes": region.bytes // 2}},
            REGION_UNAVAILABLE,
            "layers",
        ),
        (
            "register",
            {**fields, "region": {"shm": "../etc/passwd", "bytes": region.bytes}},
            REGION_UNAVAILABLE,
            "../etc/passwd",
        ),
        (None, {"client": "raw"}, BAD_FIELD, "op"),
    ]


def test_bad_requests_get_documented_errors_while_others_work(node: NodeProcess) -> None:
    namespace = make_namespace(model="test/bad-input")
    stop = threading.Event()
    round_trips = 0

    def good_neighbour() -> None:
        nonlocal round_trips
        while not stop.is_set() or round_trips < 2:
            round_trip(node, make_namespace(model="test/neighbour"), 1000 + round_trips, 4)
            round_trips += 1

    with HostKvRegion(namespace, 4) as region:
        raw = RawConnection(node.socket)
        registered = raw.request("register", **region.register_fields())
        assert registered["ok"] is True, registered

        wrong: list[str] = []

        def bad_input() -> None:
            try:
                for op, fields, code, text in bad_requests(registered["engine"], region):
                    reply = raw.request(op, **fields)
                    case = f"{op} {sorted(fields)}: expected {code} naming {text!r}, got {reply}"
                    if reply["ok"] is not False or reply["code"] != code:
                        wrong.append(case)
                    elif text not in reply["message"]:
                        wrong.append(case)
                    assert raw.request("hello", client="raw")["ok"] is True, case
            finally:
                stop.set()

        run_threads(good_neighbour, bad_input)
        raw.close()
    assert not wrong, "\n".join(wrong)
    with node.client() as client:
        assert client.hello()["protocol"] == 1
    assert http_get(node.http_port, "/healthz")[0] == 200


def test_missing_id_reply_has_nil_id(node: NodeProcess) -> None:
    raw = RawConnection(node.socket)
    reply = raw.request("hello", id=None, client="raw")
    assert reply["id"] is None and reply["code"] == BAD_FIELD
    raw.close()


def test_http_endpoints(node: NodeProcess) -> None:
    namespace = make_namespace(model="test/http")
    with node.client() as client, HostKvRegion(namespace, 4) as region:
        engine = region.register(client)
        keys = prompt_keys(namespace, 3, 4)
        region.fill_random(range(4), seed=3)
        assert client.save(engine, keys, range(4)).stored == 4
        lease = client.lookup(keys, lease=True)
        assert lease.hits == 4 and lease.lease is not None
        stats = node.stats()
        pool = stats["pool"]
        assert pool["pages"] == 4
        assert pool["used_bytes"] == 4 * region.page_bytes
        assert pool["leased_bytes"] == 4 * region.page_bytes
        assert pool["capacity_bytes"] == node.pool_size
        assert pool["evictions"] == 0
        assert (stats["sessions"], stats["engines"]) == (1, 1)
        assert set(client.stats()) == set(stats)
        assert client.release(lease.lease) == 4
        assert node.stats()["pool"]["leased_bytes"] == 0
        with pytest.raises(NodeError) as raised:
            client.release(lease.lease)
        assert raised.value.code == UNKNOWN_LEASE
    status, _, body = http_get(node.http_port, "/healthz")
    assert status == 200
    status, content_type, metrics = http_get(node.http_port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    names = {line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE")}
    assert names and all(name.startswith("pegaflow_") for name in names), names


def test_engine_handles_survive_a_node_restart(start_node: Callable[..., NodeProcess]) -> None:
    """The client reconnects to a restarted node and registers its engines again."""
    node = start_node()
    namespace = make_namespace(model="test/restart")
    keys = prompt_keys(namespace, 9, 4)
    with (
        node.client(timeout=15) as client,
        HostKvRegion(namespace, 4) as source,
        HostKvRegion(namespace, 4) as target,
    ):
        pages = source.fill_random(range(4), seed=9)
        saver, loader = source.register(client), target.register(client)
        assert client.save(saver, keys, range(4)).stored == 4
        assert node.stop() == 0
        node.start()
        assert client.lookup(keys).hits == 0  # the pool lives in memory only
        assert client.save(saver, keys, range(4)).stored == 4
        assert client.load(loader, keys, [3, 2, 1, 0]) == 4
        assert_pages_equal([target.block_bytes(b) for b in (3, 2, 1, 0)], pages, "after restart")


def test_demo_and_stats_commands(node: NodeProcess) -> None:
    def run(*command: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "pegaflow", *command, "--socket", str(node.socket)],
            capture_output=True, text=True, timeout=60, cwd=CONNECTOR_DIR,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "byte-exact" in run("demo", "--blocks", "8")
    summary = run("stats")
    assert len(summary.splitlines()) < 25 and "bucket" not in summary, summary
    assert summary.startswith(f"pegaflow-node {__version__}, dma host"), summary
    assert "lookups: 16 blocks, 8 hits (50.0%" in summary, summary
    assert "saved: 8 blocks" in summary and "load copies on host: 1 jobs" in summary, summary
    document = json.loads(run("stats", "--json"))
    assert "capacity_bytes" in document["pool"]
    assert document["totals"]["saved_blocks"] == 8
    assert document["transfers"][0]["load"]["gb_per_s"] > 0
    assert document["requests"]["lookup"]["buckets"]
