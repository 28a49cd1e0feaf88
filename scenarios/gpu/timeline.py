"""The per-layer timeline of one warm request: PegaFlow's copies against the engine's compute.

Input is the `timeline` of ttft_bench.py's results.json; every time is in ms since the request
started (see README.md for what each mark means). Per layer, one row:

- copy (blue): from the moment the previous layer's copy landed (for layer 0: the load was sent)
  to the moment this layer's copy landed, as a side stream waiting on the node's event for the
  layer saw it. The node copies layers in order on one stream, so the bar is the time this
  layer's copy had; it is an upper bound of its copy.
- compute (orange): the layer's ops on the engine's stream, from its first op to the Q/K/V
  projections' end and from the attention's end to its last op; darker, its attention (which
  reads the layer's KV), from the moment the stream passed its wait for the layer's copy; in
  grey, the stream waiting for that copy.

Layer L's compute sitting under layer L + 1's copy is the overlap. Run as a script to redraw a
chart from results.json: `python timeline.py results.json timeline.png`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

COPY, COMPUTE, ATTENTION, WAIT = "#4c72b0", "#f2b880", "#dd8452", "#c8c8c8"
# A layer on the engine's stream: (from mark, to mark, colour), in order.
ENGINE_SPANS = (
    ("layer_start", "wait_start", COMPUTE),
    ("wait_start", "attention_start", WAIT),
    ("attention_start", "attention_end", ATTENTION),
    ("attention_end", "layer_end", COMPUTE),
)


def render(timeline: dict[str, Any], path: Path, title: str) -> None:
    layers, instants = timeline["layers"], timeline["instants"]
    copy_done = layers["copy_done"]
    copy_start = [instants["load_submitted"], *copy_done[:-1]]
    count = len(copy_done)
    figure, axes = plt.subplots(figsize=(12, 2 + 0.22 * count))
    for layer in range(count):
        axes.broken_barh([span(copy_start[layer], copy_done[layer])], (layer - 0.45, 0.4),
                         color=COPY)  # fmt: skip
        for start, end, color in ENGINE_SPANS:
            bar = span(layers[start][layer], layers[end][layer])
            axes.broken_barh([bar], (layer + 0.05, 0.4), color=color)
    for name, style in (("lookup_done", ":"), ("load_submitted", "--"), ("load_reply", "-."),
                        ("token", "-")):  # fmt: skip
        axes.axvline(instants[name], color="black", linestyle=style, linewidth=1, label=name)
    axes.plot([], [], color=COPY, linewidth=8, label="copy of the layer (node)")
    axes.plot([], [], color=COMPUTE, linewidth=8, label="layer compute (engine)")
    axes.plot([], [], color=WAIT, linewidth=8, label="engine waits for the copy")
    axes.plot([], [], color=ATTENTION, linewidth=8, label="attention")
    axes.set_ylim(count - 0.5, -0.5)
    axes.set_xlim(0, instants["token"] * 1.02)
    axes.set_xlabel("ms since the request started")
    axes.set_ylabel("layer")
    axes.set_title(title)
    axes.legend(loc="lower left", fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def span(start: float, end: float) -> tuple[float, float]:
    """A bar from `start` to `end` in broken_barh's (start, width) form."""
    return start, end - start


if __name__ == "__main__":
    results = json.loads(Path(sys.argv[1]).read_text())
    render(results["timelines"]["warm"], Path(sys.argv[2]), results["timeline_title"])
