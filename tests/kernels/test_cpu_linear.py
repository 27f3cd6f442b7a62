"""kernels.cpu_linear against a float64 reference, plus batch invariance and the fallbacks."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kernels.build import BuildError, build_shared_library, cpu_flags
from kernels.cpu_linear import (
    MAX_ROWS,
    current_variant,
    kernel_available,
    linear,
    linear_add_,
    set_variant,
    uses_fast_path,
    variants,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.bfloat16, torch.float32]
KERNELS = [
    (torch.bfloat16, "amx"),
    (torch.bfloat16, "avx512"),
    (torch.bfloat16, "avx2"),
    (torch.float32, "avx512"),
    (torch.float32, "avx2"),
]
# (N, K): K below, at and between multiples of the 32-wide (bf16) and 16-wide (fp32) chunks,
# odd K; N below 16 (AMX hands those to AVX-512), a whole tile, not a multiple of the 16-row
# tile nor of the 1, 2 or 4 rows an AVX-512 block holds.
SHAPES = [(1, 1), (7, 5), (16, 32), (33, 77), (64, 896), (130, 1000), (5, 4864), (250, 33)]


# Every kernel needs AVX2 and FMA (the other variants skip where the CPU lacks theirs).
MISSING_CPU_FLAGS = sorted({"avx2", "fma"} - cpu_flags())
needs_fast_kernels = pytest.mark.skipif(
    bool(MISSING_CPU_FLAGS), reason=f"this CPU lacks {MISSING_CPU_FLAGS}: no fast kernels"
)


@contextmanager
def running(dtype: torch.dtype, variant: str) -> Iterator[None]:
    if variant not in variants(dtype):
        pytest.skip(f"this CPU cannot run the {variant} kernel")
    default = variants(dtype)[0]
    set_variant(dtype, variant)
    try:
        yield
    finally:
        set_variant(dtype, default)


@pytest.fixture(params=KERNELS, ids=lambda kernel: f"{str(kernel[0])[6:]}-{kernel[1]}")
def kernel_dtype(request: pytest.FixtureRequest) -> Iterator[torch.dtype]:
    """Each kernel variant in turn; the test gets the weight dtype it computes."""
    dtype, variant = request.param
    with running(dtype, variant):
        yield dtype


@pytest.fixture(params=["amx", "avx512", "avx2"])
def bf16_variant(request: pytest.FixtureRequest) -> Iterator[None]:
    with running(torch.bfloat16, request.param):
        yield


def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def reference_and_bound(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 x @ weight.T + bias, and the largest error allowed: fp32 accumulation over K
    terms plus the final rounding to x's dtype."""
    x64, w64 = x.double(), weight.double()
    b64 = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    reference = x64 @ w64.T + b64
    magnitude = x64.abs() @ w64.abs().T + b64.abs()
    unit_roundoff = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-24
    bound = (weight.shape[1] + 1) * 2.0**-24 * magnitude + unit_roundoff * reference.abs()
    return reference, bound + 1e-30


def assert_close_to_reference(
    out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    reference, bound = reference_and_bound(x, weight, bias)
    assert_within(out, reference, bound)
    assert out.dtype == x.dtype


def assert_within(out: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> None:
    assert out.shape == reference.shape
    error = (out.double() - reference).abs()
    assert torch.all(error <= bound), f"max error / bound = {(error / bound).max().item():.3g}"


@needs_fast_kernels
def test_kernels_build_and_load() -> None:
    """Every variant this CPU can run builds and loads (a failed build would only warn)."""
    assert all(kernel_available(dtype) for dtype in DTYPES)
    flags = cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl"}.issubset(flags)
    amx = {"amx_tile", "amx_bf16"}.issubset(flags)
    assert variants(torch.float32) == (("avx512",) if avx512 else ()) + ("avx2",)
    assert variants(torch.bfloat16) == (
        (("amx",) if amx else ()) + (("avx512",) if avx512 and "avx512_bf16" in flags else ())
    ) + ("avx2",)


@needs_fast_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_current_variant_names_the_kernel_linear_runs(dtype: torch.dtype) -> None:
    """Whichever variant is set, current_variant names it (engine logs report it), and the
    default is the first of variants()."""
    assert current_variant(dtype) == variants(dtype)[0]
    for variant in variants(dtype):
        with running(dtype, variant):
            assert current_variant(dtype) == variant
    assert current_variant(torch.float64) is None  # torch's F.linear


@needs_fast_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference_for_every_batch_size(
    kernel_dtype: torch.dtype, shape: tuple[int, int], with_bias: bool
) -> None:
    n, k = shape
    weight = make((n, k), kernel_dtype, seed=1)
    bias = make((n,), kernel_dtype, seed=2) if with_bias else None
    x = make((MAX_ROWS, k), kernel_dtype, seed=3)
    reference, bound = reference_and_bound(x, weight, bias)
    for m in range(1, MAX_ROWS + 1):
        assert uses_fast_path(x[:m], weight, bias)
        out = linear(x[:m], weight, bias)
        assert out.dtype == kernel_dtype
        assert_within(out, reference[:m], bound[:m])


@needs_fast_kernels
@pytest.mark.usefixtures("bf16_variant")
def test_bf16_output_rounds_half_to_even_like_torch() -> None:
    # x = [1, 1] makes each output the fp32 sum w[n, 0] + w[n, 1], which is exact here; the
    # kernel's only rounding is then fp32 -> bf16, which must match torch's on exact ties too.
    generator = torch.Generator().manual_seed(25)
    big = 1 + torch.randint(0, 128, (512,), generator=generator) / 128  # bf16 spacing 2^-7
    small = torch.randint(-4, 5, (512,), generator=generator) / 1024  # ties at odd multiples
    weight = torch.stack([big, small], dim=1).bfloat16()
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    exact = (weight.double().sum(dim=1)).float()
    assert torch.equal(linear(x, weight)[0], exact.bfloat16())
    ties = exact.bfloat16().float() != exact
    assert ties.sum() > 100  # most rows really do need rounding


@needs_fast_kernels
def test_infinities_and_nans_propagate(kernel_dtype: torch.dtype) -> None:
    weight = make((20, 40), kernel_dtype, seed=26).abs()
    weight[1, 3] = float("nan")
    weight[2, 39] = float("inf")  # in the partial last chunk of K
    weight[19, 0] = float("-inf")  # in the shifted last tile of AMX
    x = make((2, 40), kernel_dtype, seed=27).abs() + 0.5
    out = linear(x, weight)
    reference = x.double() @ weight.double().T
    assert torch.equal(out.isnan(), reference.isnan())
    assert torch.equal(out.isinf() & (out > 0), reference.isinf() & (reference > 0))
    assert torch.equal(out.isinf() & (out < 0), reference.isinf() & (reference < 0))


@needs_fast_kernels
@pytest.mark.parametrize("k", [1000, 512])  # 512: M = 1 takes short rows four a block on AMD
def test_batch_invariance_is_bit_exact(kernel_dtype: torch.dtype, k: int) -> None:
    # Large enough that both threads share the work, and that a change in the order of an fp32
    # sum shows through bf16's rounding in a few outputs (with 301 rows, none did); odd, so the
    # last block is partial.
    weight = make((3001, k), kernel_dtype, seed=4)
    bias = make((3001,), kernel_dtype, seed=5)
    batch = make((MAX_ROWS, k), kernel_dtype, seed=6)
    alone = torch.cat([linear(batch[r : r + 1], weight, bias) for r in range(MAX_ROWS)])
    for m in range(2, MAX_ROWS + 1):
        assert torch.equal(linear(batch[:m], weight, bias), alone[:m]), f"batch of {m}"
    # Same rows in another order and next to other rows.
    order = torch.randperm(MAX_ROWS, generator=torch.Generator().manual_seed(7))
    assert torch.equal(linear(batch[order], weight, bias), alone[order])


@needs_fast_kernels
def test_batch_invariance_where_weight_rows_are_4kb(kernel_dtype: torch.dtype) -> None:
    # bf16 weight rows of 4 KB and multiples (K = 2048, 4096) take another grouping of eight
    # input rows on AVX-512: each output still equals its row computed alone, bit for bit (fp32
    # rows of 4 KB, which keep the usual grouping, are checked the same way).
    k = 4096 // kernel_dtype.itemsize
    for n, width in ((301, k), (67, 2 * k)):
        weight = make((n, width), kernel_dtype, seed=n)
        bias = make((n,), kernel_dtype, seed=n + 1)
        batch = make((MAX_ROWS, width), kernel_dtype, seed=n + 2)
        alone = torch.cat([linear(batch[r : r + 1], weight, bias) for r in range(MAX_ROWS)])
        for m in (7, 8, 9, MAX_ROWS):
            out = linear(batch[:m], weight, bias)
            assert torch.equal(out, alone[:m]), f"batch of {m}, K = {width}"
            assert_close_to_reference(out, batch[:m], weight, bias)


@needs_fast_kernels
def test_result_does_not_depend_on_thread_count(kernel_dtype: torch.dtype) -> None:
    weight = make((1000, 896), kernel_dtype, seed=8)
    x = make((3, 896), kernel_dtype, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = linear(x, weight)
        torch.set_num_threads(2)
        double = linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, double)


@needs_fast_kernels
def test_leading_dimensions_are_kept(kernel_dtype: torch.dtype) -> None:
    weight = make((50, 70), kernel_dtype, seed=10)
    bias = make((50,), kernel_dtype, seed=11)
    x3 = make((2, 3, 70), kernel_dtype, seed=12)
    out3 = linear(x3, weight, bias)
    assert out3.shape == (2, 3, 50)
    assert_close_to_reference(out3, x3, weight, bias)
    x1 = x3[0, 0]
    out1 = linear(x1, weight, bias)
    assert out1.shape == (50,)
    assert torch.equal(out1, out3[0, 0])


@needs_fast_kernels
def test_non_contiguous_inputs(kernel_dtype: torch.dtype) -> None:
    weight = make((40, 96), kernel_dtype, seed=13)
    wide = make((6, 300), kernel_dtype, seed=14)
    views = {
        "rows 300 apart": wide[:, :96],
        "elements 3 apart": wide[:, ::3][:, :96],
        "column-major": wide[:, :96].T.contiguous().T,
    }
    for name, x in views.items():
        assert not x.is_contiguous(), name
        out = linear(x, weight)
        assert torch.equal(out, linear(x.contiguous(), weight)), name
        assert_close_to_reference(out, x, weight, None)


@needs_fast_kernels
@needs_fast_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_add_equals_adding_the_linear_bit_for_bit(
    kernel_dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    """Into a column slice of a wider matrix (strided rows), for every batch size: the same bits
    as out.add_(linear(x, w)), whose product is itself checked against float64 above. Blocks
    whose last rows repeat (N not a multiple of the block) must not add those rows twice."""
    n, k = shape
    weight = make((n, k), kernel_dtype, seed=n)
    for m in range(1, MAX_ROWS + 1):
        x = make((m, k), kernel_dtype, seed=m)
        wide = make((m, n + 7), kernel_dtype, seed=m + 100)
        expected = wide.clone()
        expected[:, 3 : 3 + n].add_(linear(x, weight))
        assert uses_fast_path(x, weight)
        linear_add_(wide[:, 3 : 3 + n], x, weight)
        assert torch.equal(wide, expected), (m, n, k)


@needs_fast_kernels
def test_linear_add_takes_torchs_path_for_what_the_kernel_does_not() -> None:
    weight = make((40, 64), torch.bfloat16, seed=1)
    x = make((3, 64), torch.bfloat16, seed=2)
    out = make((3, 40), torch.bfloat16, seed=3)
    expected = out.clone().add_(linear(x, weight))
    linear_add_(out, x, weight)
    assert torch.equal(out, expected)
    # float32 out for bf16 weights, a transposed out, and an out that is x itself.
    out32 = make((3, 40), torch.float32, seed=4)
    assert torch.equal(linear_add_(out32.clone(), x, weight), out32 + linear(x, weight).float())
    out_t = make((40, 3), torch.bfloat16, seed=5).t()
    assert torch.equal(linear_add_(out_t.clone(), x, weight), out_t.clone().add_(linear(x, weight)))
    square = make((64, 64), torch.bfloat16, seed=6)
    rows = make((3, 64), torch.bfloat16, seed=7)
    expected = rows.clone().add_(linear(rows, square))
    assert torch.equal(linear_add_(rows, rows, square), expected)


@pytest.mark.parametrize("m", [MAX_ROWS + 1, 64])
def test_large_batches_fall_back_to_torch(m: int) -> None:
    weight = make((48, 64), torch.bfloat16, seed=15)
    bias = make((48,), torch.bfloat16, seed=16)
    x = make((m, 64), torch.bfloat16, seed=17)
    assert not uses_fast_path(x, weight, bias)
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))


@needs_fast_kernels
def test_other_dtypes_and_mismatches_behave_like_torch() -> None:
    weight = make((8, 24), torch.float16, seed=18)
    x = make((2, 24), torch.float16, seed=19)
    assert not uses_fast_path(x, weight)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    with pytest.raises(RuntimeError):
        linear(x.float(), weight.bfloat16())
    with pytest.raises(RuntimeError):
        linear(make((2, 23), torch.bfloat16, seed=20), weight.bfloat16())


@needs_fast_kernels
def test_autograd_falls_back_and_backpropagates() -> None:
    weight = make((8, 24), torch.float32, seed=21).requires_grad_()
    x = make((2, 24), torch.float32, seed=22)
    assert not uses_fast_path(x, weight)
    linear(x, weight).sum().backward()
    assert torch.allclose(weight.grad, x.sum(0).expand(8, 24))
    with torch.no_grad():
        assert uses_fast_path(x, weight)


@needs_fast_kernels
@pytest.mark.usefixtures("bf16_variant")
def test_interleaves_with_torch_amx_matmuls() -> None:
    # On AMX machines torch's bf16 matmuls run oneDNN AMX kernels with their own tile
    # configuration, on the same OpenMP threads; neither may disturb the other.
    weight = make((600, 500), torch.bfloat16, seed=28)  # 600 KB: both threads
    x = make((5, 500), torch.bfloat16, seed=29)
    a, b = make((256, 256), torch.bfloat16, seed=30), make((256, 256), torch.bfloat16, seed=31)
    ours, theirs = linear(x, weight), torch.mm(a, b)
    for _ in range(3):
        assert torch.equal(torch.mm(a, b), theirs)
        assert torch.equal(linear(x, weight), ours)


@needs_fast_kernels
def test_shares_torchs_openmp_runtime() -> None:
    # Two OpenMP runtimes would mean two thread pools spinning against each other on 2 cores.
    # Checked in a fresh process: other wheels (sentencepiece) bring their own libgomp copy,
    # which is not what this test is about.
    probe = (
        "import torch\n"
        "from pathlib import Path\n"
        "from kernels.cpu_linear import linear\n"
        "linear(torch.ones(1, 8, dtype=torch.bfloat16), torch.ones(4, 8, dtype=torch.bfloat16))\n"
        "maps = Path('/proc/self/maps').read_text().splitlines()\n"
        "print(sorted({l.split()[-1] for l in maps if 'libgomp' in l or 'libiomp' in l}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    runtimes = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert len(runtimes) == 1, runtimes


def test_build_cache_is_keyed_by_source_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    first = build_shared_library(source, ["-O1"])
    assert first.parent == tmp_path / "cache" / "kernels"
    assert build_shared_library(source, ["-O1"]) == first
    assert build_shared_library(source, ["-O2"]) != first
    source.write_text("int answer(void) { return 43; }\n")
    assert build_shared_library(source, ["-O1"]) != first
    # Only finished libraries are left behind, no temporary files.
    assert sorted(p.suffix for p in first.parent.iterdir()) == [".so"] * 3
    assert not any(p.name.startswith(".") for p in first.parent.iterdir())
    source.write_text("int answer(void) { return }\n")
    with pytest.raises(BuildError):
        build_shared_library(source, ["-O1"])


def test_without_a_compiler_warns_once_and_uses_torch(tmp_path: Path) -> None:
    script = (
        "import warnings, torch\n"
        "from torch.nn import functional as F\n"
        "from kernels.cpu_linear import linear, kernel_available\n"
        "x, w = torch.randn(2, 40).bfloat16(), torch.randn(6, 40).bfloat16()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert torch.equal(linear(x, w), F.linear(x, w))\n"
        "    assert torch.equal(linear(x, w), F.linear(x, w))\n"
        "assert not kernel_available(torch.bfloat16)\n"
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
    assert "not found" in message
