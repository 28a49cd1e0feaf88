"""Real SGLang `MHATokenToKVPoolHost` objects on the CPU, as HiCache builds them on a GPU host.

The host pool only needs the device pool's per-layer K/V tensors for its geometry (and for
device transfers, which these tests never make), so CPU tensors stand in for them.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

LAYERS = 3
HEADS = 2
HEAD_DIM = 16
PAGE = 4
PAGES = 16
DTYPE = torch.bfloat16


def make_pool(layout: str, pages: int = PAGES) -> MHATokenToKVPoolHost:
    """A host pool of `pages` pages of `PAGE` tokens, in SGLang layout `layout`."""
    tokens = PAGE * pages
    k = tuple(torch.zeros(tokens, HEADS, HEAD_DIM, dtype=DTYPE) for _ in range(LAYERS))
    v = tuple(torch.zeros(tokens, HEADS, HEAD_DIM, dtype=DTYPE) for _ in range(LAYERS))
    pointers = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64) for ts in (k, v)]
    info = MHABufferInfo(
        buffers=KVBuffers(
            k=k, v=v, k_data_ptrs=pointers[0], v_data_ptrs=pointers[1], layout=KVBufferLayout.NHD
        ),
        page_size=PAGE,
        head_num=HEADS,
        head_dim=HEAD_DIM,
        v_head_dim=HEAD_DIM,
        dtype=DTYPE,
        device=torch.device("cpu"),
    )
    return MHATokenToKVPoolHost(
        info,
        2.0,
        0,
        PAGE,
        layout,
        pin_memory=False,
        device="cpu",
        device_capacity_tokens=tokens,
        start_layer=0,
        end_layer=LAYERS,
        host_token_capacity=tokens,
    )


def kv(pool: MHATokenToKVPoolHost, kind: int, layer: int, token: int) -> torch.Tensor:
    """The `[heads, head_dim]` K (`kind` 0) or V (1) row of one token of one layer."""
    buf = pool.kv_buffer
    if pool.layout == "layer_first":
        return buf[kind, layer, token]
    if pool.layout == "page_first":
        return buf[kind, token, layer]
    page, slot = divmod(token, pool.page_size)
    return buf[kind, page, layer, slot]
