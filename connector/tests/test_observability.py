"""Observability seen from outside: a real Prometheus scraping the node, the metric catalogue
against docs/metrics.md and the Grafana dashboard, and /dashboard in headless Chromium.

Prometheus and Chromium are Debian packages that scripts/install-observability-deps.sh
installs; without them these tests fail (never skip) and say so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, NodeProcess, free_port
from enginekit import http_get, make_namespace, prompt_keys, prompt_pages, wait_for, write_pages

from pegaflow import HostKvRegion, NodeError

pytestmark = pytest.mark.integration

INSTALL = "scripts/install-observability-deps.sh"
DOCS = REPO_ROOT / "docs"
ARTIFACTS = REPO_ROOT / "target" / "observability"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: run `sudo bash {INSTALL}` (Debian packages)")
    return path


def documented_metrics() -> set[str]:
    """Metric names in docs/metrics.md's catalogue tables (first column)."""
    text = (DOCS / "metrics.md").read_text()
    return set(re.findall(r"^\| `(pegaflow_[a-z0-9_]+)` \|", text, flags=re.MULTILINE))


def exported_metrics(node: NodeProcess) -> dict[str, str]:
    """Family name -> type, from the node's /metrics."""
    _, _, body = http_get(node.http_port, "/metrics")
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, flags=re.MULTILINE))


class Workload:
    """Saves, looks up and loads prompts through the Python client, counting what it did.

    Each round saves one new prompt of `blocks` blocks, looks it up (all hits) together with a
    prompt never saved (all misses), and loads it into a second region.
    """

    def __init__(self, node: NodeProcess, blocks: int = 8) -> None:
        self.node = node
        self.blocks = blocks
        self.namespace = make_namespace(model="test/observability")
        self.rounds = 0
        self.saved = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def run(self, rounds: int, pause: float = 0.0) -> None:
        """`rounds` rounds on one connection (one session, two engines), `pause` s apart."""
        with (
            self.node.client() as client,
            HostKvRegion(self.namespace, self.blocks) as source,
            HostKvRegion(self.namespace, self.blocks) as target,
        ):
            saver, loader = source.register(client), target.register(client)
            block_ids = range(self.blocks)
            for _ in range(rounds):
                if self.stop.is_set():
                    return
                seed = 1000 + self.rounds
                keys = prompt_keys(self.namespace, seed, self.blocks)
                write_pages(source, block_ids, prompt_pages(source.page_bytes, seed, self.blocks))
                self.saved += client.save(saver, keys, block_ids).stored
                assert client.lookup(keys).hits == self.blocks
                cold = prompt_keys(self.namespace, -seed, self.blocks)
                assert client.lookup(cold).hits == 0
                assert client.load(loader, keys, block_ids) == self.blocks
                self.rounds += 1
                time.sleep(pause)

    def start(self, rounds: int, pause: float) -> None:
        """Runs [`Workload.run`] in a background thread."""

        def body() -> None:
            try:
                self.run(rounds, pause)
            except BaseException as error:  # reported by join()
                self.error = error

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self.stop.set()
        assert self._thread is not None
        self._thread.join(30)
        if self.error is not None:
            raise self.error


def test_every_exported_metric_is_documented_and_every_documented_one_exported(
    node: NodeProcess,
) -> None:
    Workload(node).run(1)
    with node.client() as client, pytest.raises(NodeError):
        client.release(12345)  # an error reply, so the per-code error family has a series
    exported = set(exported_metrics(node))
    documented = documented_metrics()
    # `pegaflow_fabric_*` exist only with fabric.enabled; the Rust test checks them both ways.
    fabric_only = {name for name in documented if name.startswith("pegaflow_fabric_")}
    assert exported - documented == set(), "exported but missing from docs/metrics.md"
    assert documented - fabric_only - exported == set(), "in docs/metrics.md but not exported"


def test_grafana_dashboard_queries_only_documented_metrics() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert dashboard["title"] and dashboard["schemaVersion"] >= 30 and len(panels) >= 8
    documented = documented_metrics()
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            for name in re.findall(r"pegaflow_[a-z0-9_]+", target["expr"]):
                for suffix in HISTOGRAM_SUFFIXES:
                    if name.endswith(suffix) and name.removesuffix(suffix) in documented:
                        name = name.removesuffix(suffix)
                used.add(name)
    assert used - documented == set(), "the Grafana dashboard queries undocumented metrics"
    for needed in ("lookup_hit_blocks_total", "transfer_bytes_total", "pool_used_bytes"):
        assert f"pegaflow_{needed}" in used


class Prometheus:
    """A Prometheus server on a private port scraping one node every second."""

    def __init__(self, workdir: Path, target_port: int) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: pegaflow\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=log,
            )

    def query(self, expr: str) -> list[dict[str, Any]]:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-4000:]}")
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            status, _, body = http_get(self.port, path)
        except OSError:
            return []  # not listening yet
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", body
        return reply["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_prometheus_scrapes_the_node_during_a_workload(node: NodeProcess, short_tmp: Path) -> None:
    prometheus = Prometheus(short_tmp, node.http_port)
    try:
        wait_for(lambda: prometheus.value('up{job="pegaflow"}'), lambda v: v == 1, 30, "target up")
        workload = Workload(node)
        workload.run(6, pause=0.5)
        saved = workload.saved
        assert saved == 6 * workload.blocks
        wait_for(
            lambda: prometheus.value("pegaflow_saved_blocks_total"),
            lambda v: v == saved,
            20,
            "pegaflow_saved_blocks_total == blocks saved",
        )
        hits = {
            r["metric"]["tier"]: float(r["value"][1])
            for r in prometheus.query("pegaflow_lookup_hit_blocks_total")
        }
        assert hits == {"memory": saved, "ssd": 0, "remote": 0}
        assert prometheus.value("pegaflow_lookup_blocks_total") == 2 * saved
        assert prometheus.value("pegaflow_lookup_miss_blocks_total") == saved
        assert prometheus.value("pegaflow_loaded_blocks_total") == saved
        page = Workload(node).namespace
        with HostKvRegion(page, 1) as region:
            page_bytes = region.page_bytes
        moved = {
            r["metric"]["direction"]: float(r["value"][1])
            for r in prometheus.query('pegaflow_transfer_bytes_total{device="host"}')
        }
        assert moved == {"save": saved * page_bytes, "load": saved * page_bytes}
        assert prometheus.value('pegaflow_requests_total{op="save"}') == 6
        assert prometheus.value('pegaflow_transfer_duration_seconds_count{direction="load"}') == 6
        p99 = prometheus.value(
            "histogram_quantile(0.99, sum by (le) "
            '(pegaflow_request_duration_seconds_bucket{op="lookup"}))'
        )
        assert p99 is not None and 0 < p99 < 1, p99
        assert prometheus.value("pegaflow_pool_pages") == saved
        assert prometheus.value("pegaflow_pool_capacity_bytes") == node.pool_size
        # Scraped while the workload's connection was open: one session, two engines.
        assert prometheus.value("max_over_time(pegaflow_sessions[1m])") == 1
        assert prometheus.value("max_over_time(pegaflow_engines[1m])") == 2
        assert prometheus.value("sum(pegaflow_errors_total)") in (None, 0)
    finally:
        prometheus.stop()


class NumberCollector(HTMLParser):
    """Every element's `data-k` -> `data-v` (the raw numbers the dashboard shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self.polls = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        fields = dict(attrs)
        if tag == "body" and fields.get("data-polls"):
            self.polls = int(fields["data-polls"] or 0)
        key = fields.get("data-k")
        if key and fields.get("data-v"):
            self.values[key] = fields["data-v"] or ""


def chromium(url: str, *args: str, workdir: Path, budget_ms: int = 4000) -> str:
    profile = workdir / f"chromium-{time.monotonic_ns()}"
    profile.mkdir()
    command = [
        tool("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1440,1000",
        "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", *args, url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def lookup(stats: dict[str, Any], path: str) -> Any:
    value: Any = stats
    for part in path.split("."):
        value = value[part]
    return value


def test_dashboard_in_headless_chromium_matches_api_stats(
    start_node: Callable[..., NodeProcess], short_tmp: Path
) -> None:
    node = start_node(ssd={"dir": str(short_tmp / "ssd"), "size": "256MiB"})
    Workload(node).run(4)  # history before the page opens
    workload = Workload(node)
    workload.start(rounds=400, pause=0.05)  # under load while the page renders
    try:
        wait_for(node.stats, lambda s: s["engines"] == 2, 10, "the workload's two engines")
        before = node.stats()
        dom = chromium(f"http://127.0.0.1:{node.http_port}/dashboard", "--dump-dom",
                       workdir=short_tmp)  # fmt: skip
        after = node.stats()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        screenshot = ARTIFACTS / "dashboard.png"
        chromium(f"http://127.0.0.1:{node.http_port}/dashboard",
                 f"--screenshot={screenshot}", workdir=short_tmp, budget_ms=8000)  # fmt: skip
    finally:
        workload.join()
    assert screenshot.stat().st_size > 10_000, "screenshot is empty"

    page = NumberCollector()
    page.feed(dom)
    assert page.polls >= 1, "the page never rendered /api/stats"
    shown = page.values
    for key in ("version", "dma"):
        assert shown[key] == before[key]
    # Gauges that do not move under this load, and counters between the two snapshots.
    for key in ("pool.capacity_bytes", "ssd.capacity_bytes", "engines", "sessions"):
        assert float(shown[key]) == lookup(before, key) == lookup(after, key), key
    counters = [
        "totals.lookup_blocks", "totals.saved_blocks", "totals.loaded_blocks",
        "totals.save_bytes", "totals.load_bytes", "totals.miss_blocks",
        "totals.hit_blocks_by_tier.memory", "totals.hit_blocks_by_tier.remote",
        "pool.pages", "pool.used_bytes",
    ]  # fmt: skip
    for key in counters:
        assert lookup(before, key) <= float(shown[key]) <= lookup(after, key), key
    assert float(shown["totals.saved_blocks"]) > 0
    ratio, asked = float(shown["derived.hit_ratio"]), float(shown["totals.lookup_blocks"])
    # Each round looks up one held and one cold prompt: half the blocks asked hit, plus one held
    # prompt's blocks when the page read the stats between a round's two lookups.
    assert 0.4 < ratio <= (asked / 2 + workload.blocks) / asked, (ratio, asked)
    assert float(shown["derived.errors"]) == 0
