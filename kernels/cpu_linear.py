"""Decode-time linear layer for the CPU.

`linear` has torch.nn.functional.linear's semantics. For up to MAX_ROWS input rows on a CPU with
AVX-512 it runs a C kernel (kernels/csrc/cpu_linear.c) that streams each weight byte once and
reaches close to the memory bandwidth, where torch's bf16 GEMV reaches about half of it; every
other case (prefill, other dtypes, autograd, other devices) goes to F.linear.

The kernel is batch invariant: row r of linear(X) equals linear(X[r:r+1]) bit for bit for any
batch of up to MAX_ROWS rows, because each output element is computed by the same instruction
sequence whatever the batch. F.linear (the fallback above MAX_ROWS rows) gives no such promise.

The C library is compiled on first use (one per weight dtype, about 1.5 s, cached on disk by
kernels.build) and links libgomp.so.1 by soname, so it shares the OpenMP runtime and thread
pool that torch already loaded: torch is imported before the library is opened.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from kernels.build import CSRC_DIR, BuildError, build_shared_library, cpu_flags

MAX_ROWS = 16

_SOURCE = CSRC_DIR / "cpu_linear.c"
_COMMON_FLAGS = (
    "-O2",
    "-fopenmp",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mfma",
    # A fused multiply-add would round differently from the separate ops written in the source.
    "-ffp-contract=off",
)
_DTYPE_DEFINES = {torch.bfloat16: "-DTANDEM_BF16", torch.float32: "-DTANDEM_F32"}
_REQUIRED_CPU_FLAGS = {
    torch.bfloat16: frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"}),
    torch.float32: frozenset({"avx512f", "avx512bw", "avx512vl", "fma"}),
}
_ARGTYPES = (
    ctypes.c_void_p,  # x
    ctypes.c_int64,  # x row stride, in elements
    ctypes.c_void_p,  # weight
    ctypes.c_void_p,  # bias or NULL
    ctypes.c_void_p,  # out
    ctypes.c_int64,  # m
    ctypes.c_int64,  # n
    ctypes.c_int64,  # k
    ctypes.c_int,  # threads
)

KernelFn = Callable[..., None]

# dtype -> compiled kernel, or None where the CPU, compiler or platform cannot provide one.
_kernels: dict[torch.dtype, KernelFn | None] = {}
_NOT_LOADED = object()
_load_lock = threading.Lock()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ weight.T + bias, exactly as torch.nn.functional.linear."""
    kernel = _kernels.get(weight.dtype, _NOT_LOADED)
    if kernel is _NOT_LOADED:
        kernel = _load_kernel(weight.dtype)
    if kernel is None or not _fast_path_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    rows = x if x.dim() == 2 else x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty((m, n) if x.dim() == 2 else (*x.shape[:-1], n), dtype=x.dtype)
    kernel(
        rows.data_ptr(),
        rows.stride(0),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        m,
        n,
        k,
        torch.get_num_threads(),
    )
    return out


def kernel_available(dtype: torch.dtype) -> bool:
    """Whether `linear` has a compiled fast path for weights of `dtype` on this machine."""
    kernel = _kernels.get(dtype, _NOT_LOADED)
    if kernel is _NOT_LOADED:
        kernel = _load_kernel(dtype)
    return kernel is not None


def uses_fast_path(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether linear(x, weight, bias) runs the C kernel rather than F.linear."""
    return kernel_available(weight.dtype) and _fast_path_applies(x, weight, bias)


def _fast_path_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    # Ordered cheapest and most often decisive first: this runs ~170 times per decoded token.
    if x.dtype is not weight.dtype or not (x.is_cpu and weight.is_cpu):
        return False
    if weight.dim() != 2 or x.dim() == 0 or not weight.is_contiguous():
        return False
    k = weight.shape[1]
    if k == 0 or weight.shape[0] == 0 or x.shape[-1] != k or not 0 < x.numel() <= MAX_ROWS * k:
        return False
    if bias is not None and not (
        bias.dtype is weight.dtype
        and bias.is_cpu
        and bias.shape == weight.shape[:1]
        and bias.is_contiguous()
    ):
        return False
    if not (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return True
    return not torch.is_grad_enabled()


def _load_kernel(dtype: torch.dtype) -> KernelFn | None:
    with _load_lock:
        if dtype not in _kernels:
            _kernels[dtype] = _build_kernel(dtype)
        return _kernels[dtype]


def _build_kernel(dtype: torch.dtype) -> KernelFn | None:
    required = _REQUIRED_CPU_FLAGS.get(dtype)
    if required is None or not required <= cpu_flags():
        return None
    try:
        path = build_shared_library(_SOURCE, (*_COMMON_FLAGS, _DTYPE_DEFINES[dtype]))
        library = ctypes.CDLL(str(path))
    except (BuildError, OSError) as error:
        warnings.warn(
            f"cpu_linear: no fast {dtype} kernel ({error}); using torch.nn.functional.linear",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if library.tandem_linear_max_m() != MAX_ROWS:
        raise RuntimeError(f"{path} was built for a different MAX_ROWS")
    kernel = library.tandem_linear
    kernel.argtypes = _ARGTYPES
    kernel.restype = None
    return kernel
