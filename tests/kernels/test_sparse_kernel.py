"""kernels.sparse: the CPU kernel (kernels/csrc/sparse_linear.c) and the Triton kernel (interpreted
on CPU tensors, TRITON_INTERPRET=1; compiled for an H100 without one) against a float64 oracle of
sparse_linear_ref's semantics and against sparse_linear_ref itself, plus the dispatch and the
fallbacks."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kernels import sparse
from kernels.build import cpu_flags
from kernels.sparse import (
    MAX_ROWS,
    channel_scores,
    input_top_k_thresholds,
    sparse_linear,
    sparse_linear_cpu,
    sparse_linear_ref,
    sparse_linear_triton,
    top_k_thresholds,
    top_k_thresholds_ref,
    uses_cpu_kernel,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative rounding error of one rounding to each dtype (half an ulp at most).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
SPARSITIES = [0.0, 0.25, 0.5, 0.9, 1.0]
# (K, N): the Qwen2.5-0.5B projections without gate_up's width, a tiny one, and K and N that are
# multiples of nothing (neither of the C kernel's 16-channel / 32-column groups nor of the
# Triton blocks).
SHAPES = [(64, 96), (896, 1152), (4864, 896), (77, 33)]

needs_cpu_kernel = pytest.mark.skipif(
    not sparse.variants(), reason="this CPU has neither AVX-512 nor AVX2 with FMA and F16C"
)


def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


@functools.cache
def make_weight(k: int, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_t, column norms of W), shared by the cases (which never modify them)."""
    weight = make((n, k), dtype, seed)
    return weight.T.contiguous(), weight.float().norm(dim=0)


def make_case(
    k: int,
    n: int,
    rows: int,
    sparsity: float,
    dtype: torch.dtype,
    wina: bool = True,
    with_bias: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(x, weight_t, col_norms, thresholds, bias): per-row top-k thresholds keeping
    round((1 - sparsity) * K) channels of each row."""
    weight_t, all_norms = make_weight(k, n, dtype, seed)
    norms = all_norms if wina else None
    x = make((rows, k), dtype, seed + 1)
    thresholds = top_k_thresholds(channel_scores(x, norms), round((1 - sparsity) * k))
    bias = make((n,), dtype, seed + 2) if with_bias else None
    return x, weight_t, norms, thresholds, bias


def oracle(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    norms: torch.Tensor | None,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (x * keep) @ weight_t + bias with sparse_linear_ref's mask; the magnitude
    |x * keep| @ |weight_t| + |bias| that rounding errors scale with; the kept channels per row."""
    keep = channel_scores(x, norms) >= thresholds[:, None].float()
    x64 = torch.where(keep, x.double(), 0.0)
    b64 = torch.zeros(weight_t.shape[1], dtype=torch.float64) if bias is None else bias.double()
    exact = x64 @ weight_t.double() + b64
    magnitude = x64.abs() @ weight_t.double().abs() + b64.abs()
    return exact, magnitude, keep.sum(dim=1, keepdim=True).double()


def kernel_bound(
    exact: torch.Tensor,
    magnitude: torch.Tensor,
    kept: torch.Tensor,
    dtype: torch.dtype,
    truncates: bool = False,
) -> torch.Tensor:
    """fp32 accumulation of the kept products (any order; a few more additions for the bias and
    split-K partial sums), then one rounding to `dtype` (a truncation, off by up to a whole ulp,
    where `truncates`: Triton's interpreter narrows fp32 to bf16 so, the GPU to nearest even)."""
    accumulation = (kept + 8) * 2.0**-24 * magnitude
    unit = UNIT_ROUNDOFF[dtype] * (2 if truncates else 1)
    return accumulation * (1 + unit) + unit * exact.abs() + 1e-30


def reference_bound(
    exact: torch.Tensor, magnitude: torch.Tensor, kept: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """sparse_linear_ref's own error: the matmul rounded to `dtype`, then the bias added and
    rounded again."""
    return kernel_bound(exact, magnitude, kept, dtype) + UNIT_ROUNDOFF[dtype] * magnitude


def check(
    out: torch.Tensor,
    x: torch.Tensor,
    weight_t: torch.Tensor,
    norms: torch.Tensor | None,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None,
    truncates: bool = False,
) -> None:
    """out within the kernel's rounding of the oracle, and within both roundings of
    sparse_linear_ref's result (which must itself be within its own of the oracle)."""
    assert out.dtype == x.dtype
    assert out.shape == (x.shape[0], weight_t.shape[1])
    exact, magnitude, kept = oracle(x, weight_t, norms, thresholds, bias)
    ours = kernel_bound(exact, magnitude, kept, x.dtype, truncates)
    theirs = reference_bound(exact, magnitude, kept, x.dtype)
    assert_within(out.double(), exact, ours, "kernel vs float64")
    reference = sparse_linear_ref(x, weight_t, norms, thresholds, bias).double()
    assert_within(reference, exact, theirs, "sparse_linear_ref vs float64")
    assert_within(out.double(), reference, ours + theirs, "kernel vs sparse_linear_ref")


def assert_within(out: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor, what: str):
    error = (out - reference).abs()
    assert torch.all(error <= bound), f"{what}: max error / bound {(error / bound).max():.3g}"


# ---- the CPU kernel ------------------------------------------------------------------------


@pytest.mark.usefixtures("sparse_variant")
@needs_cpu_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rule", ["wina-bias", "teal"])
def test_cpu_kernel_matches_reference(
    shape: tuple[int, int], sparsity: float, rows: int, dtype: torch.dtype, rule: str
) -> None:
    k, n = shape
    wina = rule == "wina-bias"
    args = make_case(k, n, rows, sparsity, dtype, wina=wina, with_bias=wina)
    assert uses_cpu_kernel(*args)
    check(sparse_linear_cpu(*args), *args)


@pytest.mark.usefixtures("sparse_variant")
@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cpu_kernel_every_row_count_is_batch_invariant(dtype: torch.dtype) -> None:
    """Every row count (threads splitting the rows of weight_t up to 2 rows, its columns above),
    bit for bit the rows computed one at a time (each output element is the same two FMA chains
    whatever the other rows keep), with a different sparsity per row."""
    # Large enough (in every dtype) that both threads share the work.
    x, weight_t, norms, _, bias = make_case(700, 1000, MAX_ROWS, 0.5, dtype, seed=3)
    sparsity = [0.95 * r / (MAX_ROWS - 1) for r in range(MAX_ROWS)]
    scores = channel_scores(x, norms)
    thresholds = torch.stack(
        [
            top_k_thresholds(scores[r : r + 1], round((1 - s) * 700))[0]
            for r, s in enumerate(sparsity)
        ]
    )
    alone = torch.cat(
        [
            sparse_linear_cpu(x[r : r + 1], weight_t, norms, thresholds[r : r + 1], bias)
            for r in range(MAX_ROWS)
        ]
    )
    check(alone, x, weight_t, norms, thresholds, bias)
    for rows in range(1, MAX_ROWS + 1):
        out = sparse_linear_cpu(x[:rows], weight_t, norms, thresholds[:rows], bias)
        assert torch.equal(out, alone[:rows]), f"{rows} rows"
    order = torch.randperm(MAX_ROWS, generator=torch.Generator().manual_seed(4))
    assert torch.equal(
        sparse_linear_cpu(x[order], weight_t, norms, thresholds[order], bias), alone[order]
    )


@pytest.mark.usefixtures("sparse_variant")
@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cpu_kernel_result_does_not_depend_on_thread_count(dtype: torch.dtype) -> None:
    """One thread runs both halves of K, two one each, three leave one idle, four split the
    columns too: the same bits (N not a multiple of the 32-column groups)."""
    args = make_case(896, 4001, 3, 0.4, dtype, seed=5)
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2, 3, 4):
            torch.set_num_threads(count)
            outs.append(sparse_linear_cpu(*args))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    check(outs[0], *args)


@pytest.mark.usefixtures("sparse_variant")
@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cpu_kernel_at_sparsity_zero_is_the_dense_layer(dtype: torch.dtype) -> None:
    for thresholds in (torch.full((4,), -torch.inf), torch.zeros(4)):  # |x| >= 0: all kept
        x, weight_t, norms, _, bias = make_case(896, 1152, 4, 0.0, dtype, seed=6)
        out = sparse_linear_cpu(x, weight_t, norms, thresholds, bias)
        dense = F.linear(x, weight_t.T, bias).double()
        exact, magnitude, kept = oracle(x, weight_t, norms, thresholds, bias)
        assert torch.all(kept == 896)
        bound = kernel_bound(exact, magnitude, kept, dtype)
        assert_within(out.double(), exact, bound, "kernel vs float64")
        assert_within(out.double(), dense, 2 * bound + UNIT_ROUNDOFF[dtype] * magnitude, "F.linear")


@pytest.mark.usefixtures("sparse_variant")
@needs_cpu_kernel
def test_cpu_kernel_reads_only_kept_rows() -> None:
    """Rows of weight_t that no row keeps are NaN: a kernel that read (and multiplied by zero)
    any of them would return NaNs."""
    x, weight_t, norms, thresholds, bias = make_case(500, 300, 3, 0.7, torch.bfloat16, seed=7)
    union = (channel_scores(x, norms) >= thresholds[:, None]).any(dim=0)
    assert 0 < union.sum() < 500
    poisoned = weight_t.clone()
    poisoned[~union] = torch.nan
    out = sparse_linear_cpu(x, poisoned, norms, thresholds, bias)
    assert torch.equal(out, sparse_linear_cpu(x, weight_t, norms, thresholds, bias))
    check(out, x, weight_t, norms, thresholds, bias)
    # The kernel reports how many rows it streamed: the union of the kept channels.
    kernel = sparse._load_kernel(torch.bfloat16)
    fresh = torch.empty(3, 300, dtype=torch.bfloat16)
    ptrs = (x.data_ptr(), x.stride(0), weight_t.data_ptr(), norms.data_ptr(), thresholds.data_ptr())
    kept = kernel(*ptrs, bias.data_ptr(), fresh.data_ptr(), 3, 300, 500, 1)
    assert kept == union.sum()
    assert torch.equal(fresh, out)


@needs_cpu_kernel
@pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="this CPU has no VDPBF16PS")
def test_bf16_pair_products_equal_the_fma_chain_bit_for_bit() -> None:
    """bf16 runs VDPBF16PS on pairs of kept rows where the CPU has it: two products per
    instruction, rounded one after the other as two FMAs in entry order round them. The build
    without it (one FMA per product, for other CPUs) must give the same bits."""
    with_pairs = sparse._build_kernel(torch.bfloat16, dot_pairs=True, isa="avx512")
    with_fmas = sparse._build_kernel(torch.bfloat16, dot_pairs=False, isa="avx512")
    assert with_pairs is not None and with_fmas is not None and with_pairs is not with_fmas
    for k, n in [(77, 33), (896, 1152), (1000, 700)]:
        for rows, sparsity in [(1, 0.0), (2, 0.5), (5, 0.3), (16, 0.9), (3, 1.0)]:
            x, weight_t, norms, thresholds, bias = make_case(k, n, rows, sparsity, torch.bfloat16)
            outs = []
            for kernel in (with_pairs, with_fmas):
                out = torch.empty(rows, n, dtype=torch.bfloat16)
                kernel(
                    x.data_ptr(),
                    x.stride(0),
                    weight_t.data_ptr(),
                    norms.data_ptr(),
                    thresholds.data_ptr(),
                    bias.data_ptr(),
                    out.data_ptr(),
                    rows,
                    n,
                    k,
                    2,
                )
                outs.append(out)
            assert torch.equal(*outs), (k, n, rows, sparsity)
            check(outs[0], x, weight_t, norms, thresholds, bias)


@pytest.mark.skipif(
    set(sparse.variants()) != {"avx512", "avx2"}, reason="this CPU cannot run both variants"
)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_avx2_variant_equals_the_avx512_fmas_bit_for_bit(dtype: torch.dtype) -> None:
    """The AVX2 kernel does the AVX-512 kernel's FMAs (its FMA build for bf16) in the same
    order on narrower vectors: the same bits and the same count of streamed rows, at partial
    slices and groups of columns, partial 8- and 16-channel steps, every row-block path (1-16
    rows, remainders of the 4-row blocks), both thread splits; and the same top-k thresholds."""
    kernels = [sparse._build_kernel(dtype, isa="avx512", dot_pairs=False)]
    kernels.append(sparse._build_kernel(dtype, isa="avx2"))
    assert kernels[0] is not None and kernels[1] is not None
    for k, n in [(77, 33), (13, 7), (300, 50), (896, 1152), (1000, 700)]:
        for rows, sparsity in [(1, 0.0), (1, 0.5), (2, 0.7), (3, 0.3), (6, 0.5), (16, 0.9)]:
            x, weight_t, norms, thresholds, bias = make_case(k, n, rows, sparsity, dtype, seed=k)
            outs, counts = [], []
            for kernel in kernels:
                out = torch.empty(rows, n, dtype=dtype)
                ptrs = (x.data_ptr(), k, weight_t.data_ptr(), norms.data_ptr())
                counts.append(
                    kernel(*ptrs, thresholds.data_ptr(), bias.data_ptr(), out.data_ptr(), rows,
                           n, k, 2)
                )  # fmt: skip
                outs.append(out)
            assert torch.equal(*outs) and counts[0] == counts[1], (k, n, rows, sparsity)
            if sparsity == 0.3:
                check(outs[1], x, weight_t, norms, thresholds, bias)
            found = []
            for kernel in kernels:
                found.append(torch.empty(rows))
                keep = max(1, round((1 - sparsity) * k) - 1)
                kernel.__self__.top_k_thresholds(
                    x.data_ptr(), k, norms.data_ptr(), found[-1].data_ptr(), rows, k, keep
                )
            assert torch.equal(*found), (k, rows, sparsity)


@pytest.mark.usefixtures("sparse_variant")
@needs_cpu_kernel
def test_cpu_kernel_input_variants() -> None:
    """Strided rows of x, one threshold for all rows, thresholds and norms in other dtypes: the
    same as the reference."""
    x, weight_t, norms, thresholds, bias = make_case(200, 130, 5, 0.5, torch.bfloat16, seed=8)
    wide = torch.cat([x, x], dim=1)[:, :200]
    assert not wide.is_contiguous() and uses_cpu_kernel(wide, weight_t, norms, thresholds, bias)
    assert torch.equal(
        sparse_linear_cpu(wide, weight_t, norms, thresholds, bias),
        sparse_linear_cpu(x, weight_t, norms, thresholds, bias),
    )
    one = thresholds[2:3]
    assert uses_cpu_kernel(x, weight_t, norms, one)
    check(sparse_linear_cpu(x, weight_t, norms, one), x, weight_t, norms, one.expand(5), None)
    half_norms, double_thresholds = norms.half(), thresholds.double()
    out = sparse_linear_cpu(x, weight_t, half_norms, double_thresholds, bias)
    check(out, x, weight_t, half_norms, double_thresholds, bias)
    columns = x.T.contiguous().T  # unit stride between rows, not between elements
    check(
        sparse_linear_cpu(columns, weight_t, None, thresholds), x, weight_t, None, thresholds, None
    )


@pytest.mark.usefixtures("sparse_variant")
@needs_cpu_kernel
def test_cpu_kernel_special_values() -> None:
    """An infinite x in a kept channel gives what the reference gives; a NaN in x never has a
    score that reaches a threshold, so it is dropped (where the reference's 0 * NaN is NaN)."""
    x, weight_t, _, thresholds, _ = make_case(64, 40, 2, 0.5, torch.float32, wina=False, seed=9)
    x[0, 3] = torch.inf
    x[1, 5] = torch.nan
    thresholds = top_k_thresholds(channel_scores(x, None), 32)
    out = sparse_linear_cpu(x, weight_t, None, thresholds)
    reference = sparse_linear_ref(x, weight_t, None, thresholds)
    assert torch.equal(out[0].isinf(), reference[0].isinf())
    assert torch.equal(out[0].isnan(), reference[0].isnan())
    assert reference[1].isnan().all() and out[1].isfinite().all()
    clean = x[1:].clone()
    clean[0, 5] = 0.0
    check(out[1:], clean, weight_t, None, thresholds[1:], None)


@needs_cpu_kernel
def test_other_cases_go_to_the_reference() -> None:
    x, weight_t, norms, thresholds, bias = make_case(96, 64, MAX_ROWS + 1, 0.5, torch.bfloat16)
    cases = {
        "more than MAX_ROWS rows": (x, weight_t, norms, thresholds, bias),
        "weight_t not contiguous": (x[:2], weight_t.T.contiguous().T, norms, thresholds[:2], bias),
        "bias in fp32": (x[:2], weight_t, norms, thresholds[:2], bias.float()),
        "rows with leading dimensions": (x[None, :2], weight_t, norms, thresholds[:2], bias),
    }
    for name, args in cases.items():
        assert not uses_cpu_kernel(*args), name
        assert torch.equal(sparse_linear_cpu(*args), sparse_linear_ref(*args)), name
        assert torch.equal(sparse_linear(*args), sparse_linear_ref(*args)), name
    with pytest.raises(RuntimeError):  # as the reference: no implicit dtype conversion
        sparse_linear(x[:2].float(), weight_t, norms, thresholds[:2])
    assert not sparse.cpu_kernel_available(torch.float64)
    # Autograd: the reference, which backpropagates.
    weight = weight_t.float().requires_grad_()
    out = sparse_linear(x[:2].float(), weight, norms, thresholds[:2])
    out.sum().backward()
    assert weight.grad is not None
    with torch.no_grad():
        assert uses_cpu_kernel(x[:2].float(), weight, norms, thresholds[:2])


@needs_cpu_kernel
def test_dispatch_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_triton(*args: object) -> None:
        raise AssertionError("Triton on CPU tensors")

    monkeypatch.setattr(sparse, "sparse_linear_triton", no_triton)
    args = make_case(128, 96, 4, 0.5, torch.bfloat16)
    assert torch.equal(sparse_linear(*args), sparse_linear_cpu(*args))
    assert not torch.equal(sparse_linear(*args), sparse_linear_ref(*args))  # rounds differently


def test_without_a_compiler_warns_once_and_uses_the_reference(tmp_path: Path) -> None:
    script = (
        "import warnings, torch\n"
        "from kernels.sparse import sparse_linear, sparse_linear_ref, cpu_kernel_available\n"
        "x, wt = torch.randn(2, 40).bfloat16(), torch.randn(40, 6).bfloat16()\n"
        "thr = torch.tensor([0.5, 1.0])\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert torch.equal(sparse_linear(x, wt, None, thr),\n"
        "                       sparse_linear_ref(x, wt, None, thr))\n"
        "    assert torch.equal(sparse_linear(x.float(), wt.float(), None, thr),\n"
        "                       sparse_linear_ref(x.float(), wt.float(), None, thr))\n"
        "assert not cpu_kernel_available(torch.bfloat16)\n"
        "print(len(caught), caught[0].message)\n"
    )
    env = {**os.environ, "PATH": str(tmp_path), "TANDEM_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    count, message = result.stdout.strip().split(" ", 1)
    assert count == "1"
    # On a CPU without the kernel's instructions that is what the one warning says.
    lacking = not sparse.variants()
    assert ("neither" if lacking else "not found") in message, message


# ---- the Triton kernel -----------------------------------------------------------------------


def check_interpreted(out: torch.Tensor, *args: torch.Tensor | None) -> None:
    check(out, *args, truncates=True)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton kernels in Triton's interpreter (read when they are first launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# The interpreter runs every program in numpy (seconds for the largest shape): every sparsity,
# row count, dtype and rule on the small shapes, a selection on the Qwen-sized ones.
TRITON_CASES = [
    (shape, sparsity, rows, dtype, rule)
    for shape in [(64, 96), (77, 33)]
    for sparsity in SPARSITIES
    for rows in (1, 3, 16)
    for dtype in ("bf16", "fp32")
    for rule in ("wina-bias", "teal")
] + [
    ((896, 1152), 0.0, 16, "bf16", "wina-bias"),
    ((896, 1152), 0.25, 3, "fp32", "teal"),
    ((896, 1152), 0.5, 1, "bf16", "wina-bias"),
    ((896, 1152), 0.9, 16, "fp32", "wina-bias"),
    ((896, 1152), 1.0, 3, "bf16", "wina-bias"),
    ((4864, 896), 0.0, 1, "bf16", "wina-bias"),
    ((4864, 896), 0.5, 3, "bf16", "teal"),
    ((4864, 896), 0.9, 16, "fp32", "wina-bias"),
]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("shape", "sparsity", "rows", "dtype", "rule"),
    TRITON_CASES,
    ids=[f"{s[0]}x{s[1]}-s{p}-t{r}-{d}-{rule}" for s, p, r, d, rule in TRITON_CASES],
)
def test_triton_matches_reference(
    shape: tuple[int, int], sparsity: float, rows: int, dtype: str, rule: str
) -> None:
    k, n = shape
    wina = rule == "wina-bias"
    args = make_case(k, n, rows, sparsity, DTYPES[dtype], wina=wina, with_bias=wina)
    check_interpreted(sparse_linear_triton(*args), *args)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shares", [1, 3])
def test_triton_gpu_blocks_and_split_k(
    dtype: str, shares: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU's block sizes (the one-row kernel's for 1 row), and K split over several programs
    (the GPU path for decode-sized N) with the partial sums added by the second kernel."""
    monkeypatch.setattr(sparse, "_num_shares", lambda *_: shares)
    for rows, sparsity in [(1, 0.0), (1, 0.5), (5, 0.5), (16, 0.9)]:
        blocks = sparse.GEMV_BLOCKS if rows == 1 else sparse.GPU_BLOCKS
        monkeypatch.setattr(sparse, "INTERPRETER_BLOCKS", blocks)
        args = make_case(300, 200, rows, sparsity, DTYPES[dtype], seed=rows)
        check_interpreted(sparse_linear_triton(*args), *args)
        x, weight_t, _, thresholds, _ = args
        check_interpreted(
            sparse_linear_triton(x, weight_t, None, thresholds), x, weight_t, None, thresholds, None
        )


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("rows", [1, 3])
def test_triton_reads_only_kept_rows(rows: int) -> None:
    x, weight_t, norms, thresholds, bias = make_case(600, 200, rows, 0.7, torch.float32, seed=10)
    union = (channel_scores(x, norms) >= thresholds[:, None]).any(dim=0)
    poisoned = weight_t.clone()
    poisoned[~union] = torch.nan
    out = sparse_linear_triton(x, poisoned, norms, thresholds, bias)
    check_interpreted(out, x, weight_t, norms, thresholds, bias)


@pytest.mark.usefixtures("interpret")
def test_triton_strided_inputs_and_limits() -> None:
    x, weight_t, norms, thresholds, bias = make_case(100, 70, 4, 0.5, torch.float32, seed=11)
    columns = x.T.contiguous().T
    column_major_weight = weight_t.T.contiguous().T
    out = sparse_linear_triton(columns, column_major_weight, norms, thresholds, bias)
    check_interpreted(out, x, weight_t, norms, thresholds, bias)
    one = thresholds[1:2]
    check_interpreted(
        sparse_linear_triton(x, weight_t, norms, one), x, weight_t, norms, one.expand(4), None
    )
    with pytest.raises(ValueError, match="1 to 16 rows"):
        sparse_linear_triton(make((17, 100), torch.float32, 0), weight_t, norms, torch.zeros(17))
    with pytest.raises(ValueError, match="weight_t"):
        sparse_linear_triton(x[:, :50], weight_t, norms, thresholds)


def test_triton_kernels_compile_for_a_gpu(compile_for_h100) -> None:
    """No GPU here: compile the three kernels to SASS for an H100 (sm_90) in the serving dtype
    (bf16, with and without norms, bias and split K) and in fp32, which catches what the
    interpreter lets through (types, dot shapes, control flow)."""
    kernel, gemv, reduce = sparse._jitted(False)
    block_k, block_n = sparse.GPU_BLOCKS
    fp32 = {"norm_ptr": "fp32", "thr_ptr": "fp32", "part_ptr": "fp32"}
    for dtype, upcast, norms, split in [
        ("bf16", False, True, False),
        ("bf16", False, False, True),
        ("fp32", True, True, True),
    ]:
        constants = {
            "BLOCK_T": sparse.BLOCK_T,
            "BLOCK_K": block_k,
            "BLOCK_N": block_n,
            "HAS_NORMS": norms,
            "HAS_BIAS": not split,
            "SPLIT": split,
            "UPCAST": upcast,
            "PRECISION": "ieee" if upcast else "tf32",
        }
        compile_for_h100(kernel, constants, fp32, dtype)
        gemv_block_k, gemv_block_n = sparse.GEMV_BLOCKS
        gemv_constants = {
            "BLOCK_K": gemv_block_k,
            "BLOCK_N": gemv_block_n,
            "HAS_NORMS": norms,
            "HAS_BIAS": not split,
            "SPLIT": split,
        }
        compile_for_h100(gemv, gemv_constants, fp32, dtype)
        reduce_constants = {"BLOCK_N": sparse.REDUCE_BLOCK_N, "HAS_BIAS": True}
        compile_for_h100(reduce, reduce_constants, {"part_ptr": "fp32"}, dtype)


@pytest.mark.parametrize("width", [7, 64, 896])
def test_top_k_thresholds_equal_the_reference(width: int) -> None:
    generator = torch.Generator().manual_seed(width)
    scores = torch.rand(5, width, generator=generator)
    scores[0, : width // 2] = 0.5  # ties
    for keep in range(0, width + 1, max(1, width // 9)):
        assert torch.equal(top_k_thresholds(scores, keep), top_k_thresholds_ref(scores, keep))


@pytest.mark.usefixtures("sparse_variant")
@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_input_top_k_thresholds_equal_the_reference_bit_for_bit(dtype: torch.dtype) -> None:
    """The C selection against torch.topk over the float32 scores: random widths, row counts,
    keeps; WINA and TEAL; ties, zeros, infinities and NaN (torch's min over a top-k holding a
    NaN is NaN); strided rows."""
    generator = torch.Generator().manual_seed(0)
    assert sparse._top_k_kernel(torch.zeros(1, 8, dtype=dtype), None, 4) is not None
    for trial in range(120):
        rows = int(torch.randint(1, MAX_ROWS + 1, (1,), generator=generator))
        width = int(torch.randint(2, 5000, (1,), generator=generator))
        x = (torch.randn(rows, width + 3, generator=generator) * 3).to(dtype)[:, 3:]  # strided
        if trial % 3 == 0:
            x[:, : width // 3] = 0
        if trial % 4 == 0:
            x = x.round()  # many ties
        if trial % 5 == 0:
            x[0, 0], x[-1, -1] = float("nan"), float("inf")
        norms = None if trial % 2 else torch.rand(width, generator=generator) * 2
        keep = int(torch.randint(1, width, (1,), generator=generator))
        got = input_top_k_thresholds(x, norms, keep)
        expected = top_k_thresholds_ref(channel_scores(x, norms), keep)
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()), (trial, rows, width, keep)


def test_input_top_k_thresholds_outside_the_kernel() -> None:
    """More rows than the kernel takes, keeps of none or all, autograd: the composed path."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(MAX_ROWS + 1, 300, generator=generator)
    norms = torch.rand(300, generator=generator)
    for keep in (0, 7, 300):
        expected = top_k_thresholds_ref(channel_scores(x, norms), keep)
        assert torch.equal(input_top_k_thresholds(x, norms, keep), expected)
    leaf = x[:2].clone().requires_grad_()
    assert sparse._top_k_kernel(leaf, norms, 7) is None
    with torch.no_grad():
        expected = top_k_thresholds_ref(channel_scores(leaf, norms), 7)
    assert torch.equal(input_top_k_thresholds(leaf, norms, 7).detach(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channel_scores_are_the_float32_products(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, generator=generator).to(dtype)
    norms = torch.rand(50, generator=generator) + 0.5
    for col in (norms, None):
        expected = x.float().abs() if col is None else x.float().abs() * col
        assert torch.equal(channel_scores(x, col), expected)
        assert channel_scores(x, col).dtype == torch.float32
