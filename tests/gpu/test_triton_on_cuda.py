"""The Triton kernels compiled and run on a CUDA GPU, against float64 oracles computed on the CPU.

tests/kernels runs the same kernels in Triton's interpreter on every machine; only a GPU shows
what the compiled code does: its block sizes, K and vocabulary split over every SM, 16-bit
tensor-core products, the device's own log and exp. Without a GPU every test here is skipped
(the reason is printed); on one: `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.fusion import (
    dynamic_costs_ref,
    fuse_dynamic,
    fuse_dynamic_naive,
    fuse_static,
    fuse_static_ref,
    sorted_grid,
)
from kernels.gumbel import gumbel_topk_ref, gumbel_topk_triton
from kernels.lora import LoraMapping, LoraStack, lora_apply
from kernels.sparse import MAX_ROWS, channel_scores, sparse_linear, top_k_thresholds

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (tests/kernels runs them interpreted)"
)

CUDA = torch.device("cuda")
INF = math.inf
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def on_cuda(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(CUDA) for t in tensors]


# ---- sparse activation ----------------------------------------------------------------------

# (K, N): Qwen2.5-0.5B's projections (qkv, o, gate_up, down), Llama-3-8B's gate_up, and sizes
# that are multiples of no block.
SPARSE_SHAPES = [(896, 1152), (896, 896), (896, 9728), (4864, 896), (4096, 28672), (77, 33)]


@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 5, MAX_ROWS])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ["wina-bias", "teal"])
def test_sparse_linear(shape: tuple, rows: int, sparsity: float, dtype: str, rule: str) -> None:
    """Within fp32 accumulation of the kept products plus one rounding of the exact result."""
    (k, n), torch_dtype, wina = shape, DTYPES[dtype], rule == "wina-bias"
    weight = randn(n, k, seed=k + n).to(torch_dtype)
    weight_t = weight.T.contiguous()
    norms = weight.float().norm(dim=0) if wina else None
    x = randn(rows, k, seed=rows).to(torch_dtype)
    bias = randn(n, seed=1).to(torch_dtype) if wina else None
    thresholds = top_k_thresholds(channel_scores(x, norms), round((1 - sparsity) * k))

    out = sparse_linear(*on_cuda(x, weight_t, norms, thresholds, bias)).cpu()

    keep = channel_scores(x, norms) >= thresholds[:, None]
    x64 = torch.where(keep, x.double(), 0.0)
    b64 = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
    exact = x64 @ weight_t.double() + b64
    magnitude = x64.abs() @ weight_t.double().abs() + b64.abs()
    kept = keep.sum(dim=1, keepdim=True).double()
    bound = (kept + 8) * 2.0**-24 * magnitude + UNIT_ROUNDOFF[torch_dtype] * exact.abs()
    bound = bound + torch.finfo(torch_dtype).smallest_normal
    assert out.dtype == torch_dtype and out.shape == (rows, n)
    error = (out.double() - exact).abs()
    assert torch.all(error <= bound), f"max error / bound {(error / bound).max():.3g}"


# ---- multi-LoRA -----------------------------------------------------------------------------


def lora_case(ranks: tuple, slices: tuple, k: int, runs: list, dtype: torch.dtype) -> tuple:
    a = randn(len(slices), sum(ranks), k, seed=0) / k**0.5
    b = randn(sum(width for _, width in slices), sum(ranks), seed=1)
    stack = LoraStack(a.to(dtype), b.to(dtype), slices, ranks)
    tokens = max(first + count for first, count, _ in runs)
    n = max(start + width for start, width in slices)
    return stack, randn(tokens, k, seed=2).to(dtype), randn(tokens, n, seed=3).to(dtype)


def lora_oracle(y, x, stack: LoraStack, runs: list) -> torch.Tensor:
    out = y.double().clone()
    for first, count, uses in runs:
        rows = slice(first, first + count)
        for slot, weight in uses:
            rank, column = stack.slot_ranks[slot], stack.slot_offsets[slot]
            for p, (start, width) in enumerate(stack.slices):
                a = stack.a[p, column : column + rank].double()
                b = stack.b_slices[p][:, column : column + rank].double()
                out[rows, start : start + width] += weight * (x[rows].double() @ a.T @ b.T)
    return out


# (name, slot ranks, slices, K, runs): a decode batch of 8 rows with 8 rank-16 adapters on a
# fused qkv (split-K over the 896 inputs), one with mixed ranks, a row with no adapter and a row
# with two; a prefill batch with segments longer than a 64-row tile.
QKV = ((0, 896), (896, 128), (1024, 128))
LORA_CASES = [
    ("decode-8-adapters", (16,) * 8, QKV, 896, [(i, 1, [(i, 1.0)]) for i in range(8)]),
    (
        "decode-mixed",
        (4, 0, 17, 64, 1),
        ((0, 40), (64, 24)),
        4864,
        [(0, 1, [(0, 1.0)]), (1, 1, []), (2, 1, [(2, 0.5), (3, -1.0)]), (3, 2, [(4, 1.0)])],
    ),
    (
        "prefill",
        (64, 16),
        ((0, 896),),
        896,
        [(0, 100, [(1, 1.0)]), (100, 7, []), (107, 70, [(0, 0.5)])],
    ),
]


@pytest.mark.parametrize("case", LORA_CASES, ids=[c[0] for c in LORA_CASES])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_lora(case: tuple, dtype: str) -> None:
    _, ranks, slices, k, runs = case
    stack, x, y = lora_case(ranks, slices, k, runs, DTYPES[dtype])
    oracle = lora_oracle(y, x, stack, runs)
    cuda_stack = LoraStack(stack.a.to(CUDA), stack.b.to(CUDA), slices, ranks)
    mapping = LoraMapping.build(x.shape[0], len(ranks), runs, device=CUDA)
    y_cuda = y.to(CUDA)
    out = lora_apply(y_cuda, x.to(CUDA), cuda_stack, mapping)
    assert out is y_cuda
    if dtype == "fp32":
        torch.testing.assert_close(out.cpu().double(), oracle, atol=1e-4, rtol=1e-5)
    else:  # y is rounded to bf16 once more than the oracle
        torch.testing.assert_close(out.cpu().double(), oracle, atol=0.05, rtol=0.02)
    adapted = {row for first, count, uses in runs if uses for row in range(first, first + count)}
    untouched = [row for row in range(x.shape[0]) if row not in adapted]
    assert torch.equal(out.cpu()[untouched], y[untouched])


# ---- dynamic logit fusion ---------------------------------------------------------------------


def fusion_logits(batch: int, num_experts: int, vocab: int, seed: int) -> tuple:
    """large, small, experts with the masking patterns of the convention in rows 0-3."""
    large = randn(batch, vocab, seed=seed) * 3.0
    small = randn(batch, vocab, seed=seed + 1) * 2.0
    spread = 0.3 + 1.4 * torch.rand(
        batch, num_experts, 1, generator=torch.Generator().manual_seed(seed)
    )
    experts = small.unsqueeze(1) + randn(batch, num_experts, vocab, seed=seed + 2) * spread
    large[0, :10] = small[0, :10] = experts[0, :, :10] = -INF
    large[1, 10:20] = -INF
    small[1, 20:25] = -INF
    experts[1, 0, 25:30] = -INF
    experts[2, 0] = -INF
    large[3] = -INF
    return large, small, experts


@pytest.mark.parametrize("vocab", [1000, 32768 + 7, 131072])
@pytest.mark.parametrize("num_experts", [1, 3])
def test_fusion(vocab: int, num_experts: int) -> None:
    batch = 8
    large, small, experts = fusion_logits(batch, num_experts, vocab, seed=vocab + num_experts)
    fused, index, alpha = (t.cpu() for t in fuse_dynamic(*on_cuda(large, small, experts)))
    # The chosen candidate's cost is the lowest of the float64 oracle's, up to a near tie.
    naive_fused, naive_index, naive_alpha = fuse_dynamic_naive(large, small, experts)
    costs = dynamic_costs_ref(large.double(), small.double(), experts.double())
    grid = sorted_grid()
    for row in range(batch):
        g = int(torch.argmin((grid - float(alpha[row])).abs()))
        chosen = float(costs[row, int(index[row]), g])
        assert chosen <= float(costs[row].min()) + 1e-6 * (1 + abs(chosen)), row
        if int(index[row]) == int(naive_index[row]) and float(alpha[row]) == float(
            naive_alpha[row]
        ):
            torch.testing.assert_close(
                fused[row].double(), naive_fused[row].double(), atol=1e-4, rtol=1e-5
            )
    assert torch.equal(torch.isinf(fused), torch.isinf(large))
    assert not torch.isnan(fused).any()

    alphas = torch.rand(batch, num_experts, generator=torch.Generator().manual_seed(5)) * 2
    static = fuse_static(*on_cuda(large, small, experts), alphas.to(CUDA)).cpu()
    torch.testing.assert_close(
        static, fuse_static_ref(large, small, experts, alphas), atol=1e-4, rtol=1e-5
    )


# ---- Gumbel-top-k -----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [5000, 32768, 131072])
@pytest.mark.parametrize("k", [1, 8, 32, 64, 256])
def test_gumbel_topk(vocab: int, k: int) -> None:
    """Keys equal to an ulp or two (the device's log is not the CPU's); the same ids wherever
    the keys leave no doubt about the order."""
    batch = 4
    logits = randn(batch, vocab, seed=vocab + k) * 3.0
    uniform = torch.rand(batch, vocab, generator=torch.Generator().manual_seed(k))
    uniform = uniform.clamp_min(torch.finfo(torch.float32).tiny)
    logits[1, : vocab // 2] = -INF
    logits[2] = -INF
    keys, ids = (t.cpu() for t in gumbel_topk_triton(*on_cuda(logits, uniform), k))
    keys_ref, ids_ref = gumbel_topk_ref(logits, uniform, k)
    assert ids.dtype == torch.int64 and keys.shape == ids.shape == (batch, k)
    torch.testing.assert_close(keys, keys_ref, atol=1e-5, rtol=1e-6)
    finite = torch.isfinite(keys_ref)
    # A key closer than the tolerance to its neighbours may swap places with one of them.
    gaps = torch.diff(keys_ref, dim=1).abs()
    clear = torch.ones_like(finite)
    clear[:, 1:] &= gaps > 1e-4
    clear[:, :-1] &= gaps > 1e-4
    assert torch.equal(ids[finite & clear], ids_ref[finite & clear])
    assert bool(((ids >= 0) & (ids < vocab)).all())
