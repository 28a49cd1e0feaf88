"""What SGLang's HiCache host pool looks like to the node, and how the node gets at its memory.

Layouts. `MHATokenToKVPoolHost.kv_buffer` is one tensor, K plane then V plane, with three
supported axis orders (`--hicache-mem-layout`):

| SGLang layout | `kv_buffer` shape | one page of one layer |
|---|---|---|
| `layer_first` | `[2, layers, tokens, heads, dim]` | K run + V run (`page_size` tokens each) |
| `page_first_direct` | `[2, pages, layers, page_size, heads, dim]` | K run + V run |
| `page_first` (the default) | `[2, tokens, layers, heads, dim]` | one row per token, K then V |

All three hold the same bytes per page in the node's `kv_split` order (per layer: K as
`[token, head, dim]`, then V), so they share one namespace layout: a page saved from one is
loaded into another. `page_first` is described token by token, which the node accepts for
token-major layouts. Other layouts (`page_head`, `page_unified`, `page_first_kv_split`) and
other pools (MLA, hybrid, quantized) are refused with the reason, leaving the backend off.

Memory. The node copies between its pool and a POSIX shared-memory file it maps by name, but
SGLang allocates the host pool with an anonymous `mmap`, and keeps raw pointers to it (kernel
pointer tables, CUDA host registration). So the pool's pages are replaced *in place*: a
`/dev/shm` file is mapped over the same addresses with `MAP_FIXED`. Every tensor view and
pointer SGLang holds stays valid; only the memory behind them becomes shareable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import mmap
import os
import re
import weakref
from typing import Any

import torch

from .. import shm
from ..keys import Namespace
from ..vllm.layout import TORCH_DTYPES

log = logging.getLogger("pegaflow.sglang")

SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
NODE_LAYOUT = "kv_split"
# SGLang keeps the ranges it pinned with cudaHostRegister on the buffer tensor under this name.
_REGISTERED_RANGES_ATTR = "_sglang_cuda_host_registered_ranges"
# /proc/self/maps names of mappings with no file behind them, which SGLang's allocators make.
_ANONYMOUS = ("", "/dev/zero", "/anon_hugepage", "/memfd:", "/SYSV", "[anon")
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
_MAP_FIXED = 0x10


class UnsupportedPool(ValueError):
    """The host pool cannot be described to the node; the backend then stays off."""


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """The namespace facts and `register` layout of one host pool (offsets from its first byte)."""

    dtype: str
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    segment_bytes: int
    layers: list[list[list[int]]]
    # The pool's flat data page (`get_data_page(flat=True)`) as a shape, and the permutation of
    # it into the node's page order `[layer, k/v, token, head, dim]`.
    flat_shape: tuple[int, ...]
    to_node_order: tuple[int, ...]

    def namespace(self, model: str, tp_rank: int, tp_size: int, pp_stage: int) -> Namespace:
        return Namespace(
            model,
            self.dtype,
            NODE_LAYOUT,
            self.page_size,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            tp_rank,
            tp_size,
            pp_stage,
        )


def describe_pool(pool: Any) -> PoolLayout:
    """The layout of an `MHATokenToKVPoolHost`, from its buffer's shape and strides."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    if type(pool) is not MHATokenToKVPoolHost:
        raise UnsupportedPool(
            f"{type(pool).__name__} host pools are not supported yet (MHATokenToKVPoolHost only)"
        )
    if pool.layout not in SUPPORTED_LAYOUTS:
        raise UnsupportedPool(
            f"--hicache-mem-layout {pool.layout} is not supported; use one of {SUPPORTED_LAYOUTS}"
        )
    if pool.v_head_dim != pool.head_dim or getattr(pool, "dcp_size", 1) != 1:
        raise UnsupportedPool("V head size differing from K, or decode context parallelism")
    if pool.dtype not in TORCH_DTYPES:
        raise UnsupportedPool(f"KV dtype {pool.dtype} is not one of {list(TORCH_DTYPES)}")
    buf: torch.Tensor = pool.kv_buffer
    pages, layers, ps = pool.page_num, pool.layer_num, pool.page_size
    heads, dim = pool.head_num, pool.head_dim
    expected = {
        "layer_first": (2, layers, pages * ps, heads, dim),
        "page_first": (2, pages * ps, layers, heads, dim),
        "page_first_direct": (2, pages, layers, ps, heads, dim),
    }[pool.layout]
    if tuple(buf.shape) != expected or not buf.is_contiguous() or buf.storage_offset():
        raise UnsupportedPool(
            f"kv_buffer is {tuple(buf.shape)} with strides {buf.stride()}; expected a contiguous "
            f"{expected} for layout {pool.layout}"
        )
    item = buf.element_size()
    strides = [s * item for s in buf.stride()]

    def offset(kv: int, layer: int, token: int) -> int:
        if pool.layout == "layer_first":
            return kv * strides[0] + layer * strides[1] + token * strides[2]
        if pool.layout == "page_first":
            return kv * strides[0] + token * strides[1] + layer * strides[2]
        page, slot = divmod(token, ps)
        return kv * strides[0] + page * strides[1] + layer * strides[2] + slot * strides[3]

    row = heads * dim * item  # one token of one layer of K (or V)
    block_stride = offset(0, 0, ps) - offset(0, 0, 0)
    if ps == 1 or offset(0, 0, 1) - offset(0, 0, 0) == row:
        segment_bytes = ps * row
        described = [
            [[offset(kv, layer, 0), block_stride] for kv in (0, 1)] for layer in range(layers)
        ]
    else:
        segment_bytes = row
        described = [
            [[offset(kv, layer, t), block_stride] for kv in (0, 1) for t in range(ps)]
            for layer in range(layers)
        ]
    if pool.layout == "page_first":
        flat_shape, to_node = (2, ps, layers, heads, dim), (2, 0, 1, 3, 4)
    else:
        flat_shape, to_node = (2, layers, ps, heads, dim), (1, 0, 2, 3, 4)
    return PoolLayout(
        TORCH_DTYPES[pool.dtype],
        ps,
        layers,
        heads,
        dim,
        pages,
        segment_bytes,
        described,
        flat_shape,
        to_node,
    )


@dataclasses.dataclass
class SharedBuffer:
    """A host buffer now backed by `/dev/shm/<name>`; the file is removed by `close`."""

    name: str
    bytes: int
    close: weakref.finalize


def share_in_place(buffer: torch.Tensor, *, keep_contents: bool) -> SharedBuffer:
    """Backs `buffer`'s memory by a new shared-memory file, at the same addresses.

    Refuses (UnsupportedPool) memory that is not a whole anonymous mapping of its own, since
    replacing pages of a mapping that holds anything else would corrupt it. CUDA host
    registrations are dropped before and made again after, so pinned transfers see the new
    pages. Needs no transfer in flight on the buffer (SGLang attaches storage before any).
    """
    start = buffer.data_ptr()
    page, vma_end = _anonymous_extent(start, buffer.numel() * buffer.element_size())
    length = -(-buffer.numel() * buffer.element_size() // page) * page
    if start + length > vma_end:
        raise UnsupportedPool("the host pool's last page is shared with another mapping")
    name, path, fd = shm.create("sglang", length)
    try:
        if keep_contents:
            _write_all(fd, (ctypes.c_char * length).from_address(start))
        ranges = getattr(buffer, _REGISTERED_RANGES_ATTR, None) or []
        _cuda_host_unregister(ranges)
        mapped = _libc().mmap(
            start,
            length,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_SHARED | _MAP_FIXED | _MAP_POPULATE,
            fd,
            0,
        )
        if mapped != start:
            raise OSError(ctypes.get_errno(), f"mmap(MAP_FIXED) of {path} over the host pool")
        _cuda_host_register(ranges)
    except BaseException:
        shm.unlink(path)
        raise
    finally:
        os.close(fd)
    shared = SharedBuffer(name, length, weakref.finalize(buffer, shm.unlink, path))
    log.info("PegaFlow sglang: host pool (%d bytes) now lives in %s", length, path)
    return shared


def _anonymous_extent(start: int, nbytes: int) -> tuple[int, int]:
    """The page size and end of the anonymous mapping(s) holding `[start, start + nbytes)`."""
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+ ?(.*)$")
    vmas: list[tuple[int, int, str, str, int]] = []
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            match = header.match(line)
            if match:
                lo, hi, perms, path = match.groups()
                vmas.append((int(lo, 16), int(hi, 16), perms, path.strip(), 4096))
            elif line.startswith("KernelPageSize:") and vmas:
                kib = int(line.split()[1])
                vmas[-1] = (*vmas[-1][:4], kib * 1024)
    covering = [v for v in vmas if v[1] > start and v[0] < start + nbytes]
    if not covering or covering[0][0] > start:
        raise UnsupportedPool(f"host pool at {start:#x} is not mapped memory")
    page = covering[0][4]
    end = covering[0][0]
    for lo, hi, perms, path, _ in covering:
        if lo != end or not perms.startswith("rw") or not path.startswith(_ANONYMOUS):
            raise UnsupportedPool(
                f"host pool memory at {lo:#x} is {perms} {path or 'anonymous'}; needs writable "
                "anonymous memory (SGLang's default host allocator)"
            )
        end = hi
    if start % page:
        raise UnsupportedPool(f"host pool at {start:#x} is not aligned to its {page}-byte pages")
    return page, end


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], written)


def _cuda_host_unregister(ranges: list[tuple[int, int]]) -> None:
    if ranges:
        cudart = torch.cuda.cudart()
        for ptr, _ in ranges:
            rc = int(cudart.cudaHostUnregister(ptr))
            if rc:
                raise RuntimeError(f"cudaHostUnregister({ptr:#x}) failed with {rc}")


def _cuda_host_register(ranges: list[tuple[int, int]]) -> None:
    if ranges:
        cudart = torch.cuda.cudart()
        for ptr, size in ranges:
            rc = int(cudart.cudaHostRegister(ptr, size, 0))
            if rc:
                raise RuntimeError(f"cudaHostRegister({ptr:#x}, {size}) failed with {rc}")


def _libc() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_size_t
    libc.mmap.argtypes = [
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    return libc
