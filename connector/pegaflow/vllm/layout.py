"""What vLLM's KV tensors look like to the node: layout names, namespaces and the region.

Layouts are read from shapes and strides, never assumed. vLLM hands every layer a logical
`(num_blocks, num_kv_heads, block_size, 2 * head_dim)` view (K and V packed in the last dim);
the physical order inside one block decides the namespace's layout name. A block of a layer
must be one contiguous run of bytes, because the node copies `segment_bytes` per layer per block.

CPU engines: vLLM allocates ordinary tensors, which the node cannot open, so the worker moves
them into a POSIX shared-memory file and rebinds every tensor in place (`Tensor.set_`), which
keeps all of vLLM's references valid. GPU engines: the allocation is exported with CUDA IPC.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .. import shm
from ..cuda import ipc_region
from ..keys import Namespace

TORCH_DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float8_e4m3fn: "fp8_e4m3",
    torch.float8_e5m2: "fp8_e5m2",
}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8_e4m3": 1, "fp8_e5m2": 1}
# vLLM's `kv_cache_dtype` values whose cache holds plain fp8 numbers (allocated as uint8, one
# per-tensor k/v scale per layer that lives with the weights, not in the cache; docs/vllm.md).
# Every other quantized dtype packs scales or several values per byte into the cache: not
# supported. `fp8` means e4m3.
FP8_CACHE_DTYPES = {"fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
UNQUANTIZED_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32", "half", "float")
# vLLM >= 0.32 resolves one layout per engine (`KVCacheConfig.kv_cache_layout`): the physical
# axis order of [L, B, H, N, C]. Only orders that keep a (layer, block) page contiguous qualify.
VLLM_LAYOUTS = {
    "LBHNC": "vllm_lbhnc",
    "BLHNC": "vllm_lbhnc",
    "LBNHC": "vllm_lbnhc",
    "BLNHC": "vllm_lbnhc",
}


class UnsupportedLayout(ValueError):
    """The KV cache cannot be described to the node; the connector then stays off."""


@dataclasses.dataclass(frozen=True)
class KvShape:
    """The facts of one KV cache group that the namespace is made of."""

    dtype: str
    layout: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def shared_across_tp(self) -> bool:
        """MLA's latent cache is replicated on every tensor-parallel rank (vLLM's
        `max_tp_shards=1`): the ranks share one namespace, one rank saves, every rank loads."""
        return self.layout == "mla"

    @property
    def segment_bytes(self) -> int:
        """Bytes of one block of one layer (docs/protocol.md "register")."""
        values = 1 if self.layout == "mla" else 2
        return (
            self.block_size * self.num_kv_heads * values * self.head_dim * DTYPE_BYTES[self.dtype]
        )

    def namespace(self, model: str, tp_rank: int, tp_size: int, pp_stage: int) -> Namespace:
        if self.shared_across_tp:
            tp_rank, tp_size = 0, 1
        return Namespace(
            model,
            self.dtype,
            self.layout,
            self.block_size,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            tp_rank,
            tp_size,
            pp_stage,
        )


def dtype_name(dtype: torch.dtype, cache_dtype: str = "auto") -> str:
    """The namespace's dtype: vLLM's `kv_cache_dtype` for fp8 caches (whose tensors are uint8),
    else the tensors' own dtype."""
    if cache_dtype in FP8_CACHE_DTYPES:
        return FP8_CACHE_DTYPES[cache_dtype]
    if cache_dtype not in UNQUANTIZED_CACHE_DTYPES:
        raise UnsupportedLayout(
            f"kv_cache_dtype {cache_dtype} packs scales or sub-byte values into the cache; "
            f"supported: auto, {', '.join(FP8_CACHE_DTYPES)}"
        )
    if dtype not in TORCH_DTYPES:
        raise UnsupportedLayout(f"KV cache dtype {dtype} is not one of {list(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def block_layout(tensor: torch.Tensor) -> str:
    """`vllm_lbhnc` or `vllm_lbnhc` from the strides of a `(B, H, N, C)` layer view."""
    if tensor.dim() != 4:
        raise UnsupportedLayout(
            f"KV tensor has shape {tuple(tensor.shape)}; expected (blocks, heads, tokens, 2*D)"
        )
    _, heads, tokens, channels = tensor.shape
    _, s_head, s_token, s_channel = tensor.stride()
    if s_channel == 1 and s_token == channels and s_head == tokens * channels:
        return "vllm_lbhnc"
    if s_channel == 1 and s_head == channels and s_token == heads * channels:
        return "vllm_lbnhc"
    raise UnsupportedLayout(
        f"KV tensor strides {tensor.stride()} for shape {tuple(tensor.shape)} do not keep one "
        "block of one layer contiguous"
    )


def shape_of_tensors(tensors: list[torch.Tensor], expected: KvShape) -> KvShape:
    """The KvShape every layer tensor agrees on, from the tensors themselves. `expected` (the
    scheduler's, from vLLM's config) says only what tensors cannot: an fp8 cache's format
    (vLLM allocates it as uint8) and whether the last dim is K and V or one MLA latent."""
    first = tensors[0]
    layout = block_layout(first)
    for tensor in tensors[1:]:
        if tensor.shape != first.shape or tensor.dtype != first.dtype:
            raise UnsupportedLayout(
                f"layers differ: {tuple(tensor.shape)} {tensor.dtype} vs "
                f"{tuple(first.shape)} {first.dtype}"
            )
        if block_layout(tensor) != layout:
            raise UnsupportedLayout("layers use different block layouts")
    _, heads, tokens, channels = first.shape
    fp8 = expected.dtype in FP8_CACHE_DTYPES.values()
    if fp8 and first.dtype == torch.uint8:
        dtype = expected.dtype
    else:
        dtype = dtype_name(first.dtype)
    if expected.layout == "mla":
        if heads != 1:
            raise UnsupportedLayout(f"MLA KV tensor has {heads} heads; expected one latent")
        return KvShape(dtype, "mla", tokens, len(tensors), 1, channels)
    if channels % 2:
        raise UnsupportedLayout(f"last dim {channels} is not K and V packed (odd)")
    return KvShape(dtype, layout, tokens, len(tensors), heads, channels // 2)


def shape_of_config(
    kv_cache_config: Any, platform_is_cpu: bool, cache_dtype: str = "auto"
) -> KvShape:
    """The KvShape the scheduler can know without tensors: from vLLM's KV cache config and
    `cache_config.cache_dtype`.

    The worker checks its tensors against this, so a disagreement turns the connector off
    instead of storing blocks under the wrong namespace.
    """
    groups = [g for g in kv_cache_config.kv_cache_groups if getattr(g, "enable_kv_transfer", True)]
    kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
    if any("Mamba" in kind for kind in kinds):
        raise UnsupportedLayout(
            f"state (Mamba) KV cache groups ({', '.join(kinds)}) are not supported yet: "
            "storing the state at block boundaries is not written"
        )
    if len(groups) != 1:
        raise UnsupportedLayout(
            f"{len(groups)} KV cache groups ({', '.join(kinds)}; hybrid or sliding-window "
            "models) are not supported yet"
        )
    spec = groups[0].kv_cache_spec
    kind = type(spec).__name__
    head_v = getattr(spec, "head_size_v", spec.head_size)
    if getattr(spec, "state_content_bytes", None) is not None:
        raise UnsupportedLayout(f"KV cache spec {kind} packs its own page format")
    if kind == "MLAAttentionSpec":
        latent = True
    elif kind == "FullAttentionSpec" and head_v == spec.head_size:
        latent = False
    else:
        raise UnsupportedLayout(f"KV cache spec {kind} is not supported yet")
    resolved = getattr(kv_cache_config, "kv_cache_layout", None)
    if resolved is None:  # vLLM before 0.32: CPU is head-major, GPU backends token-major
        layout = "vllm_lbhnc" if platform_is_cpu else "vllm_lbnhc"
    elif resolved in VLLM_LAYOUTS:
        layout = VLLM_LAYOUTS[resolved]
    else:
        raise UnsupportedLayout(f"KV cache layout {resolved} splits blocks; not supported")
    return KvShape(
        dtype_name(spec.dtype, cache_dtype),
        "mla" if latent else layout,
        spec.block_size,
        len(groups[0].layer_names),
        1 if latent else spec.num_kv_heads,
        spec.head_size,
    )


@dataclasses.dataclass
class Region:
    """The `register` fields of one engine's KV region, and what keeps it alive."""

    region: dict[str, Any]
    num_blocks: int
    segment_bytes: int
    layers: list[list[list[int]]]
    device: torch.device
    close: weakref.finalize | None = None


def describe_layers(
    tensors: list[torch.Tensor], base_ptr: int, segment_bytes: int
) -> list[list[list[int]]]:
    """`[[offset, block_stride]]` per layer, relative to the region's first byte."""
    layers = []
    for tensor in tensors:
        stride = tensor.stride(0) * tensor.element_size()
        if stride < segment_bytes:
            raise UnsupportedLayout(f"block stride {stride} is below a page of {segment_bytes}")
        layers.append([[tensor.data_ptr() - base_ptr, stride]])
    return layers


def share_cpu_tensors(
    tensors: list[torch.Tensor], other_views: Iterable[torch.Tensor], shape: KvShape
) -> Region:
    """Moves CPU KV tensors into one shared-memory file and rebinds them in place.

    `other_views` are further tensors vLLM holds on the same buffers (e.g. the attention layers'
    own views); they are rebound too, so no reader or writer is left on the old memory. Rebinding
    is all or nothing: a view that would stay behind raises before anything changed.
    """
    storages, views = _buffers_and_views(tensors, other_views)
    bases, total = _packing(storages, 4096)
    name, path, fd = shm.create("vllm", total)
    os.close(fd)
    try:
        shared = torch.UntypedStorage.from_file(path, shared=True, nbytes=total)
        for ptr, storage in storages.items():
            _bytes_of(shared, bases[ptr], storage.nbytes()).copy_(
                _bytes_of(storage, 0, storage.nbytes())
            )
    except BaseException:
        shm.unlink(path)
        raise
    _rebind(_placements(views, bases), shared)
    segment = shape.segment_bytes
    region = Region(
        region={"shm": name, "bytes": total},
        num_blocks=tensors[0].shape[0],
        segment_bytes=segment,
        layers=describe_layers(tensors, shared.data_ptr(), segment),
        device=tensors[0].device,
    )
    region.close = weakref.finalize(region, shm.unlink, path)  # also runs at interpreter exit
    return region


def merge_cuda_tensors(tensors: list[torch.Tensor], other_views: Iterable[torch.Tensor]) -> None:
    """Moves GPU KV tensors spread over several allocations into one, rebinding them in place.

    vLLM 0.26 allocates each layer's KV cache on its own (`torch.zeros` per layer), while one
    CUDA IPC handle shares one allocation and the node opens one region per engine. This runs
    at registration, when the cache holds nothing yet (vLLM zero-fills it; the new buffer is
    zero-filled too). The old buffers are released before the new one is taken, so the GPU
    never holds the cache twice. It refuses (nothing changed) when a buffer is referenced by a
    tensor it cannot rebind, because that tensor would go on reading the old memory.
    """
    storages, views = _buffers_and_views(tensors, other_views)
    if len(storages) == 1:
        return
    views.update({id(base): base for base in _view_bases(views.values())})
    _check_no_other_holders(storages, views.values())
    bases, total = _packing(storages, 2 << 20)
    placements = _placements(views, bases)
    device = tensors[0].device
    storages.clear()
    for view, _, _, _ in placements:
        view.set_()  # drops the old buffer; vLLM's cache is empty, nothing to copy
    torch.cuda.empty_cache()
    merged = torch.zeros(total, dtype=torch.uint8, device=device).untyped_storage()
    _rebind(placements, merged)


def _buffers_and_views(
    tensors: list[torch.Tensor], other_views: Iterable[torch.Tensor]
) -> tuple[dict[int, torch.UntypedStorage], dict[int, torch.Tensor]]:
    """The distinct buffers of the KV tensors (by address) and every tensor on them (by id)."""
    storages: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage)
    views = {id(t): t for t in [*tensors, *other_views]}
    for view in views.values():
        if view.untyped_storage().data_ptr() not in storages:
            raise UnsupportedLayout("a KV view lives outside the registered KV buffers")
    return storages, views


def _view_bases(views: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors `views` were viewed from: they hold the same buffers."""
    bases = []
    for view in views:
        base = view._base
        while base is not None:
            bases.append(base)
            base = base._base
    return bases


def _check_no_other_holders(
    storages: Mapping[int, torch.UntypedStorage], views: Iterable[torch.Tensor]
) -> None:
    """Raises when a buffer is held by more tensors than `views` (calibrated on a scratch
    tensor, so the count does not depend on how torch counts its own wrapper objects)."""
    scratch = torch.empty(1, device=next(iter(storages.values())).device)
    wrapper_refs = torch._C._storage_Use_Count(scratch.untyped_storage()._cdata) - 1
    known: dict[int, int] = {}
    for view in views:
        ptr = view.untyped_storage().data_ptr()
        known[ptr] = known.get(ptr, 0) + 1
    for ptr, storage in storages.items():
        holders = torch._C._storage_Use_Count(storage._cdata) - wrapper_refs
        if holders != known.get(ptr, 0):
            raise UnsupportedLayout(
                f"a KV buffer is held by {holders} tensors, {known.get(ptr, 0)} of them known; "
                "it cannot be moved into one CUDA allocation"
            )


def _packing(
    storages: Mapping[int, torch.UntypedStorage], align: int
) -> tuple[dict[int, int], int]:
    """Where each buffer starts in the merged one (each aligned to `align`), and its size."""
    bases: dict[int, int] = {}
    total = 0
    for ptr, storage in storages.items():
        bases[ptr] = total
        total += -(-storage.nbytes() // align) * align
    return bases, total


Placement = tuple[torch.Tensor, int, tuple[int, ...], tuple[int, ...]]


def _placements(views: Mapping[int, torch.Tensor], bases: Mapping[int, int]) -> list[Placement]:
    """Each view with its byte offset in the merged buffer, its size and its stride."""
    placements = []
    for view in views.values():
        offset = bases[view.untyped_storage().data_ptr()]
        offset += view.storage_offset() * view.element_size()
        placements.append((view, offset, tuple(view.size()), tuple(view.stride())))
    return placements


def _rebind(placements: list[Placement], storage: torch.UntypedStorage) -> None:
    for view, offset, size, stride in placements:
        view.set_(storage, offset // view.element_size(), size, stride)


def export_cuda_tensors(tensors: list[torch.Tensor], shape: KvShape) -> Region:
    """Describes GPU KV tensors as one CUDA IPC region (the node opens the handle itself).

    Not exercised by CI (no GPU there); kept apart so it can be tested on the GPU machine.
    """
    storage = tensors[0].untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() for t in tensors):
        raise UnsupportedLayout("KV layers live in more than one CUDA allocation")
    segment = shape.segment_bytes
    return Region(
        region=ipc_region(storage),
        num_blocks=tensors[0].shape[0],
        segment_bytes=segment,
        layers=describe_layers(tensors, storage.data_ptr(), segment),
        device=tensors[0].device,
    )


def layer_tensors(kv_caches: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """Layer names and tensors in model order (by layer index), the order pages are stored in."""
    names = sorted(kv_caches, key=layer_index)
    return names, [kv_caches[name] for name in names]


def layer_index(name: str) -> int:
    """The index in a vLLM layer name, its one integer part (`model.layers.3.self_attn.attn`
    is 3), as vLLM's `extract_layer_index` reads it; parsed here so that the worker half
    imports without vLLM."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise UnsupportedLayout(f"layer name {name!r} does not hold exactly one layer index")
    return numbers[0]


def _bytes_of(storage: torch.UntypedStorage, offset: int, nbytes: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, offset, (nbytes,), (1,))
