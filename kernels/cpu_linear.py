"""Decode-time linear layer for the CPU.

`linear` has torch.nn.functional.linear's semantics. For up to MAX_ROWS input rows of bf16 or
fp32 on a CPU with AVX-512 or AVX2 it runs a C kernel (kernels/csrc/cpu_linear.c) that streams
each weight byte once, where torch's bf16 GEMV reaches about half the memory bandwidth; every
other case (prefill, other dtypes, autograd, other devices) goes to F.linear. Kernel variants,
chosen once per process, the first this CPU runs being the default: "amx" (bf16 on Sapphire
Rapids and later, as fast at 16 rows as at 1), "avx512" (bf16 needs AVX512-BF16; its arithmetic
grows with the rows, halving its speed by M = 16) and "avx2" (any x86-64 CPU with AVX2 and FMA,
e.g. AMD Zen 2 and 3: bf16 widened to fp32, bound by its FMA units from about 8 rows).
Two uses of the same kernels for multi-LoRA decoding (kernels/lora.py): `linear_add_` adds the
product into a slice of an existing output as it stores it, and `lora_dense_` runs a projection
group's shrink, slot weights and expands in one call, skipping the A rows of idle slots (with
the AMX kernel in one parallel region; `LoraDense` is that call with its weights checked once).

The kernels are batch invariant: row r of linear(X) equals linear(X[r:r+1]) bit for bit for
any batch of up to MAX_ROWS rows, because each output element is computed by the same sequence
of operations whatever the batch. F.linear (the fallback above MAX_ROWS rows) makes no such
promise, and the two variants round differently from each other.

The C source is compiled on first use into CPython extension modules (one per weight dtype and
instruction set, about 1.5 s each, cached on disk by kernels.build). They link libgomp.so.1 by
soname, so they share the OpenMP runtime and thread pool that torch already loaded: torch is
imported before they are opened.
Without gcc, Python's headers or AVX2, `linear` is F.linear (with one warning).
"""

from __future__ import annotations

import functools
import sysconfig
import threading
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from kernels.build import (
    CSRC_DIR,
    BuildError,
    build_shared_library,
    cpu_flags,
    cpu_vendor,
    load_extension,
)

MAX_ROWS = 16

_SOURCE = CSRC_DIR / "cpu_linear.c"
# Arithmetic exactly as written, never contracted into other instructions: batch invariance and
# the rounding the tests check rest on it.
_COMMON_FLAGS = ("-O2", "-fopenmp", "-ffp-contract=off")
_ISA_FLAGS = {
    "avx512": (
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
        "-mfma",
    ),
    "avx2": ("-mavx2", "-mfma"),
}  # fmt: skip
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "f32"}
_DTYPE_DEFINES = {torch.bfloat16: "-DTANDEM_BF16", torch.float32: "-DTANDEM_F32"}
# (dtype, instruction set) -> the CPU flags its module needs.
_REQUIRED_CPU_FLAGS = {
    (torch.bfloat16, "avx512"): frozenset(
        {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"}
    ),
    (torch.float32, "avx512"): frozenset({"avx512f", "avx512bw", "avx512vl", "fma"}),
    (torch.bfloat16, "avx2"): frozenset({"avx2", "fma"}),
    (torch.float32, "avx2"): frozenset({"avx2", "fma"}),
}
_AMX_CPU_FLAGS = frozenset({"amx_tile", "amx_bf16"})

KernelFn = Callable[..., None]

# dtype -> the kernel `linear` runs, or None where the CPU, compiler or platform has none.
_kernels: dict[torch.dtype, KernelFn | None] = {}
# dtype -> every kernel variant this machine can run, the default first.
_variants: dict[torch.dtype, dict[str, KernelFn]] = {}
_NOT_LOADED = object()
_load_lock = threading.Lock()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ weight.T + bias, exactly as torch.nn.functional.linear."""
    kernel = _kernel(weight.dtype)
    rows = None if kernel is None else _kernel_rows(x, weight, bias)
    if rows is None:
        return F.linear(x, weight, bias)
    m, k = rows.shape
    n = weight.shape[0]
    row_stride, element_stride = rows.stride()
    if element_stride != 1:
        rows = rows.contiguous()
        row_stride = k
    # new_empty with unpacked sizes: the cheapest allocation call (tuple arguments cost more).
    out = x.new_empty(m, n) if x.dim() == 2 else x.new_empty(*x.shape[:-1], n)
    kernel(
        rows.data_ptr(),
        row_stride,
        weight.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        m,
        n,
        k,
        torch.get_num_threads(),
    )
    return out


def linear_add_(out: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """out += x @ weight.T in place, exactly as out.add_(linear(x, weight)) (the product rounded
    to out's dtype, then the sum), without the product's temporary: the kernel adds each result
    as it stores it. out [m, n] may be a column slice of a wider matrix (rows strided)."""
    kernel = _kernel(weight.dtype)
    rows = None if kernel is None else _kernel_rows(x, weight, None)
    if (
        rows is None
        or x.dim() != 2
        or out.dtype is not weight.dtype
        or not out.is_cpu
        or out.shape != (rows.shape[0], weight.shape[0])
        or out.stride(1) != 1
        or (out.shape[0] > 1 and out.stride(0) < out.shape[1])
        or _shares_storage(out, x)
        or _shares_storage(out, weight)
        or (torch.is_grad_enabled() and out.requires_grad)
    ):
        return out.add_(linear(x, weight))
    m, k = rows.shape
    row_stride, element_stride = rows.stride()
    if element_stride != 1:
        rows = rows.contiguous()
        row_stride = k
    kernel(
        rows.data_ptr(),
        row_stride,
        weight.data_ptr(),
        0,
        out.data_ptr(),
        m,
        weight.shape[0],
        k,
        torch.get_num_threads(),
        max(out.stride(0), weight.shape[0]),
        1,
    )
    return out


def lora_dense_(
    y: Tensor,
    x: Tensor,
    a: Tensor,
    mask: Tensor | None,
    b: Tensor,
    slices: Sequence[tuple[int, int]],
    skip: Tensor | None = None,
) -> bool:
    """Multi-LoRA's dense decode step in one C call, the same bits as kernels.lora's ops:
    shrunk = linear(x, a) viewed [m, P, C]; shrunk &= mask (int16 0 / -1) or *= mask ([m, C],
    broadcast over the P slices; None: no mask); then for each slice p, (start, width):
    y[:, start : start + width] += linear(shrunk[:, p], B_p), B_p the next `width` rows of b.
    a: [P * C, K], b: [sum of widths, C], both contiguous. skip: uint8 [ceil(P * C / 16)], 1 for
    the 16-row groups of a whose rows no mask lets through (the AMX kernel then does not read
    them; their shrunk columns are 0 before the mask instead). Returns False, having done
    nothing, where the kernel does not apply (the caller then runs the ops one by one).
    A caller that runs the same a, b and slices again should keep LoraDense.prepare's call."""
    call = LoraDense.prepare(a, b, slices)
    return call is not None and call(y, x, mask, skip)


class LoraDense:
    """lora_dense_ for one (a, b, slices), checked once: a decode step runs each projection
    group's adapters ~24 times with the same stacks, and checking them costs more than the
    kernel's small calls. Holds a and b, so their memory stays while it lives."""

    __slots__ = ("a", "b", "columns", "k", "layout", "min_width", "num_slices", "total")

    def __init__(self, a: Tensor, b: Tensor, slices: tuple[tuple[int, int], ...]) -> None:
        self.a, self.b = a, b
        self.total, self.k = a.shape
        self.num_slices = len(slices)
        self.columns = self.total // self.num_slices
        self.layout = _slice_layout(slices)
        self.min_width = max(start + width for start, width in slices)

    @classmethod
    def prepare(cls, a: Tensor, b: Tensor, slices: Sequence[tuple[int, int]]) -> LoraDense | None:
        """The call, or None where the kernel cannot take these weights."""
        slices = tuple(slices)
        if _kernel(a.dtype) is None or getattr(_module(a.dtype), "lora_dense", None) is None:
            return None  # no kernel, or a build from before lora_dense
        if not slices or a.dim() != 2 or not a.is_cpu or not a.is_contiguous():
            return None
        total, k = a.shape
        widths = [width for _, width in slices]
        columns = total // len(slices)
        if (
            k < 1
            or columns < 1
            or columns * len(slices) != total
            or b.dtype is not a.dtype
            or not b.is_cpu
            or not b.is_contiguous()
            or tuple(b.shape) != (sum(widths), columns)
            or any(start < 0 or width < 1 for start, width in slices)
            or a.requires_grad
            or b.requires_grad
        ):
            return None
        return cls(a, b, slices)

    def __call__(self, y: Tensor, x: Tensor, mask: Tensor | None, skip: Tensor | None) -> bool:
        """As lora_dense_ with this call's a, b and slices. Every check reads as few tensor
        attributes as it can: each costs a fraction of a microsecond, the kernel tens."""
        dtype = self.a.dtype
        kernel = _kernels.get(dtype)
        if kernel is None or x.dtype is not dtype or y.dtype is not dtype:
            return False
        x_shape, y_shape = x.shape, y.shape
        if len(x_shape) != 2 or len(y_shape) != 2 or not (x.is_cpu and y.is_cpu):
            return False
        m, k = x_shape
        width = y_shape[1]
        x_stride, x_element_stride = x.stride()
        y_stride, y_element_stride = y.stride()
        if m > 1 and y_stride < width:
            return False
        x_at, y_at, size = x.data_ptr(), y.data_ptr(), dtype.itemsize
        x_end = x_at + ((m - 1) * x_stride + k) * size
        y_end = y_at + ((m - 1) * y_stride + width) * size
        if (
            k != self.k
            or not 0 < m <= MAX_ROWS
            or y_shape[0] != m
            or width < self.min_width
            or x_element_stride != 1
            or y_element_stride != 1
            or (x_at < y_end and y_at < x_end)  # y overlaps x: it would change what is read
            or (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
        ):
            return False
        mask_kind = self._mask_kind(m, mask, skip)
        if mask_kind is None:
            return False
        module = kernel.__self__
        layout = self.layout.data_ptr()
        module.lora_dense(
            x_at, x_stride, self.a.data_ptr(), 0, 0 if mask is None else mask.data_ptr(),
            mask_kind, self.b.data_ptr(), y_at, y_stride if m > 1 else width, layout,
            layout + 8 * self.num_slices, self.num_slices, self.columns, m, k,
            int(kernel is getattr(module, "linear_amx", None)), torch.get_num_threads(),
            0 if skip is None else skip.data_ptr(),
        )  # fmt: skip
        return True

    def params(self, m: int, mask: Tensor | None, skip: Tensor | None) -> Tensor | None:
        """This call's arguments for a C caller (kernels.cpu_decode: lora_entry's int64 params)
        for m rows with these mask and skip, or None where the kernel does not take them. The
        caller keeps mask and skip alive while it runs the call."""
        values = self.param_values(m, mask, skip)
        return None if values is None else torch.tensor(values, dtype=torch.int64)

    def param_values(self, m: int, mask: Tensor | None, skip: Tensor | None) -> list[int] | None:
        """params' values as a list (a step's calls make one tensor of them all: each
        torch.tensor costs microseconds)."""
        dtype = self.a.dtype
        kernel = _kernels.get(dtype)
        if kernel is None or not 0 < m <= MAX_ROWS:
            return None
        mask_kind = self._mask_kind(m, mask, skip)
        if mask_kind is None:
            return None
        layout = self.layout.data_ptr()
        return [
            self.a.data_ptr(), 0 if mask is None else mask.data_ptr(), mask_kind,
            self.b.data_ptr(), layout, layout + 8 * self.num_slices, self.num_slices,
            self.columns, self.k, int(kernel is getattr(kernel.__self__, "linear_amx", None)),
            0 if skip is None else skip.data_ptr(),
        ]  # fmt: skip

    def _mask_kind(self, m: int, mask: Tensor | None, skip: Tensor | None) -> int | None:
        """The kernel's code for the mask (0: none, 1: int16 bits, 2: weights in the weights'
        dtype), or None where mask or skip does not fit m rows of this call."""
        dtype = self.a.dtype
        if skip is not None and (
            skip.shape != ((self.total + 15) // 16,)
            or skip.dtype is not torch.uint8
            or not skip.is_contiguous()
        ):
            return None
        if mask is None:
            return 0
        if (
            mask.shape != (m, self.columns)
            or not mask.is_cpu
            or not mask.is_contiguous()
            or mask.dtype not in (dtype, torch.int16)
            or (mask.dtype is torch.int16 and dtype.itemsize != 2)
        ):
            return None
        return 1 if mask.dtype is torch.int16 else 2


def _kernel(dtype: torch.dtype) -> KernelFn | None:
    kernel = _kernels.get(dtype, _NOT_LOADED)
    return _load_kernel(dtype) if kernel is _NOT_LOADED else kernel


def _module(dtype: torch.dtype):
    """The extension module behind dtype's kernels (any variant), or None."""
    kernel = next(iter(_variants.get(dtype, {}).values()), None)
    return None if kernel is None else kernel.__self__


@functools.lru_cache(maxsize=256)
def _slice_layout(slices: tuple[tuple[int, int], ...]) -> Tensor:
    # lora_dense_'s starts then widths, int64: a model has a handful of distinct slice tuples.
    return torch.tensor([s for s, _ in slices] + [w for _, w in slices], dtype=torch.int64)


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    # The kernel reads its inputs while it writes out: views of one buffer take the safe path.
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


_entries: dict[KernelFn, int] = {}


def lora_entry_address(dtype: torch.dtype) -> int:
    """The address of the multi-LoRA kernel for a C caller's team of threads (kernels.cpu_decode),
    taking LoraDense.params; 0 where there is none."""
    kernel = _kernel(dtype)
    lookup = None if kernel is None else getattr(kernel.__self__, "entry_address", None)
    return 0 if lookup is None else lookup("lora_dense")


def entry_address(dtype: torch.dtype) -> int:
    """The address of the C kernel `linear` runs for dtype, for a C caller's team of threads
    (kernels.cpu_decode): int f(x, ldx, w, bias or NULL, out, m, n, k, thread, team), each thread
    computing its share of out (contiguous [m, n]), m <= MAX_ROWS; 0 where there is none."""
    kernel = _kernel(dtype)
    if kernel is None:
        return 0
    address = _entries.get(kernel)
    if address is None:
        module = kernel.__self__
        lookup = getattr(module, "entry_address", None)  # absent from builds before it
        name = "amx" if kernel is getattr(module, "linear_amx", None) else module.VECTOR_ISA
        address = _entries[kernel] = lookup(name) if lookup is not None else 0
    return address


def current_variant(dtype: torch.dtype) -> str | None:
    """The variant `linear` runs for weights of `dtype` ("amx", "avx512" or "avx2"), None where
    it runs torch.nn.functional.linear."""
    kernel = _kernel(dtype)
    found = (name for name, each in _variants.get(dtype, {}).items() if each is kernel)
    return None if kernel is None else next(found, None)


def kernel_available(dtype: torch.dtype) -> bool:
    """Whether `linear` has a compiled fast path for weights of `dtype` on this machine."""
    return bool(variants(dtype))


def variants(dtype: torch.dtype) -> tuple[str, ...]:
    """The kernel variants this machine runs for weights of `dtype`, the default first, of
    "amx" (bf16 on Sapphire Rapids and later), "avx512" and "avx2"."""
    _load_kernel(dtype)
    return tuple(_variants[dtype])


def set_variant(dtype: torch.dtype, name: str) -> None:
    """Run variant `name` (one of variants(dtype)) for `dtype` from now on. Each variant is
    batch invariant but they round differently, so choose once, at startup: "avx512" is a few
    percent faster for one row at small K, "amx" (the default) up to twice as fast from 8 rows;
    "avx2" is there for CPUs without AVX-512 (and to test it on those with)."""
    _load_kernel(dtype)
    _kernels[dtype] = _variants[dtype][name]


def uses_fast_path(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether linear(x, weight, bias) runs the C kernel rather than F.linear."""
    return kernel_available(weight.dtype) and _kernel_rows(x, weight, bias) is not None


def _kernel_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x as the [m, k] matrix the kernel reads (its elements may still be strided), or None
    where the kernel does not apply. Every check is cheap: this runs ~170 times per token."""
    if x.dtype is not weight.dtype or not (x.is_cpu and weight.is_cpu):
        return None
    if weight.dim() != 2 or not weight.is_contiguous():
        return None
    n, k = weight.shape
    if bias is not None and not (
        bias.dtype is weight.dtype and bias.is_cpu and bias.shape == (n,) and bias.is_contiguous()
    ):
        return None
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return None
    if x.dim() == 2:
        m, x_k = x.shape
        rows = x
    elif x.dim() > 0 and x.shape[-1] == k:
        rows = x.reshape(-1, k)
        m, x_k = rows.shape
    else:
        return None
    return rows if x_k == k and 0 < m <= MAX_ROWS and n > 0 and k > 0 else None


def _load_kernel(dtype: torch.dtype) -> KernelFn | None:
    with _load_lock:
        if dtype not in _kernels:
            _variants[dtype] = _build_variants(dtype)
            _kernels[dtype] = next(iter(_variants[dtype].values()), None)
        return _kernels[dtype]


def _build_variants(dtype: torch.dtype) -> dict[str, KernelFn]:
    found: dict[str, KernelFn] = {}
    failures = []
    for isa in _ISA_FLAGS:
        try:
            module = _build_module(dtype, isa)
        except (BuildError, ImportError, OSError) as error:
            failures.append(f"{isa}: {error}")
            continue
        if module is None:
            continue
        if module.MAX_M != MAX_ROWS:
            raise RuntimeError(
                f"{module.__file__} was built for batches of up to {module.MAX_M} rows"
            )
        amx_capable = hasattr(module, "linear_amx") and _AMX_CPU_FLAGS.issubset(cpu_flags())
        if amx_capable and module.enable_amx():
            found["amx"] = module.linear_amx
        found[isa] = module.linear
    if failures:  # one warning for all of them: the usual cause (no gcc) is the same
        fallback = "the others" if found else "torch.nn.functional.linear"
        warnings.warn(
            f"cpu_linear: no {dtype} kernel for {'; '.join(failures)}; using {fallback}",
            RuntimeWarning,
            stacklevel=4,
        )
    return found


def _build_module(dtype: torch.dtype, isa: str):
    """dtype's extension module for instruction set `isa`, or None where this CPU lacks it."""
    required = _REQUIRED_CPU_FLAGS.get((dtype, isa))
    if required is None or not required.issubset(cpu_flags()):
        return None
    name = f"cpu_linear_{_DTYPE_NAMES[dtype]}" + ("" if isa == "avx512" else f"_{isa}")
    flags = (
        *_COMMON_FLAGS,
        *_ISA_FLAGS[isa],
        _DTYPE_DEFINES[dtype],
        f"-I{sysconfig.get_paths()['include']}",
    )
    if cpu_vendor() == "AuthenticAMD":
        flags = (*flags, "-DPREFETCH_L2")  # faster on a Zen 4 EPYC: see cpu_linear.c
    return load_extension(name, build_shared_library(_SOURCE, flags))
