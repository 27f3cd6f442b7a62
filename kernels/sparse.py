"""Sparse activation (WINA / TEAL): a linear layer that skips negligible input channels.

For y = x W^T with W [N, K], input channel j of row t is kept when its score
|x[t, j]| * col_norms[j] (WINA; TEAL: col_norms = None, the score is |x[t, j]|) reaches the row's
threshold; y[t] sums only the kept columns. Weights are stored input-channel-major
(`weight_t` = W.T contiguous, [K, N]) so a skipped channel is a skipped contiguous row of memory.

Thresholds are per row: a calibrated per-layer constant repeated, or the k-th largest score of
the row (`top_k_thresholds`) for per-token top-k.

Implementations, one signature (x [T, K] in weight_t's dtype, col_norms [K] or None,
thresholds [T], bias [N] or None; y [T, N] in x's dtype):

- ``sparse_linear_ref``: a dense matmul of the masked input (the oracle, and the prefill path:
  with many rows nearly every channel is kept by some row, and a GEMM beats anything sparse);
- ``sparse_linear_cpu``: for up to MAX_ROWS rows of bf16, fp16 or fp32 on a CPU with AVX-512 or
  AVX2, a C kernel (kernels/csrc/sparse_linear.c) that gathers the channels any row keeps and
  streams only those rows of weight_t: (1 - sparsity) of the weight bytes for one row, the union
  of the rows' kept channels for several (1 - sparsity^T of them for rows that choose
  independently). Variants, chosen once per process (`variants`, `set_variant`), the first this
  CPU runs being the default: "avx512" and "avx2" (CPUs without AVX-512, e.g. AMD Zen 2 and 3).
  Every other case goes to sparse_linear_ref; so does everything when gcc, Python's headers or
  AVX2 are missing (with one warning);
- ``sparse_linear_triton``: for up to MAX_ROWS rows on a GPU, Triton kernels that compute the
  mask from x, col_norms and thresholds themselves and load only the kept rows of weight_t
  (masked loads), split over K for small N: for one row, multiply-adds into a tile of sums (on an
  H100, Llama-3-8B's projections together: 1.01x cuBLAS dense at s = 0, 1.57x at 0.5, 1.78x at
  0.65); for more, a product of 16-row padded tiles that skips a block of channels no row keeps;
- ``sparse_linear``: the Triton kernel for CUDA tensors, the C kernel on the CPU, else the
  reference.

The kernels accumulate in fp32 and round once after adding the bias (the reference rounds the
matmul, then adds the bias), so they match the reference to rounding, not bit for bit. A dropped
channel contributes nothing to them, not even a NaN or infinity of x or of the weight (the
reference multiplies it by 0). The C kernel is batch and thread-count invariant: row t of the
output depends only on row t of the input, bit for bit (for finite weights).

Speed on the CPU (bench/bench_sparse_linear.py): one row streams the kept rows at about the
memory bandwidth, so a layer at sparsity s takes about (1 - s) of the dense time (of
kernels.cpu_linear.linear on W [N, K]), a little more for small layers. With several rows both
the bytes (the union) and the arithmetic grow: at 4 rows and s = 0.5 the union is ~94% of the
channels and the kernel is slower than the dense layer; at 16 rows it is several times slower.
"""

from __future__ import annotations

import functools
import sysconfig
import threading
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from kernels.build import (
    CSRC_DIR,
    BuildError,
    build_shared_library,
    cpu_flags,
    cpu_vendor,
    load_extension,
)

try:  # Triton is optional: the CPU paths need none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

# The most rows the kernels take: decoding batches. Larger ones are prefill: sparse_linear_ref.
MAX_ROWS = 16


def channel_scores(x: Tensor, col_norms: Tensor | None) -> Tensor:
    """float32 [T, K]: |x| (TEAL) or |x| * ||W[:, j]||_2 (WINA).

    |x| is exact in any dtype and the product with float32 norms promotes exactly, so taking
    |x| first saves the float32 copy of x: this runs for every projection group of every token.
    """
    scores = x.abs()
    return scores.float() if col_norms is None else scores * col_norms.float()


def top_k_thresholds_ref(scores: Tensor, keep: int) -> Tensor:
    """float32 [T]: each row's `keep`-th largest score, so `scores >= threshold` keeps `keep`
    channels (more only on ties)."""
    if keep >= scores.shape[-1]:
        return torch.full(scores.shape[:1], -torch.inf, device=scores.device)
    if keep <= 0:
        return torch.full(scores.shape[:1], torch.inf, device=scores.device)
    return scores.topk(keep, dim=-1, sorted=False).values.min(dim=-1).values


def top_k_thresholds(scores: Tensor, keep: int) -> Tensor:
    """top_k_thresholds_ref's values; on the CPU by numpy's introselect, a third of
    torch.topk's time at decode sizes (topk alone was a sixth of a decode step)."""
    width = scores.shape[-1]
    # numpy takes no autograd tensors
    if not scores.is_cpu or scores.dtype != torch.float32 or scores.requires_grad:
        return top_k_thresholds_ref(scores, keep)
    if not 0 < keep < width:
        return top_k_thresholds_ref(scores, keep)
    # The (width - keep)-th smallest score (from 0) is the keep-th largest.
    values = np.partition(scores.numpy(), width - keep, axis=-1)[:, width - keep]
    return torch.from_numpy(np.ascontiguousarray(values))


def input_top_k_thresholds(x: Tensor, col_norms: Tensor | None, keep: int) -> Tensor:
    """top_k_thresholds(channel_scores(x, col_norms), keep), bit for bit; where the CPU kernel
    applies (x [T, K] with T <= MAX_ROWS, no autograd), one C call that never materialises the
    scores: the two torch ops and numpy's selection cost about 30 us per projection group."""
    kernel = _top_k_kernel(x, col_norms, keep)
    if kernel is None:
        return top_k_thresholds(channel_scores(x, col_norms), keep)
    rows, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    norms = None if col_norms is None else _fp32_vector(col_norms, k)
    out = torch.empty(rows, dtype=torch.float32)
    kernel(
        x.data_ptr(),
        x.stride(0),
        0 if norms is None else norms.data_ptr(),
        out.data_ptr(),
        rows,
        k,
        keep,
    )
    return out


def _top_k_kernel(x: Tensor, col_norms: Tensor | None, keep: int) -> Callable[..., None] | None:
    if not x.is_cpu or x.dim() != 2 or not 0 < x.shape[0] <= MAX_ROWS:
        return None
    if not 0 < keep < x.shape[1] or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if col_norms is not None and not (col_norms.is_cpu and col_norms.shape == (x.shape[1],)):
        return None
    if _kernels.get(x.dtype, _NOT_LOADED) is _NOT_LOADED:
        _load_kernel(x.dtype)
    return _top_k_kernels.get(x.dtype)


def sparse_linear_ref(
    x: Tensor,
    weight_t: Tensor,
    col_norms: Tensor | None,
    thresholds: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """y [T, N] in x's dtype: (x * keep) @ weight_t (+ bias), keep = scores >= thresholds[:, None].

    The reference and the prefill path: a dense matmul of the masked input.
    """
    keep = channel_scores(x, col_norms) >= thresholds[:, None].float()
    y = (x * keep.to(x.dtype)) @ weight_t
    return y if bias is None else y + bias


def sparse_linear(
    x: Tensor,
    weight_t: Tensor,
    col_norms: Tensor | None,
    thresholds: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """sparse_linear_ref's semantics; dispatches to the fastest path for the device and shape:
    sparse_linear_triton for CUDA tensors of up to MAX_ROWS rows (Triton installed), the C kernel
    for CPU tensors of up to MAX_ROWS rows (see sparse_linear_cpu), else sparse_linear_ref."""
    if x.is_cuda:
        if triton is not None and _triton_applies(x, weight_t, col_norms, thresholds, bias):
            return sparse_linear_triton(x, weight_t, col_norms, thresholds, bias)
        return sparse_linear_ref(x, weight_t, col_norms, thresholds, bias)
    return sparse_linear_cpu(x, weight_t, col_norms, thresholds, bias)


# ---------------------------------------------------------------------------------------------
# The CPU kernel

_SOURCE = CSRC_DIR / "sparse_linear.c"
# Arithmetic exactly as written: the scores must round as channel_scores rounds them.
_FLAGS = ("-O2", "-fopenmp", "-ffp-contract=off")
# Instruction set -> its compiler flags and the CPU flags it needs, the preferred first.
_ISA_FLAGS = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
}
_ISA_CPU_FLAGS = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "fma"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
}
# bf16 on AVX-512 CPUs that have it: two products per instruction (VDPBF16PS) instead of one FMA,
# with the same results (see the C source).
_DOT_CPU_FLAG = "avx512_bf16"
_DTYPE_MODULES = {
    torch.bfloat16: ("sparse_linear_bf16", "-DTANDEM_BF16"),
    torch.float16: ("sparse_linear_f16", "-DTANDEM_F16"),
    torch.float32: ("sparse_linear_f32", "-DTANDEM_F32"),
}

KernelFn = Callable[..., int]

# dtype -> the compiled kernel, or None where the CPU, compiler or platform has none.
_kernels: dict[torch.dtype, KernelFn | None] = {}
# dtype -> the same module's top-k threshold selection (input_top_k_thresholds).
_top_k_kernels: dict[torch.dtype, Callable[..., None]] = {}
_NOT_LOADED = object()
_load_lock = threading.Lock()
_warned = False
_chosen_variant: str | None = None  # set_variant's choice; None: the first this CPU runs


def variants() -> tuple[str, ...]:
    """The C kernel's variants this CPU runs, the default first, of "avx512" and "avx2"."""
    flags = cpu_flags()
    return tuple(isa for isa, needed in _ISA_CPU_FLAGS.items() if needed <= flags)


def set_variant(name: str) -> None:
    """Run variant `name` (one of variants()) for every dtype from now on. Choose once, at
    startup: a decode step prepared earlier keeps the kernel it found. The variants' results
    are equal bit for bit, except bf16 on CPUs with AVX512-BF16 ("avx512" then flushes
    subnormal products to zero); "avx2" is there for CPUs without AVX-512, and to test it on
    those with."""
    global _chosen_variant
    if name not in variants():
        raise ValueError(f"this CPU runs the sparse kernel variants {variants()}, not {name!r}")
    with _load_lock:
        _chosen_variant = name
        _kernels.clear()
        _top_k_kernels.clear()


def current_variant() -> str | None:
    """The variant sparse_linear_cpu runs (None where this CPU runs none)."""
    return _chosen_variant or next(iter(variants()), None)


def cpu_kernel_available(dtype: torch.dtype) -> bool:
    """Whether sparse_linear_cpu has a compiled kernel for weights of `dtype` on this machine
    (compiling it on first call, about 3 s, cached on disk by kernels.build)."""
    return _load_kernel(dtype) is not None


def entry_address(dtype: torch.dtype) -> int:
    """The address of the C kernel for a C caller's team of threads (kernels.cpu_decode), 0
    where there is none: int f(x, ldx, w_t, col_norms or NULL, keep, threshold, bias or NULL,
    out, m, n, k, thread, team, sync, context, shared), every thread of the team calling it with
    the same arguments; keep > 0 keeps each row's top keep channels, else every row keeps the
    channels whose score reaches *threshold (fp32)."""
    kernel = _load_kernel(dtype)
    lookup = None if kernel is None else getattr(kernel.__self__, "entry_address", None)
    return 0 if lookup is None else lookup("sparse")


def uses_cpu_kernel(
    x: Tensor,
    weight_t: Tensor,
    col_norms: Tensor | None,
    thresholds: Tensor,
    bias: Tensor | None = None,
) -> bool:
    """Whether sparse_linear_cpu runs the C kernel for these arguments (else the reference)."""
    return cpu_kernel_available(weight_t.dtype) and _cpu_applies(
        x, weight_t, col_norms, thresholds, bias
    )


def sparse_linear_cpu(
    x: Tensor,
    weight_t: Tensor,
    col_norms: Tensor | None,
    thresholds: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """sparse_linear_ref's semantics, by the C kernel where it applies: CPU tensors, x [T, K]
    with 1 <= T <= MAX_ROWS in weight_t's dtype (bf16, fp16 or fp32; any row stride, copied
    when its elements are not contiguous), weight_t [K, N] contiguous, bias None or [N]
    contiguous in the same dtype, thresholds [T] (or [1]), col_norms None or [K], no autograd.
    Thresholds and col_norms are read as fp32: contiguous fp32 tensors cost nothing, others one
    conversion per call. Everything else: sparse_linear_ref."""
    kernel = _kernels.get(weight_t.dtype, _NOT_LOADED)
    if kernel is _NOT_LOADED:
        kernel = _load_kernel(weight_t.dtype)
    if kernel is None or not _cpu_applies(x, weight_t, col_norms, thresholds, bias):
        return sparse_linear_ref(x, weight_t, col_norms, thresholds, bias)
    rows, k = x.shape
    n = weight_t.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    thresholds = _fp32_vector(thresholds, rows)
    norms = None if col_norms is None else _fp32_vector(col_norms, k)
    out = x.new_empty(rows, n)
    kernel(
        x.data_ptr(),
        x.stride(0),
        weight_t.data_ptr(),
        0 if norms is None else norms.data_ptr(),
        thresholds.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        n,
        k,
        torch.get_num_threads(),
    )
    return out


def _fp32_vector(values: Tensor, length: int) -> Tensor:
    if values.dtype is not torch.float32 or not values.is_contiguous():
        values = values.float().contiguous()
    if values.shape[0] != length:  # one threshold for every row
        values = values.expand(length).contiguous()
    return values


def _cpu_applies(
    x: Tensor,
    weight_t: Tensor,
    col_norms: Tensor | None,
    thresholds: Tensor,
    bias: Tensor | None,
) -> bool:
    """Every check is cheap (this runs once per projection per decoding step): each attribute
    read of a tensor costs a tenth of a microsecond or more."""
    dtype = weight_t.dtype
    if x.dtype is not dtype or not (x.is_cpu and weight_t.is_cpu and thresholds.is_cpu):
        return False
    shape, weight_shape, threshold_shape = x.shape, weight_t.shape, thresholds.shape
    if len(shape) != 2 or len(weight_shape) != 2 or len(threshold_shape) != 1:
        return False
    rows, k = shape
    if not (0 < rows <= MAX_ROWS and k == weight_shape[0] and threshold_shape[0] in (rows, 1)):
        return False
    if k == 0 or weight_shape[1] == 0 or not weight_t.is_contiguous():
        return False
    if col_norms is not None and not (col_norms.is_cpu and col_norms.shape == (k,)):
        return False
    if bias is not None and not (
        bias.dtype is dtype
        and bias.is_cpu
        and bias.shape == (weight_shape[1],)
        and bias.is_contiguous()
    ):
        return False
    return not (torch.is_grad_enabled() and _needs_grad(x, weight_t, col_norms, thresholds, bias))


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _load_kernel(dtype: torch.dtype) -> KernelFn | None:
    with _load_lock:
        if dtype not in _kernels:
            kernel = _kernels[dtype] = _build_kernel(dtype)
            if kernel is not None:
                _top_k_kernels[dtype] = kernel.__self__.top_k_thresholds
        return _kernels[dtype]


def _build_kernel(
    dtype: torch.dtype, dot_pairs: bool | None = None, isa: str | None = None
) -> KernelFn | None:
    """The compiled kernel for `dtype`, or None (with one warning per process) where there is
    none. isa: "avx512" or "avx2"; None: current_variant(). dot_pairs (avx512 only): bf16
    through VDPBF16PS; None: where the CPU has it."""
    global _warned
    if dtype not in _DTYPE_MODULES:
        return None
    name, define = _DTYPE_MODULES[dtype]
    isa = isa or current_variant()
    if dot_pairs is None:
        dot_pairs = isa == "avx512" and dtype == torch.bfloat16 and _DOT_CPU_FLAG in cpu_flags()
    try:
        if isa is None:
            raise BuildError("this CPU has neither AVX-512 nor AVX2 with FMA and F16C")
        flags = (*_FLAGS, *_ISA_FLAGS[isa], define, f"-I{sysconfig.get_paths()['include']}")
        if dot_pairs:
            flags = (*flags, "-mavx512bf16")
        if cpu_vendor() == "AuthenticAMD":
            # The Zen 4 EPYC streamed the kept rows 20-25% faster with the prefetches going
            # to L2 than into L1 (session 13), and faster again non-temporal (session 28: 0.94-
            # 0.97 of L2's time at one input row, 0.88 at eight, AVX2 0.93); a Xeon was faster
            # with them into L1. Four kept rows a block at one or two input rows, not eight:
            # 0.83 and 0.90 of the time there (session 27; see sparse_linear.c).
            flags = (*flags, "-DPREFETCH_HINT=_MM_HINT_NTA", "-DBLOCK_ROWS_FEW=4")
        path = build_shared_library(_SOURCE, flags)
        module = load_extension(name if isa == "avx512" else f"{name}_{isa}", path)
    except (BuildError, ImportError, OSError) as error:
        if not _warned:  # one warning whatever the number of dtypes
            _warned = True
            warnings.warn(
                f"sparse_linear: no fast CPU kernel ({error}); using sparse_linear_ref",
                RuntimeWarning,
                stacklevel=5,
            )
        return None
    if module.MAX_M != MAX_ROWS:
        raise RuntimeError(f"{path} was built for batches of up to {module.MAX_M} rows")
    return module.linear


# ---------------------------------------------------------------------------------------------
# The Triton kernels. Only builtins inside (tl.reduce with the standard library's combine
# functions, not tl.max / tl.zeros, which the interpreter cannot call unless it was on at import;
# see kernels/fusion.py).

if triton is not None:
    _MAX = tl.standard._elementwise_max
    _SUM = tl.standard._sum_combine

BLOCK_T = 16  # rows, padded: tl.dot needs 16
# (BLOCK_K, BLOCK_N) and launch options on a GPU, chosen by bench/bench_gpu_kernels.py --sweep on
# an H100: of rows of w of BLOCK_N columns (256 contiguous bytes in bf16 for 128: a skipped row
# is a skipped memory transaction), for the tile-product kernel (2 to 16 rows) and for the
# one-row kernel (batch-1 decode). The interpreter runs the programs one after another in numpy,
# where every block costs milliseconds of overhead: larger blocks, same code.
GPU_BLOCKS = (64, 128)
GPU_LAUNCH = {"num_warps": 2, "num_stages": 2}
GEMV_BLOCKS = (32, 128)
GEMV_LAUNCH = {"num_warps": 2, "num_stages": 2}
# Programs per SM that K is split into (in shares) when the blocks of N alone are fewer.
PROGRAMS_PER_SM = {"tiles": 4, "gemv": 8}
INTERPRETER_BLOCKS = (256, 256)
REDUCE_BLOCK_N = 256


def _sparse_kernel(
    x_ptr,
    w_ptr,
    norm_ptr,
    thr_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    T,
    K,
    N,
    k_share,
    stride_xt,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_yt,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_NORMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[:, block of N] = sum over this program's share of K of the kept x[t, j] * w[j, :]: the
    mask from x, the norms and the thresholds; rows of w that no row keeps are not loaded. SPLIT:
    fp32 partial sums into part[share] instead (the reduce kernel adds them and the bias)."""
    pid_n = tl.program_id(0)
    share = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    # Padding rows keep nothing: their x is 0 and their threshold +inf.
    thr = tl.load(thr_ptr + offs_t, mask=t_ok, other=float("inf")).to(tl.float32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_begin = share * k_share
    k_end = tl.minimum(k_begin + k_share, K)
    acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=t_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        score = tl.abs(x.to(tl.float32))
        if HAS_NORMS:
            norms = tl.load(norm_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            score = score * norms[None, :]
        keep = (score >= thr[:, None]) & t_ok[:, None] & k_ok[None, :]
        row_kept = tl.reduce(keep.to(tl.int32), 0, _MAX)  # [BLOCK_K]: some row keeps channel j
        if tl.reduce(row_kept, 0, _MAX) > 0:
            w = tl.load(
                w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=(row_kept > 0)[:, None] & n_ok[None, :],
                other=0.0,
                eviction_policy="evict_first",  # read once: keep x and the norms in the cache
            )
            x = tl.where(keep, x, 0.0)
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
            else:
                acc += tl.dot(x, w, input_precision=PRECISION)
    out_mask = t_ok[:, None] & n_ok[None, :]
    if SPLIT:
        part = part_ptr + (share * T + offs_t[:, None]) * N + offs_n[None, :]
        tl.store(part, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _sparse_gemv_kernel(
    x_ptr,
    w_ptr,
    norm_ptr,
    thr_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    K,
    N,
    k_share,
    stride_xk,
    stride_wk,
    stride_wn,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_NORMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """_sparse_kernel for one row (batch-1 decode), without a tile product padded to 16 rows:
    each thread multiplies and adds its own elements of the [BLOCK_K, BLOCK_N] tiles into an
    fp32 tile of sums, summed over K once at the end (no shared memory, no exchange between
    threads in the loop). Loading x one block ahead, to overlap its load with w's, was slower on
    an H100 (more registers, fewer programs per SM)."""
    pid_n = tl.program_id(0)
    share = tl.program_id(1)
    thr = tl.load(thr_ptr).to(tl.float32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_begin = share * k_share
    k_end = tl.minimum(k_begin + k_share, K)
    acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(x_ptr + offs_k * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        score = tl.abs(x)
        if HAS_NORMS:
            score = score * tl.load(norm_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        keep = (score >= thr) & k_ok
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=keep[:, None] & n_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",  # read once: keep x and the norms in the cache
        )
        # A dropped channel adds 0 * 0, whatever its x or its row of w holds.
        acc += tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32)
    out = tl.reduce(acc, 0, _SUM)
    if SPLIT:
        tl.store(part_ptr + share * N + offs_n, out, mask=n_ok)
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


def _reduce_kernel(
    part_ptr,
    bias_ptr,
    y_ptr,
    T,
    N,
    shares,
    stride_yt,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """y[t, block] = sum of the shares' partial sums in share order (+ bias), rounded once."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.load(part_ptr + t * N + offs_n, mask=n_ok, other=0.0)
    for share in range(1, shares):
        acc += tl.load(part_ptr + (share * T + t) * N + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_yt + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@functools.cache
def _jitted(interpret: bool) -> tuple:
    """The kernels, jitted on first use so that TRITON_INTERPRET is read then."""
    del interpret  # part of the cache key only
    return triton.jit(_sparse_kernel), triton.jit(_sparse_gemv_kernel), triton.jit(_reduce_kernel)


def triton_available() -> bool:
    return triton is not None


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_shares(n_blocks: int, k_blocks: int, device: torch.device, per_sm: int) -> int:
    """Shares of K per block of N: about `per_sm` programs per SM (decode-sized N leaves most of
    the GPU idle otherwise), rounded down to a power of two (equal shares of the usual K: on an
    H100 the one-row kernel was 1.40x cuBLAS at s = 0.5 with the count rounded up, 1.57x with
    it rounded down so), each share at least one block of K; 1 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 1
    shares = max(1, min(k_blocks, -(-per_sm * _num_sms(device) // n_blocks)))
    return 1 << (shares.bit_length() - 1)


def _triton_applies(
    x: Tensor,
    weight_t: Tensor,
    col_norms: Tensor | None,
    thresholds: Tensor,
    bias: Tensor | None,
) -> bool:
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype is weight_t.dtype
        and (bias is None or bias.dtype is weight_t.dtype)
        and not _needs_grad(x, weight_t, col_norms, thresholds, bias)
    )


def sparse_linear_triton(
    x: Tensor,
    weight_t: Tensor,
    col_norms: Tensor | None,
    thresholds: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """sparse_linear_ref's semantics for x [T, K] with 1 <= T <= MAX_ROWS, in one Triton launch
    (two when K is split over several programs: a second adds the shares in a fixed order): the
    one-row kernel for T = 1, the tile-product kernel otherwise. Any strides; x, weight_t and
    bias in one dtype (bf16, fp16 or fp32); no autograd."""
    if triton is None:
        raise RuntimeError("sparse_linear_triton needs triton, which is not installed")
    rows, k = x.shape
    k_w, n = weight_t.shape
    if not 0 < rows <= MAX_ROWS:
        raise ValueError(f"sparse_linear_triton takes 1 to {MAX_ROWS} rows, not {rows}")
    if k_w != k:
        raise ValueError(f"x is [{rows}, {k}] but weight_t is [{k_w}, {n}]")
    if thresholds.shape[0] != rows:  # one threshold for every row
        thresholds = thresholds.expand(rows).contiguous()
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    interpret = bool(triton.knobs.runtime.interpret)
    tiles, gemv, reduce = _jitted(interpret)
    one_row = rows == 1
    if interpret:
        (block_k, block_n), launch = INTERPRETER_BLOCKS, {}
    else:
        block_k, block_n = GEMV_BLOCKS if one_row else GPU_BLOCKS
        launch = GEMV_LAUNCH if one_row else GPU_LAUNCH
    n_blocks, k_blocks = triton.cdiv(n, block_n), triton.cdiv(max(k, 1), block_k)
    per_sm = PROGRAMS_PER_SM["gemv" if one_row else "tiles"]
    shares = _num_shares(n_blocks, k_blocks, x.device, per_sm)
    k_share = triton.cdiv(k_blocks, shares) * block_k
    shares = max(1, triton.cdiv(k, k_share))
    split = shares > 1
    part = torch.empty(shares, rows, n, dtype=torch.float32, device=x.device) if split else y
    pointers = (
        x,
        weight_t,
        thresholds if col_norms is None else col_norms,
        thresholds,
        y if bias is None else bias,
        y,
        part,
    )
    flags = {"HAS_NORMS": col_norms is not None, "HAS_BIAS": bias is not None, "SPLIT": split}
    w_strides = (weight_t.stride(0), weight_t.stride(1))
    if one_row:
        gemv[(n_blocks, shares)](
            *pointers, k, n, k_share, x.stride(1), *w_strides,
            BLOCK_K=block_k, BLOCK_N=block_n, **flags, **launch,
        )  # fmt: skip
    else:
        # The interpreter multiplies 16-bit tiles wrongly: it gets float32 tiles (exact products).
        upcast = interpret or x.dtype == torch.float32
        tiles[(n_blocks, shares)](
            *pointers, rows, k, n, k_share, x.stride(0), x.stride(1), *w_strides, y.stride(0),
            BLOCK_T=BLOCK_T, BLOCK_K=block_k, BLOCK_N=block_n, **flags, UPCAST=upcast,
            PRECISION="ieee" if upcast else "tf32", **launch,
        )  # fmt: skip
    if split:
        reduce[(rows, triton.cdiv(n, REDUCE_BLOCK_N))](
            part,
            y if bias is None else bias,
            y,
            rows,
            n,
            shares,
            y.stride(0),
            BLOCK_N=REDUCE_BLOCK_N,
            HAS_BIAS=bias is not None,
        )
    return y
