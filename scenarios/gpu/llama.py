"""A Llama-3.1-8B-shaped decoder in plain torch, attending over vLLM's paged KV layout.

The TTFT benchmark needs the shapes and the cost of the real model, not its answers, so the
weights are random: seeded and generated on the device (16 GB in seconds, no checkpoint to
carry to a machine without internet). The recipe is Llama's: RMSNorm, rotary embeddings,
grouped-query attention, SwiGLU MLP, untied embeddings. RoPE leaves out Llama 3.1's long-context
frequency scaling, which changes neither shapes nor cost.

Every op depends only on the tokens it is given and the KV it reads, so a step computed over KV
loaded from PegaFlow is bit-identical to the same step over KV computed locally: the benchmark
checks exactly that.

On a GPU, short chunks (a prompt's tail after a cache hit) run as vLLM runs them: each layer's
work before and after attention replays a CUDA graph captured once per chunk length, while
attention and the connector's per-layer hooks stay eager between the two (vLLM's piecewise
graphs). Every pass runs the same chunk the same way, so outputs stay bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

DTYPE = torch.bfloat16
#: Chunks up to this many tokens run as piecewise CUDA graphs on a GPU (one capture per length).
GRAPH_MAX_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 500_000.0
    rms_eps: float = 1e-5


MODELS = {
    config.name: config
    for config in (
        ModelConfig("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        # The CPU smoke test's model: the same code, milliseconds per step even where bf16
        # matrix products have no fast CPU path.
        ModelConfig("tiny", 2, 64, 4, 2, 16, 128, 512),
    )
}


@dataclasses.dataclass
class Layer:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor  # (hidden, (heads + 2 * kv_heads) * head_dim): x @ wqkv
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor  # (hidden, 2 * intermediate)
    w_down: torch.Tensor


class LayerHooks:
    """Called around every layer of a step; the engine hangs the connector and tracing here."""

    def layer_start(self, layer: int) -> None:
        """Before the layer's first op."""

    def before_attention(self, layer: int) -> None:
        """After the Q/K/V projections, before the layer's KV is written or read (where vLLM's
        attention layer calls the connector's `wait_for_layer_load`)."""

    def after_attention(self, layer: int) -> None:
        """Once the layer's KV is written (where vLLM calls `save_kv_layer`)."""

    def layer_end(self, layer: int) -> None:
        """After the layer's last op."""


class Llama:
    """Weights and the forward pass of one prefill chunk."""

    def __init__(self, config: ModelConfig, device: torch.device, seed: int) -> None:
        self.config = config
        self.device = device
        generator = torch.Generator(device=device).manual_seed(seed)

        def matrix(rows: int, cols: int, scale: float | None = None) -> torch.Tensor:
            weight = torch.randn(rows, cols, generator=generator, device=device, dtype=DTYPE)
            return weight.mul_(rows**-0.5 if scale is None else scale)  # unit-variance outputs

        def norm() -> torch.Tensor:
            return torch.ones(config.hidden, device=device, dtype=DTYPE)

        qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.embed = matrix(config.vocab, config.hidden, scale=1.0)
        self.layers = [
            Layer(
                attn_norm=norm(),
                wqkv=matrix(config.hidden, qkv),
                wo=matrix(config.num_heads * config.head_dim, config.hidden),
                mlp_norm=norm(),
                w_gate_up=matrix(config.hidden, 2 * config.intermediate),
                w_down=matrix(config.intermediate, config.hidden),
            )
            for _ in range(config.num_layers)
        ]
        self.final_norm = norm()
        self.lm_head = matrix(config.hidden, config.vocab)
        half = torch.arange(0, config.head_dim, 2, device=device, dtype=torch.float32)
        self.inv_freq = config.rope_theta ** (-half / config.head_dim)
        self._graphs: dict[int, PiecewiseGraphs] = {}

    def forward(
        self,
        token_ids: torch.Tensor,
        kv_caches: list[torch.Tensor],
        slots: torch.Tensor,
        hooks: LayerHooks,
    ) -> torch.Tensor:
        """Runs the prompt's tokens `[len(slots) - len(token_ids), len(slots))` and returns the
        last one's final hidden state. `slots[p]` is where token `p`'s KV lives in the paged
        cache; the tokens before the chunk must already be there."""
        tokens = len(token_ids)
        start = len(slots) - tokens
        cos, sin = self._rope(start, start + tokens)
        x = self.embed[token_ids]
        if self.device.type == "cuda" and tokens <= GRAPH_MAX_TOKENS:
            graphs = self._graphs.get(tokens)
            if graphs is None:
                graphs = self._graphs[tokens] = PiecewiseGraphs(self, x, cos, sin)
            x = graphs.run(x, cos, sin, kv_caches, slots, hooks)
        else:
            for index, (layer, cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
                hooks.layer_start(index)
                q, k, v = self.before_attention(layer, x, cos, sin)
                hooks.before_attention(index)
                attention = paged_attention(cache, slots, q, k, v)
                hooks.after_attention(index)
                x = self.after_attention(layer, x, attention)
                hooks.layer_end(index)
        return rms_norm(x[-1:], self.final_norm, self.config.rms_eps)[0]

    def before_attention(
        self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's norm, Q/K/V projection and rotary embedding."""
        config = self.config
        split = [config.num_heads, config.num_kv_heads, config.num_kv_heads]
        qkv = rms_norm(x, layer.attn_norm, config.rms_eps) @ layer.wqkv
        q, k, v = qkv.view(len(x), -1, config.head_dim).split(split, dim=1)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def after_attention(
        self, layer: Layer, x: torch.Tensor, attention: torch.Tensor
    ) -> torch.Tensor:
        """A layer's output projection, residuals and MLP."""
        config = self.config
        x = x + attention.reshape(len(x), -1) @ layer.wo
        gate, up = (rms_norm(x, layer.mlp_norm, config.rms_eps) @ layer.w_gate_up).chunk(2, -1)
        return x + (F.silu(gate) * up) @ layer.w_down

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.lm_head

    def _rope(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, end, device=self.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)[:, None, :]  # (tokens, 1, head_dim / 2)
        return angles.cos(), angles.sin()


class PiecewiseGraphs:
    """Per layer, a CUDA graph of the work before attention and one of the work after it, for
    one chunk length, over static input and output buffers (captured on first use)."""

    def __init__(self, model: Llama, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.x, self.cos, self.sin = x.clone(), cos.clone(), sin.clone()
        pool = torch.cuda.graph_pool_handle()
        self.before: list[tuple[torch.cuda.CUDAGraph, Any]] = []
        self.after: list[tuple[torch.cuda.CUDAGraph, Any]] = []
        config = model.config
        self.attention = torch.zeros(len(x), config.num_heads, config.head_dim, dtype=x.dtype,
                                     device=x.device)  # fmt: skip
        for layer in model.layers:
            self.before.append(
                capture(
                    pool,
                    functools.partial(model.before_attention, layer, self.x, self.cos, self.sin),
                )
            )
            self.after.append(
                capture(
                    pool, functools.partial(model.after_attention, layer, self.x, self.attention)
                )
            )

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        slots: torch.Tensor,
        hooks: LayerHooks,
    ) -> torch.Tensor:
        """The layers over `x`, attention and hooks eager between the graphs."""
        self.x.copy_(x)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        for index, cache in enumerate(kv_caches):
            hooks.layer_start(index)
            graph, (q, k, v) = self.before[index]
            graph.replay()
            hooks.before_attention(index)
            self.attention.copy_(paged_attention(cache, slots, q, k, v))
            hooks.after_attention(index)
            graph, out = self.after[index]
            graph.replay()
            self.x.copy_(out)
            hooks.layer_end(index)
        return self.x.clone()


def capture(pool: tuple[int, int], work: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """`work` captured as a graph after one eager warm-up run on a side stream (cuBLAS sets up
    its handles and workspaces outside capture); returns the graph and its output tensors."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = work()
    return graph, out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `(tokens, heads, head_dim)`, halves rotated (Llama's layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def paged_attention(
    cache: torch.Tensor,
    slots: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Writes the chunk's K and V into its slots, then attends causally over every token so far,
    read back from the cache (blocks computed in earlier steps or loaded by PegaFlow).

    `cache` is vLLM's per-layer view `(num_blocks, kv_heads, block_size, 2 * head_dim)`, K and V
    packed in the last dim and token-major in memory, so `(blocks * block_size, kv_heads,
    2 * head_dim)` is a view of the same bytes with one row per token slot.
    """
    tokens, kv_heads, head_dim = k.shape
    rows = cache.permute(0, 2, 1, 3).view(-1, kv_heads, 2 * head_dim)
    rows[slots[-tokens:]] = torch.cat((k, v), dim=-1)
    key, value = rows[slots].transpose(0, 1).split(head_dim, dim=-1)
    # The chunk's queries are the last `tokens` positions: causal aligned to the bottom right,
    # which SDPA runs with its fused kernels instead of materialising a mask.
    mask = causal_lower_right(tokens, len(slots)) if tokens < len(slots) else None
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], key[None], value[None],
                                         attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=True)  # fmt: skip
    return out[0].transpose(0, 1)
