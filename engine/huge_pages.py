"""Host memory in transparent huge pages, for the tensors every decode step streams.

A decode step reads every weight once: for a 0.5B model, 775 MB in about 190,000 4 KB pages a
token, far more than the TLBs map, so the stream pays a page walk every 4 KB. In 2 MB pages
(Linux transparent huge pages, asked for with madvise, the mode most distributions ship) a
batch-1 decode step took about 0.95 of its time (bench/ab_huge_pages.py). Where the system
gives none (THP off, or no madvise), the memory is in ordinary pages, as torch's own is.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
from collections.abc import Iterable

import torch

_HUGE_PAGE = 2 << 20
_TENSOR_ALIGN = 4096  # every tensor starts on a page of its own


class HugePageArena:
    """Tensors carved one after another from one anonymous mapping advised for huge pages.

    Each tensor has a torch storage of its own over exactly its bytes, so storage identity,
    sizes and views behave as for torch.empty's tensors; the mapping lives while any of them
    does. Pages are backed only once written: reserving more than is used costs address space,
    not memory. When the capacity runs out, or no mapping can be had (no anonymous mappings on
    the platform, or the kernel refuses one that large), `empty` falls back to torch.empty.
    """

    def __init__(self, capacity: int) -> None:
        self._map: mmap.mmap | None = None
        self._offset = self._end = 0
        if capacity <= 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
            return
        size = capacity + _HUGE_PAGE  # room to start on a huge-page boundary
        try:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError:  # e.g. more than the kernel's overcommit policy lets one mapping have
            return
        with contextlib.suppress(AttributeError, OSError):  # no THP: ordinary pages
            self._map.madvise(mmap.MADV_HUGEPAGE)
        base = ctypes.addressof((ctypes.c_char * 1).from_buffer(self._map))
        self._offset = -base % _HUGE_PAGE
        self._end = size

    @classmethod
    def for_sizes(cls, sizes: Iterable[int]) -> HugePageArena:
        """An arena with room for tensors of these byte sizes."""
        return cls(sum(-(-size // _TENSOR_ALIGN) * _TENSOR_ALIGN for size in sizes))

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._map is None or nbytes == 0 or self._offset + nbytes > self._end:
            return torch.empty(shape, dtype=dtype)
        # from_buffer keeps the mapping referenced, frombuffer keeps the ctypes view referenced.
        view = (ctypes.c_char * nbytes).from_buffer(self._map, self._offset)
        self._offset += -(-nbytes // _TENSOR_ALIGN) * _TENSOR_ALIGN
        return torch.frombuffer(view, dtype=dtype).view(shape)

    def copy_of(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A contiguous copy of a CPU tensor in the arena (in `dtype`, default the tensor's)."""
        out = self.empty(tensor.shape, dtype or tensor.dtype)
        return out.copy_(tensor)


def rewrite_in_place(weight: torch.Tensor, input_major: bool) -> torch.Tensor:
    """A 2-D weight with its values in row-major order ([N, K] contiguous) or input-major order
    (a transposed view of [K, N] contiguous), written over its own bytes where it fills its
    storage, so the memory stays where it is (in its arena, if it has one); else a copy."""
    moved = weight.t().contiguous() if input_major else weight.contiguous()
    storage = weight.untyped_storage()
    if storage.nbytes() == weight.numel() * weight.element_size():
        flat = torch.empty(0, dtype=weight.dtype).set_(storage, 0, (weight.numel(),))
        moved = flat.copy_(moved.view(-1)).view(moved.shape)
    return moved.t() if input_major else moved
