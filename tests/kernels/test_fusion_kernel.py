"""kernels.fusion: the vectorised PyTorch path against the per-candidate float64 oracle, and the
Triton kernels (interpreted on CPU tensors, TRITON_INTERPRET=1) against the PyTorch path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from kernels import fusion
from kernels.fusion import (
    dynamic_costs_naive,
    dynamic_costs_ref,
    dynamic_costs_triton,
    fuse_dynamic,
    fuse_dynamic_naive,
    fuse_dynamic_ref,
    fuse_dynamic_triton,
    fuse_static,
    fuse_static_ref,
    fuse_static_triton,
    sorted_grid,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
INF = math.inf


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton kernels in Triton's interpreter (read when they are first launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_logits(
    batch: int, num_experts: int, vocab: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """large [B, V], small [B, V], experts [B, E, V]: experts near the small base, each (row,
    expert) moved by a different amount (so that the chosen experts and alphas vary), with rows
    as strided views of wider buffers (the kernels take any row stride)."""
    generator = torch.Generator().manual_seed(seed)
    large = torch.randn(batch, vocab + 5, generator=generator)[:, :vocab] * 3.0
    small = torch.randn(batch, vocab, generator=generator) * 2.0
    spread = 0.3 + 1.4 * torch.rand(batch, num_experts, 1, generator=generator)
    noise = torch.randn(batch, num_experts, vocab + 3, generator=generator)[..., :vocab]
    experts = small.unsqueeze(1) + noise * spread
    return large.to(dtype), small.to(dtype), experts.to(dtype)


def add_masks(large: torch.Tensor, small: torch.Tensor, experts: torch.Tensor) -> None:
    """-inf entries in place, every pattern of the convention (needs B >= 4, V >= 60)."""
    batch, num_experts, _ = experts.shape
    large[0, :10] = small[0, :10] = -INF  # consistently masked in all the models
    experts[0, :, :10] = -INF
    large[1, 10:20] = -INF  # only the large model
    small[1, 20:25] = -INF  # only the small base: d := 0 there
    experts[1, 0, 25:30] = -INF  # only one expert: d := 0 there
    small[1, 30:35] = -INF  # the small base and an expert
    experts[1, -1, 30:35] = -INF
    experts[2, 0] = -INF  # an expert without any finite logit: no common support
    large[3] = -INF  # a row the large model masks completely
    if num_experts > 1:
        experts[2, 1, 40:60] = -INF
    del batch


def fused_oracle(large, small, experts, alphas) -> torch.Tensor:
    """float64 a + sum_t alpha_t d_t with d_t := 0 where z_S or z_Et is not finite."""
    out = large.double().clone()
    for row in range(large.shape[0]):
        for t in range(experts.shape[1]):
            zs, ze = small[row].double(), experts[row, t].double()
            ok = torch.isfinite(zs) & torch.isfinite(ze)
            d = torch.where(ok, ze - zs, torch.zeros_like(zs))
            out[row] += float(alphas[row, t]) * d
    return out


def assert_same_choice(choice, other, oracle_costs: torch.Tensor, values: torch.Tensor) -> None:
    """Same (expert, alpha) per row, except where the oracle says the two are a near tie."""
    (index, alpha), (index2, alpha2) = choice, other
    for row in range(index.shape[0]):
        if int(index[row]) == int(index2[row]) and float(alpha[row]) == float(alpha2[row]):
            continue
        g = int(torch.argmin((values - float(alpha[row])).abs()))
        g2 = int(torch.argmin((values - float(alpha2[row])).abs()))
        c, c2 = oracle_costs[row, int(index[row]), g], oracle_costs[row, int(index2[row]), g2]
        assert abs(float(c - c2)) <= 1e-6 * (1 + abs(float(c))), (row, choice, other)


# (name, B, E, V, masked rows)
CASES = [
    ("b1-e1", 1, 1, 1000, False),
    ("b4-e2-masked", 4, 2, 1000, True),
    ("b5-e3", 5, 3, 333, False),
    ("b6-e3-masked", 6, 3, 257, True),
]
IDS = [case[0] for case in CASES]


def case_logits(case: tuple, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple:
    _, batch, num_experts, vocab, masked = case
    large, small, experts = make_logits(batch, num_experts, vocab, seed, dtype)
    if masked:
        add_masks(large, small, experts)
    return large, small, experts


def check_no_nan(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        assert not torch.isnan(tensor).any()


# ---------------------------------------------------------------------------------------------
# Static mode


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_static_reference_against_float64(case: tuple) -> None:
    large, small, experts = case_logits(case)
    batch, num_experts = experts.shape[:2]
    alphas = torch.rand(batch, num_experts, generator=torch.Generator().manual_seed(3)) * 2
    alphas[0, 0] = 0.0
    out = fuse_static_ref(large, small, experts, alphas)
    assert out.dtype == large.dtype and out.shape == large.shape
    oracle = fused_oracle(large, small, experts, alphas)
    torch.testing.assert_close(out.double(), oracle, atol=1e-4, rtol=1e-5)
    check_no_nan(out)
    # The large model's mask stays; shared alphas [E] broadcast over the rows.
    assert torch.equal(torch.isinf(out), torch.isinf(large))
    shared = fuse_static_ref(large, small, experts, alphas[0])
    per_row = fuse_static_ref(large, small, experts, alphas[:1].expand_as(alphas))
    torch.testing.assert_close(shared, per_row)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_static_triton_equals_reference(case: tuple, dtype: torch.dtype) -> None:
    large, small, experts = case_logits(case, dtype)
    batch, num_experts = experts.shape[:2]
    alphas = torch.rand(batch, num_experts, generator=torch.Generator().manual_seed(4)) * 2
    alphas[-1] = 0.0  # a row that no expert moves: large, bit for bit
    out = fuse_static_triton(large, small, experts, alphas)
    reference = fuse_static_ref(large, small, experts, alphas)
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, reference, atol=tolerance, rtol=tolerance)
    assert torch.equal(out[-1], large[-1])
    check_no_nan(out)


# ---------------------------------------------------------------------------------------------
# Dynamic mode: the PyTorch path against the oracle


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dynamic_reference_equals_naive_in_float64(case: tuple) -> None:
    large, small, experts = case_logits(case, torch.float64, seed=1)
    values = sorted_grid()
    oracle = dynamic_costs_naive(large, small, experts)
    costs = dynamic_costs_ref(large, small, experts)
    assert costs.shape == (*experts.shape[:2], 21)
    torch.testing.assert_close(costs, oracle, atol=1e-9, rtol=1e-9)
    fused, index, alpha = fuse_dynamic_ref(large, small, experts)
    fused_n, index_n, alpha_n = fuse_dynamic_naive(large, small, experts)
    assert index.dtype == torch.int64 and index.shape == (large.shape[0],)
    assert torch.equal(index, index_n) and torch.equal(alpha, alpha_n)
    torch.testing.assert_close(fused, fused_n, atol=1e-12, rtol=1e-12)
    # fused = a + alpha* d_t* and the choice is the oracle's minimum.
    one_hot = torch.zeros(experts.shape[:2], dtype=torch.float64)
    one_hot[torch.arange(len(index)), index] = alpha
    torch.testing.assert_close(fused, fused_oracle(large, small, experts, one_hot))
    chosen = oracle[torch.arange(len(index)), index, torch.searchsorted(values, alpha)]
    assert torch.equal(chosen, oracle.flatten(1).min(1).values)
    check_no_nan(costs, fused, alpha)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dynamic_reference_in_float32_is_close_to_naive(case: tuple) -> None:
    large, small, experts = case_logits(case, seed=2)
    oracle = dynamic_costs_naive(large, small, experts)
    costs = dynamic_costs_ref(large, small, experts)
    assert costs.dtype == torch.float32
    torch.testing.assert_close(costs.double(), oracle, atol=2e-4, rtol=1e-4)
    fused, index, alpha = fuse_dynamic_ref(large, small, experts)
    fused_n, index_n, alpha_n = fuse_dynamic_naive(large, small, experts)
    assert alpha.dtype == alpha_n.dtype == torch.float32 and fused.dtype == torch.float32
    assert_same_choice((index, alpha), (index_n, alpha_n), oracle, sorted_grid().float())
    if torch.equal(index, index_n):
        torch.testing.assert_close(fused, fused_n, atol=1e-5, rtol=1e-5)
    # The chosen alphas are spread over the grid, not stuck at its ends.
    assert len(set(alpha.tolist())) > 1 or len(alpha) == 1


def test_masked_tokens_follow_the_convention() -> None:
    large, small, experts = case_logits(("m", 4, 2, 300, True), seed=5)
    outputs = {
        "naive": fuse_dynamic_naive(large, small, experts),
        "ref": fuse_dynamic_ref(large, small, experts),
    }
    for name, (fused, index, alpha) in outputs.items():
        check_no_nan(fused, alpha)
        # -inf exactly where the large model has -inf; elsewhere finite.
        assert torch.equal(torch.isinf(fused), torch.isinf(large)), name
        assert (fused[torch.isinf(fused)] < 0).all()
        # Where the pair (S, E_t*) masks a token, the fused logit is the large one.
        for row in range(4):
            t = int(index[row])
            off = ~(torch.isfinite(small[row]) & torch.isfinite(experts[row, t]))
            assert torch.equal(fused[row, off], large[row, off]), (name, row)
        # Row 3 is fully masked by the large model: P~ = P, so all the alphas of an expert cost
        # the same (KL(Q_t || Q)^2 + KL(Q || Q_t)^2) and the smallest one wins the tie.
        assert float(alpha[3]) == 0.0, name
        costs = dynamic_costs_naive(large, small, experts)
        assert torch.equal(costs[3], costs[3, :, :1].expand_as(costs[3]))
        assert int(index[3]) == int(costs[3, :, 0].argmin())
    for costs_fn in (dynamic_costs_naive, dynamic_costs_ref):
        costs = costs_fn(large, small, experts)
        check_no_nan(costs)
        assert torch.isfinite(costs).all()
        # Expert 0 of row 2 has no finite logit: d = 0, so no KL moves: cost 0 everywhere.
        assert torch.equal(costs[2, 0], torch.zeros_like(costs[2, 0]))


def test_alpha_zero_when_the_experts_agree_with_the_small_base() -> None:
    large, small, _ = make_logits(3, 1, 500, seed=6)
    experts = small.unsqueeze(1).repeat(1, 3, 1)
    experts[1, :, 7] = -INF  # still no opinion anywhere (d := 0 where the expert masks)
    for fn in (fuse_dynamic_naive, fuse_dynamic_ref):
        fused, index, alpha = fn(large, small, experts)
        assert index.tolist() == [0, 0, 0] and alpha.tolist() == [0.0, 0.0, 0.0]
        assert torch.equal(fused, large)
        # Without 0 in the grid the smallest candidate wins the tie (all cost 0).
        fused, index, alpha = fn(large, small, experts, [1.5, 0.5, 1.0])
        assert index.tolist() == [0, 0, 0] and alpha.tolist() == [0.5, 0.5, 0.5]
        assert torch.equal(fused, large)
    assert not dynamic_costs_ref(large, small, experts).any()


def test_ties_go_to_the_lowest_expert() -> None:
    large, small, experts = make_logits(4, 2, 400, seed=7)
    experts = torch.cat([experts[:, :1], experts[:, :1], experts[:, 1:]], 1)  # 0 == 1
    pairs = ((dynamic_costs_naive, fuse_dynamic_naive), (dynamic_costs_ref, fuse_dynamic_ref))
    for costs_fn, fuse_fn in pairs:
        costs = costs_fn(large, small, experts)
        assert torch.equal(costs[:, 0], costs[:, 1])
        _, index, _ = fuse_fn(large, small, experts)
        assert 1 not in index.tolist()


def test_custom_grids() -> None:
    large, small, experts = make_logits(3, 2, 300, seed=8)
    grid = [1.0, -0.5, 0.25, 1.0, 3.0, 0.0]  # unsorted, a duplicate, a negative alpha
    values = sorted_grid(grid)
    assert values.tolist() == [-0.5, 0.0, 0.25, 1.0, 3.0]
    oracle = dynamic_costs_naive(large, small, experts, grid)
    assert oracle.shape == (3, 2, 5)
    costs = dynamic_costs_ref(large, small, experts, grid)
    torch.testing.assert_close(costs.double(), oracle, atol=2e-4, rtol=1e-4)
    fused, index, alpha = fuse_dynamic_ref(large, small, experts, torch.tensor(grid))
    naive = fuse_dynamic_naive(large, small, experts, grid)
    assert_same_choice((index, alpha), naive[1:], oracle, values)
    if torch.equal(index, naive[1]) and torch.equal(alpha, naive[2]):
        torch.testing.assert_close(fused, naive[0], atol=1e-5, rtol=1e-5)
    assert set(alpha.tolist()) <= set(values.tolist())
    # One candidate only: every row takes it, with the expert of lowest cost.
    _, index, alpha = fuse_dynamic_ref(large, small, experts, [0.7])
    assert torch.allclose(alpha, torch.full((3,), 0.7))
    single = dynamic_costs_naive(large, small, experts, [0.7])
    assert torch.equal(index, single[:, :, 0].argmin(1))
    with pytest.raises(ValueError, match="empty"):
        fuse_dynamic_ref(large, small, experts, [])
    with pytest.raises(ValueError, match="finite"):
        fuse_dynamic_ref(large, small, experts, [0.0, INF])


def test_kl_identities() -> None:
    """KL(P~ || P) = alpha E_P~[d] - LSE(z) + LSE(a) and KL(P || P~) = -alpha E_P[d] + LSE(z) -
    LSE(a), against torch.distributions; and the costs of fuse_dynamic_ref from those KLs."""
    large, small, experts = make_logits(2, 2, 400, seed=9, dtype=torch.float64)
    large[0, :5] = -INF  # P and P~ are 0 there
    a = large
    grid = [0.0, 0.3, 1.0, 1.7]
    expected = torch.empty(2, 2, len(grid), dtype=torch.float64)
    for t in range(2):
        d = experts[:, t] - small
        q, qt = Categorical(logits=small), Categorical(logits=experts[:, t])
        kl_qt_q, kl_q_qt = kl_divergence(qt, q), kl_divergence(q, qt)
        for g, alpha in enumerate(grid):
            z = a + alpha * d
            p, pt = Categorical(logits=a), Categorical(logits=z)
            kl_pt_p, kl_p_pt = kl_divergence(pt, p), kl_divergence(p, pt)
            lse_z, lse_a = torch.logsumexp(z, -1), torch.logsumexp(a, -1)
            finite = torch.isfinite(a)
            mean_pt = (pt.probs * torch.where(finite, d, 0.0)).sum(-1)
            mean_p = (p.probs * torch.where(finite, d, 0.0)).sum(-1)
            torch.testing.assert_close(kl_pt_p, alpha * mean_pt - lse_z + lse_a)
            torch.testing.assert_close(kl_p_pt, -alpha * mean_p + lse_z - lse_a)
            # Explicit sums too.
            log_p, log_pt = torch.log_softmax(a, -1), torch.log_softmax(z, -1)
            terms = pt.probs * (log_pt - torch.where(finite, log_p, 0.0))
            torch.testing.assert_close(kl_pt_p, torch.where(finite, terms, 0.0).sum(-1))
            expected[:, t, g] = (kl_pt_p - kl_qt_q) ** 2 + (kl_p_pt - kl_q_qt) ** 2
    torch.testing.assert_close(dynamic_costs_ref(large, small, experts, grid), expected)
    torch.testing.assert_close(dynamic_costs_naive(large, small, experts, grid), expected)


# ---------------------------------------------------------------------------------------------
# Dynamic mode: Triton against the PyTorch path


# Every case in 3 shares of the vocabulary (merged by the select kernel), two in one share.
SPLIT_CASES = [(case, 3) for case in CASES] + [(CASES[0], 1), (CASES[3], 1)]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("case", "splits"), SPLIT_CASES, ids=[f"{case[0]}-split{n}" for case, n in SPLIT_CASES]
)
def test_dynamic_triton_equals_reference(
    case: tuple, splits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fusion, "_num_splits", lambda *_: splits)
    large, small, experts = case_logits(case, seed=10)
    reference = fuse_dynamic_ref(large, small, experts)
    costs_ref = dynamic_costs_ref(large, small, experts)
    costs = dynamic_costs_triton(large, small, experts)
    torch.testing.assert_close(costs, costs_ref, atol=1e-4, rtol=1e-4)
    fused, index, alpha = fuse_dynamic_triton(large, small, experts)
    assert index.dtype == torch.int64 and alpha.dtype == torch.float32
    assert_same_choice((index, alpha), reference[1:], costs_ref.double(), sorted_grid().float())
    if torch.equal(index, reference[1]) and torch.equal(alpha, reference[2]):
        torch.testing.assert_close(fused, reference[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(fused), torch.isinf(large))
    check_no_nan(costs, fused, alpha)


@pytest.mark.usefixtures("interpret")
def test_dynamic_triton_special_rows_and_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fusion, "_num_splits", lambda *_: 2)
    large, small, experts = make_logits(3, 3, 300, seed=11)
    # Row 0: every expert agrees with the small base; row 1: experts 0 and 1 are equal.
    experts[0] = small[0]
    experts[1, 1] = experts[1, 0]
    for grid in (None, [1.5, 0.5, 1.0], [1.0, -0.5, 0.25, 1.0, 3.0, 0.0]):
        fused, index, alpha = fuse_dynamic_triton(large, small, experts, grid)
        reference = fuse_dynamic_ref(large, small, experts, grid)
        assert int(index[0]) == 0 and float(alpha[0]) == float(sorted_grid(grid)[0])
        assert torch.equal(fused[0], large[0])
        assert int(index[1]) != 1
        costs = dynamic_costs_triton(large, small, experts, grid)
        assert torch.equal(costs[1, 0], costs[1, 1]) and not costs[0].any()
        costs_ref = dynamic_costs_ref(large, small, experts, grid)
        values = sorted_grid(grid).float()
        assert_same_choice((index, alpha), reference[1:], costs_ref.double(), values)


@pytest.mark.usefixtures("interpret")
def test_dynamic_triton_large_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """V = 32768 + 7 in shares of the vocabulary (tail blocks masked), with -inf entries."""
    monkeypatch.setattr(fusion, "_num_splits", lambda *_: 4)
    large, small, experts = make_logits(1, 1, 32768 + 7, seed=12)
    large[0, -3:] = -INF
    small[0, 100:110] = -INF
    experts[0, 0, -5:] = -INF
    costs_ref = dynamic_costs_ref(large, small, experts)
    costs = dynamic_costs_triton(large, small, experts)
    torch.testing.assert_close(costs, costs_ref, atol=1e-4, rtol=1e-4)
    fused, index, alpha = fuse_dynamic_triton(large, small, experts)
    reference = fuse_dynamic_ref(large, small, experts)
    assert_same_choice((index, alpha), reference[1:], costs_ref.double(), sorted_grid().float())
    torch.testing.assert_close(fused, reference[0], atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("interpret")
def test_dynamic_triton_bf16_logits() -> None:
    large, small, experts = case_logits(("bf16", 4, 2, 500, True), torch.bfloat16, seed=13)
    fused, index, alpha = fuse_dynamic_triton(large, small, experts)
    reference = fuse_dynamic_ref(large, small, experts)
    assert fused.dtype == torch.bfloat16
    costs_ref = dynamic_costs_ref(large, small, experts)
    assert_same_choice((index, alpha), reference[1:], costs_ref.double(), sorted_grid().float())
    torch.testing.assert_close(fused, reference[0], atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Dispatch, checks, layering, compilation


def test_dispatchers_take_the_reference_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    large, small, experts = make_logits(2, 2, 100)

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path was taken for CPU tensors")

    monkeypatch.setattr(fusion, "fuse_static_triton", refuse)
    monkeypatch.setattr(fusion, "fuse_dynamic_triton", refuse)
    alphas = torch.ones(2, 2)
    static = fuse_static(large, small, experts, alphas)
    assert torch.equal(static, fuse_static_ref(large, small, experts, alphas))
    dynamic = fuse_dynamic(large, small, experts)
    for got, want in zip(dynamic, fuse_dynamic_ref(large, small, experts), strict=True):
        assert torch.equal(got, want)


def test_shapes_are_checked() -> None:
    large, small, experts = make_logits(2, 2, 50)
    with pytest.raises(ValueError, match="small is"):
        fuse_dynamic_ref(large, small[:, :40], experts)
    with pytest.raises(ValueError, match="experts is"):
        fuse_dynamic_ref(large, small, experts[:1])
    with pytest.raises(ValueError, match="alphas is"):
        fuse_static_ref(large, small, experts, torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least one expert"):
        fuse_dynamic_ref(large, small, experts[:, :0])
    # Static fusion without experts is the large logits.
    assert torch.equal(fuse_static_ref(large, small, experts[:, :0], torch.ones(2, 0)), large)


def test_triton_kernels_compile_for_a_gpu(compile_for_h100) -> None:
    """No GPU here: compile the three kernels (bf16 logits) to SASS for an H100 (sm_90), which
    catches what the interpreter lets through (types, shapes, control flow)."""

    apply, score, select = fusion._jitted(False)
    pointers = {
        "large_ptr": "bf16",
        "small_ptr": "bf16",
        "experts_ptr": "bf16",
        "out_ptr": "bf16",
        "index_ptr": "i64",
    }
    kernels = [
        (apply, {"BLOCK_V": fusion.APPLY_BLOCK_V}),
        (score, {"G_PAD": 32, "BLOCK_V": fusion.SCORE_BLOCK_V}),
        (select, {"E_PAD": 4, "G_PAD": 32}),
    ]
    for kernel, constants in kernels:
        compile_for_h100(kernel, constants, pointers, "fp32")
