"""The node's stats document (`GET /api/stats`, the `stats` op) as a short text an operator
reads at a glance: `python -m pegaflow stats`. The histogram buckets are left to `--json`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Stats = Mapping[str, Any]


def summarize(stats: Stats) -> str:
    """A few lines: the node, the pool, the hit rate, the copies, latencies and errors."""
    lines = [_node_line(stats), _pool_line(stats["pool"]), *_totals_lines(stats["totals"])]
    if stats.get("ssd"):
        lines.append(_ssd_line(stats["ssd"]))
    if stats.get("fabric"):
        fabric = stats["fabric"]
        lines.append(
            f"fabric: node {fabric['node_id']}, {len(fabric['peers'])} peers, "
            f"{fabric['fetched_pages']} pages fetched ({_bytes(fabric['fetched_bytes'])}), "
            f"{fabric['served_pages']} served, {fabric['fetch_failures']} failed fetches"
        )
    lines += _transfer_lines(stats.get("transfers", []))
    lines += _request_lines(stats.get("requests", {}))
    errors = stats.get("errors", {})
    lines.append(
        "errors: " + (", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "none")
    )
    return "\n".join(lines)


def _node_line(stats: Stats) -> str:
    return (
        f"pegaflow-node {stats['version']}, dma {stats['dma']}, up "
        f"{_duration(stats['uptime_seconds'])}, {stats['sessions']} sessions, "
        f"{stats['engines']} engines"
    )


def _pool_line(pool: Stats) -> str:
    capacity = pool["capacity_bytes"]
    share = 100 * pool["used_bytes"] / capacity if capacity else 0.0
    return (
        f"pool: {_bytes(pool['used_bytes'])} of {_bytes(capacity)} used ({share:.1f}%), "
        f"{pool['pages']} pages ({pool['leased_pages']} leased), {pool['evictions']} evictions"
    )


def _totals_lines(totals: Stats) -> list[str]:
    looked_up = totals["lookup_blocks"]
    hit_rate = 100 * totals["hit_blocks"] / looked_up if looked_up else 0.0
    tiers = ", ".join(
        f"{tier} {count}" for tier, count in sorted(totals.get("hit_blocks_by_tier", {}).items())
    )
    return [
        f"lookups: {looked_up} blocks, {totals['hit_blocks']} hits ({hit_rate:.1f}%"
        + (f": {tiers}" if tiers else "")
        + f"), {totals['miss_blocks']} misses",
        f"saved: {totals['saved_blocks']} blocks, {_bytes(totals['save_bytes'])} "
        f"({totals.get('save_dropped_blocks', 0)} dropped); loaded: {totals['loaded_blocks']} "
        f"blocks, {_bytes(totals['load_bytes'])}",
    ]


def _ssd_line(ssd: Stats) -> str:
    health = "healthy" if ssd["healthy"] else "UNHEALTHY (spills stopped)"
    return (
        f"ssd: {_bytes(ssd['used_bytes'])} of {_bytes(ssd['capacity_bytes'])}, "
        f"{ssd['pages']} pages, {ssd['hit_blocks']} hits, {health}"
    )


def _transfer_lines(transfers: list[Stats]) -> list[str]:
    lines = []
    for device in transfers:
        for direction in ("save", "load"):
            side = device[direction]
            latency = side["latency"]
            if latency["count"]:
                lines.append(
                    f"{direction} copies on {device['device']}: {latency['count']} jobs, "
                    f"{_bytes(side['bytes'])} at {side['gb_per_s']:.2f} GB/s, "
                    f"{_latency(latency)}"
                )
    return lines


def _request_lines(requests: Mapping[str, Stats]) -> list[str]:
    answered = {op: latency for op, latency in sorted(requests.items()) if latency["count"]}
    if not answered:
        return ["requests: none yet"]
    return ["requests:"] + [
        f"  {op:<8} {latency['count']:>8}  {_latency(latency)}" for op, latency in answered.items()
    ]


def _latency(latency: Stats) -> str:
    return " ".join(
        f"{name} {latency[f'{name}_seconds'] * 1e3:.2f} ms" for name in ("p50", "p90", "p99")
    )


def _bytes(count: float) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{int(count)} B"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
