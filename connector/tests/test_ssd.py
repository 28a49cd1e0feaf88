"""The SSD tier against the real node: spill and promote, restarts, corruption, disk errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NODE_BIN, NodeProcess
from enginekit import (
    CHURN_NAMESPACE,
    assert_pages_equal,
    prompt_keys,
    prompt_pages,
    wait_for,
    write_pages,
)

from pegaflow import Client, ConnectionLost, Engine, HostKvRegion, NodeError, page_bytes

pytestmark = pytest.mark.integration

PAGE = page_bytes(CHURN_NAMESPACE)  # 256 KiB: 4 layers of 64 KiB
BLOCKS = 8  # blocks per prompt
RECORD_HEADER = 64  # bytes before a record's data (docs/ssd.md)


def save_prompt(
    client: Client, engine: Engine, region: HostKvRegion, seed: int, *, persist: bool = False
) -> dict[str, Any]:
    """Saves prompt `seed` (BLOCKS blocks) from blocks 0..BLOCKS of `region`; the reply."""
    write_pages(region, range(BLOCKS), prompt_pages(PAGE, seed, BLOCKS))
    fields = {"persist": True} if persist else {}
    future = client.submit(
        "save",
        engine=engine,
        keys=prompt_keys(CHURN_NAMESPACE, seed, BLOCKS),
        block_ids=list(range(BLOCKS)),
        **fields,
    )
    return future.result(60)


def save_prompts(
    client: Client, region: HostKvRegion, seeds: range, *, persist: bool = False
) -> list[dict[str, Any]]:
    engine = region.register(client)
    return [save_prompt(client, engine, region, seed, persist=persist) for seed in seeds]


def load_prompt(client: Client, region: HostKvRegion, seed: int, keys_from: int = 0) -> int:
    """Loads prompt `seed` from block `keys_from` on; checks what loaded; returns the count."""
    keys = prompt_keys(CHURN_NAMESPACE, seed, BLOCKS)[keys_from:]
    loaded = client.load(region.register(client), keys, range(len(keys)))
    expected = prompt_pages(PAGE, seed, BLOCKS)[keys_from : keys_from + loaded]
    assert_pages_equal([region.block_bytes(b) for b in range(loaded)], expected, f"prompt {seed}")
    return loaded


def ssd_node(
    start_node: Callable[..., NodeProcess], ssd_dir: Path, pages: int = 8, **ssd: str
) -> NodeProcess:
    """A node whose pool holds `pages` pages, over an SSD tier in `ssd_dir`."""
    return start_node(
        pool_size=pages * PAGE,
        max_page_size=1 << 20,
        ssd={"dir": str(ssd_dir), "size": "256MiB", **ssd},
    )


def restart(node: NodeProcess, *, kill: bool) -> None:
    if kill:
        node.kill()
    else:
        assert node.stop() == 0, node.log()
    node.start()


def check_ssd(ssd_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NODE_BIN), "--check-ssd", str(ssd_dir)], capture_output=True, text=True, timeout=60
    )


def test_blocks_beyond_the_pool_load_byte_exact_from_ssd(
    start_node: Callable[..., NodeProcess], short_tmp: Path
) -> None:
    node = ssd_node(start_node, short_tmp / "ssd", admission="always")
    prompts = range(8)  # 64 blocks of 256 KiB: 16 MiB through an 8-page pool
    with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
        for reply in save_prompts(client, region, prompts):
            assert (reply["stored"], reply["dropped"]) == (BLOCKS, 0)
        stats = wait_for(
            node.stats,
            lambda s: s["ssd"]["pages"] + s["pool"]["pages"] >= len(prompts) * BLOCKS,
            10,
            "every evicted block written to SSD",
        )
        assert stats["ssd"]["writes"] >= (len(prompts) - 1) * BLOCKS
        first = prompt_keys(CHURN_NAMESPACE, 0, BLOCKS)
        reply = client.submit("lookup", keys=first).result(10)
        assert (reply["hits"], reply["ssd_hits"]) == (BLOCKS, BLOCKS)
        for seed in prompts:
            assert load_prompt(client, region, seed) == BLOCKS
    stats = node.stats()["ssd"]
    assert stats["reads"] >= BLOCKS
    assert stats["checksum_failures"] == 0
    assert node.stats()["pool"]["leased_bytes"] == 0
    assert node.metric("pegaflow_ssd_reads_total") == stats["reads"]


@pytest.mark.parametrize("kill", [False, True], ids=["graceful", "kill-9"])
def test_persisted_blocks_survive_a_restart(
    start_node: Callable[..., NodeProcess], short_tmp: Path, kill: bool
) -> None:
    """`admission=never`: only `persist` puts blocks on SSD, so what survives is its doing."""
    node = ssd_node(start_node, short_tmp / "ssd", admission="never")
    with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
        for reply in save_prompts(client, region, range(4), persist=True):
            assert reply["persisted"] == BLOCKS
        assert save_prompts(client, region, range(4, 5))[0].get("persisted") is None
    restart(node, kill=kill)
    with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
        for seed in range(4):
            assert load_prompt(client, region, seed) == BLOCKS
        assert client.lookup(prompt_keys(CHURN_NAMESPACE, 4, BLOCKS)).hits == 0


def test_kill_9_during_heavy_writes_keeps_every_acknowledged_block(
    start_node: Callable[..., NodeProcess], short_tmp: Path
) -> None:
    """Writers persist and spill until the node is SIGKILLed; a torn tail is then dropped."""
    ssd_dir = short_tmp / "ssd"
    node = ssd_node(start_node, ssd_dir, pages=32, admission="always")
    acknowledged: list[int] = []
    stop = threading.Event()

    def writer(first_seed: int) -> None:
        with Client(str(node.socket), reconnect=False, timeout=60) as client:
            region = HostKvRegion(CHURN_NAMESPACE, BLOCKS)
            try:
                engine = region.register(client)
                for seed in range(first_seed, 1 << 30, 2):
                    if stop.is_set():
                        break
                    reply = save_prompt(client, engine, region, seed, persist=True)
                    if reply["persisted"] == BLOCKS:
                        acknowledged.append(seed)
            except (ConnectionLost, NodeError):
                pass  # the node was killed under us
            finally:
                region.close()

    threads = [threading.Thread(target=writer, args=(first,)) for first in (0, 1)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(acknowledged), lambda n: n >= 12, 60, "persisted saves")
    node.kill()
    stop.set()
    for thread in threads:
        thread.join(60)
    proven = sorted(acknowledged)

    # A torn record at the end of the open segment, as a crash mid-write leaves it: a valid
    # header copied from the segment's first record, and only half its data.
    manifest = json.loads((ssd_dir / "MANIFEST").read_text())
    sealed = {int(k) for k in manifest["sealed"]}
    open_segments = [
        p for p in sorted(ssd_dir.glob("seg-*.pfs"))
        if int(p.stem[4:]) not in sealed and p.stat().st_size > 0
    ]  # fmt: skip
    assert open_segments, sorted(ssd_dir.iterdir())
    segment = open_segments[-1]
    data = segment.read_bytes()
    with segment.open("ab") as tail:
        tail.write(data[:4096])  # header + the first part of the data; the record is longer
    assert check_ssd(ssd_dir).returncode == 0, "a torn tail is expected after a crash, not corrupt"

    node.start()
    assert "dropped a torn tail" in node.log()
    with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
        for seed in proven:
            assert load_prompt(client, region, seed) == BLOCKS, f"acknowledged prompt {seed}"
    assert check_ssd(ssd_dir).returncode == 0


def test_a_flipped_byte_is_a_miss_and_the_rest_of_the_segment_is_served(
    start_node: Callable[..., NodeProcess], short_tmp: Path
) -> None:
    ssd_dir = short_tmp / "ssd"
    node = ssd_node(start_node, ssd_dir, admission="never")
    with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
        assert save_prompts(client, region, range(1), persist=True)[0]["persisted"] == BLOCKS
    assert node.stop() == 0
    keys = prompt_keys(CHURN_NAMESPACE, 0, BLOCKS)
    [segment] = sorted(ssd_dir.glob("seg-*.pfs"))
    raw = bytearray(segment.read_bytes())
    record = raw.index(keys[3]) - 8  # the key sits 8 bytes into its record's header
    raw[record + RECORD_HEADER + 1000] ^= 0x01
    segment.write_bytes(bytes(raw))

    checked = check_ssd(ssd_dir)
    assert checked.returncode == 1, checked.stdout
    assert f"{segment}: corrupt page at offset {record}" in checked.stdout
    assert "7 pages ok" in checked.stdout

    node.start()
    with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
        assert client.lookup(keys).hits == BLOCKS, "not read yet: the index still lists it"
        assert load_prompt(client, region, 0) == 3, "stops at the corrupt block"
        assert load_prompt(client, region, 0, keys_from=4) == BLOCKS - 4, "rest still served"
        assert client.lookup(keys).hits == 3, "the corrupt block is forgotten"
    assert node.metric("pegaflow_ssd_checksum_failures_total") == 1
    assert node.stats()["ssd"]["checksum_failures"] == 1
    log = re.sub(r"\x1b\[[0-9;]*m", "", node.log())  # without the terminal colours
    assert "corrupt SSD page" in log and str(segment) in log and f"offset={record}" in log


@pytest.fixture
def tiny_tmpfs(short_tmp: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root, as in CI containers); skipped where mounting is not allowed."""
    mount = short_tmp / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tiny tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_stops_spills_and_the_node_keeps_serving_from_memory(
    start_node: Callable[..., NodeProcess], tiny_tmpfs: Path
) -> None:
    node = ssd_node(start_node, tiny_tmpfs / "ssd", admission="always")
    with node.client() as client, HostKvRegion(CHURN_NAMESPACE, BLOCKS) as region:
        for reply in save_prompts(client, region, range(6)):  # 12 MiB of spills into 2 MiB
            assert (reply["stored"], reply["dropped"]) == (BLOCKS, 0)
        stats = wait_for(
            node.stats, lambda s: not s["ssd"]["healthy"], 10, "the SSD tier stops on ENOSPC"
        )
        assert stats["ssd"]["write_errors"] >= 1
        assert node.metric("pegaflow_ssd_write_errors_total") >= 1
        assert node.metric("pegaflow_ssd_healthy") == 0
        # Saves still succeed, and what memory holds loads byte-exact.
        assert save_prompts(client, region, range(6, 7))[0]["stored"] == BLOCKS
        assert load_prompt(client, region, 6) == BLOCKS
        reply = client.submit(
            "save",
            engine=region.register(client),
            keys=prompt_keys(CHURN_NAMESPACE, 6, BLOCKS),
            block_ids=list(range(BLOCKS)),
            persist=True,
        ).result(30)
        assert reply["persisted"] == 0, "nothing is claimed durable on a full disk"
    assert "ENOSPC" in node.log() and str(tiny_tmpfs / "ssd") in node.log()


def test_an_unwritable_ssd_dir_fails_start_naming_it(short_tmp: Path) -> None:
    ssd_dir = short_tmp / "ro"
    ssd_dir.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: use a read-only mount instead
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M,ro", "tmpfs", str(ssd_dir)],
            capture_output=True,
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    else:
        ssd_dir.chmod(0o555)
    try:
        result = subprocess.run(
            [str(NODE_BIN), "--socket", str(short_tmp / "n.sock"), "--http-addr", "127.0.0.1:0",
             "--pool-size", "4MiB", "--max-page-size", "1MiB", "--dma", "host",
             "--ssd-dir", str(ssd_dir),
             "--ssd-size", "16MiB"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ssd_dir)], check=False)
    assert result.returncode != 0
    assert f"ssd.dir {ssd_dir} is not a writable directory" in result.stderr, result.stderr
    assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr
