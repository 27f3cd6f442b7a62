"""Logit fusion of small experts into a large model's logits (weak-to-strong; design.md §6).

One row (one sequence at one decoding step) has the large model's logits ``a = z_L`` [V], the
small base's ``z_S`` [V] and E experts' ``z_E`` [E, V]; batched, ``large`` [B, V], ``small``
[B, V], ``experts`` [B, E, V]. Expert t moves the large logits by ``d_t = z_Et - z_S``:

- static mode (proxy tuning): ``fused = a + sum_t alphas[:, t] * d_t`` with given alphas [B, E];
- dynamic mode: every expert t and every alpha of a grid (default 0.0, 0.1, ..., 2.0) is scored

      cost(t, alpha) = (KL(P~ || P) - KL(Q_t || Q))^2 + (KL(P || P~) - KL(Q || Q_t))^2

  with P = softmax(a), P~ = softmax(a + alpha d_t), Q = softmax(z_S), Q_t = softmax(z_Et); the
  (t, alpha) of lowest cost wins (one expert per step; ties go to the lowest expert index, then
  the smallest alpha: the grid is sorted and deduplicated first) and
  ``fused = a + alpha * d_t``, returned with the chosen expert index [B] (int64) and alpha [B].

  With z = a + alpha d, KL(P~ || P) = alpha E_P~[d] - LSE(z) + LSE(a) and
  KL(P || P~) = -alpha E_P[d] + LSE(z) - LSE(a) (similarly for Q_t against Q), so every
  candidate needs only LSE(z) and E_P~[d]: one online-softmax sweep over the vocabulary keeping,
  per candidate, the running max, the sum of exp and the d-weighted sum of exp.

Masked tokens (the convention, the same in every implementation and both modes). Logits are
finite or -inf (a NaN or +inf in ``large`` is not supported; one in ``small`` or ``experts``
counts as -inf):

- where a is -inf the token is out of P and P~ (probability 0, no contribution) and the fused
  logit stays -inf, whatever the small models say: the large model's mask is kept;
- where z_S or z_Et is -inf, the pair (S, E_t) has no opinion on the token: d_t := 0 there (the
  fused logit is a, unchanged by that expert), and Q and Q_t of expert t are both taken on the
  tokens where z_S and z_Et are both finite (renormalised there), so that KL(Q_t || Q) and
  KL(Q || Q_t) stay finite. A token that only the expert masks is thus not banned (neither is one
  that only the small base masks): it is left as the large model has it;
- a row whose a is all -inf has KL(P~ || P) = KL(P || P~) := 0 (and fused all -inf); a pair
  without a common finite token has KL(Q_t || Q) = KL(Q || Q_t) := 0;
- KLs are clamped at 0 (rounding), and are exactly 0 where they are mathematically: KL(P~ || P)
  and KL(P || P~) for alpha = 0 or for an expert whose d_t is 0 wherever a is finite,
  KL(Q_t || Q) and KL(Q || Q_t) for an expert whose d_t is 0 everywhere; so such candidates tie
  exactly in every implementation (and the tie rule picks the first).

No NaN comes out of any of them.

Implementations (one signature per mode; computed in float32, or float64 for float64 inputs;
fused comes back in ``large``'s dtype):

- ``fuse_static_ref`` / ``fuse_static_triton``;
- ``fuse_dynamic_naive``: a full softmax per candidate, float64 (the test oracle and the
  benchmark's baseline); ``fuse_dynamic_ref``: the single-pass formula, its sweep over the
  vocabulary by kernels.cpu_ops.fusion_sweep (a C kernel for float32 on the CPU, PyTorch
  otherwise) and the rest in PyTorch (the CPU path); ``fuse_dynamic_triton``: the single sweep
  as a Triton kernel, split over the vocabulary into shares that a second small kernel merges
  (and picks the winner), then an elementwise kernel writes fused;
- ``fuse_static`` / ``fuse_dynamic``: Triton for CUDA tensors, the PyTorch path otherwise.

``dynamic_costs_naive`` / ``dynamic_costs_ref`` / ``dynamic_costs_triton`` return the costs
[B, E, G] over the sorted grid (for tests and inspection).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kernels.cpu_ops import fusion_choose, fusion_costs_ref, fusion_stats, fusion_sweep

try:  # Triton is optional: the PyTorch path needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

DEFAULT_GRID: tuple[float, ...] = tuple(i / 10 for i in range(21))

Grid = Sequence[float] | Tensor | None


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _check(large: Tensor, small: Tensor, experts: Tensor) -> tuple[int, int, int]:
    if large.dim() != 2:
        raise ValueError(f"large is {tuple(large.shape)}, expected [B, V]")
    batch, vocab = large.shape
    if tuple(small.shape) != (batch, vocab):
        raise ValueError(f"small is {tuple(small.shape)}, expected [{batch}, {vocab}]")
    if experts.dim() != 3 or experts.shape[0] != batch or experts.shape[2] != vocab:
        raise ValueError(f"experts is {tuple(experts.shape)}, expected [{batch}, E, {vocab}]")
    if vocab == 0:
        raise ValueError("the vocabulary is empty")
    if not (large.device == small.device == experts.device):
        raise ValueError("large, small and experts must be on one device")
    for name, tensor in (("large", large), ("small", small), ("experts", experts)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, not {tensor.dtype}")
    return batch, experts.shape[1], vocab


def _compute_dtype(large: Tensor) -> torch.dtype:
    return torch.float64 if large.dtype == torch.float64 else torch.float32


def _check_alphas(alphas: Tensor | Sequence[float], batch: int, num_experts: int) -> Tensor:
    alphas = torch.as_tensor(alphas)
    if alphas.dim() == 1:
        alphas = alphas.expand(batch, -1)
    if tuple(alphas.shape) != (batch, num_experts):
        raise ValueError(f"alphas is {tuple(alphas.shape)}, expected [{batch}, {num_experts}]")
    return alphas


def sorted_grid(grid: Grid = None) -> Tensor:
    """The candidate alphas, float64, sorted ascending without duplicates (DEFAULT_GRID when
    None)."""
    values = torch.as_tensor(DEFAULT_GRID if grid is None else grid, dtype=torch.float64)
    values = values.detach().cpu().flatten()
    if values.numel() == 0:
        raise ValueError("the alpha grid is empty")
    if not torch.isfinite(values).all():
        raise ValueError("the alpha grid must be finite")
    return torch.unique(values, sorted=True)


def _pair_logits(small: Tensor, experts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(d, z_S, z_E) per expert, [B, E, V], masked by the convention: d = 0 and z_S = z_E = -inf
    wherever z_S or z_E is not finite."""
    small = small.unsqueeze(1)
    both = torch.isfinite(small) & torch.isfinite(experts)
    d = torch.where(both, experts - small, 0.0)
    neg_inf = torch.tensor(-math.inf, dtype=d.dtype, device=d.device)
    return d, torch.where(both, small, neg_inf), torch.where(both, experts, neg_inf)


def _choose(costs: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """(expert index [B] int64, alpha [B]) of the lowest cost of [B, E, G]: torch.argmin returns
    the first minimum of the flattened (expert-major) costs, i.e. the lowest expert, then the
    smallest alpha of the sorted grid."""
    flat = costs.flatten(1).argmin(1)
    num_alphas = costs.shape[2]
    return flat // num_alphas, grid[flat % num_alphas]


def _one_hot_alphas(index: Tensor, alpha: Tensor, num_experts: int) -> Tensor:
    alphas = torch.zeros(index.shape[0], num_experts, dtype=alpha.dtype, device=alpha.device)
    return alphas.scatter_(1, index[:, None], alpha[:, None])


# ---------------------------------------------------------------------------------------------
# PyTorch paths


def fuse_static_ref(
    large: Tensor, small: Tensor, experts: Tensor, alphas: Tensor | Sequence[float]
) -> Tensor:
    """fused [B, V] = large + sum_t alphas[:, t] * d_t (d_t := 0 where z_S or z_Et is -inf),
    accumulated expert by expert; alphas [B, E] (or [E], the same for every row)."""
    batch, num_experts, _ = _check(large, small, experts)
    dtype = _compute_dtype(large)
    alphas = _check_alphas(alphas, batch, num_experts).to(device=large.device, dtype=dtype)
    fused = large.to(dtype, copy=True)
    small = small.to(dtype)
    small_finite = torch.isfinite(small)
    for t in range(num_experts):
        column = alphas[:, t : t + 1]
        if not bool((column != 0).any()):
            continue
        expert = experts[:, t].to(dtype)
        d = torch.where(small_finite & torch.isfinite(expert), expert - small, 0.0)
        fused += column * d
    return fused.to(large.dtype)


def dynamic_costs_naive(large: Tensor, small: Tensor, experts: Tensor, grid: Grid = None) -> Tensor:
    """costs [B, E, G] (float64, over sorted_grid(grid)) with a full softmax per candidate and
    KLs as explicit sums: the oracle."""
    batch, num_experts, _ = _check(large, small, experts)
    values = sorted_grid(grid).to(large.device)
    a = large.double()
    log_p = torch.log_softmax(a, -1)  # NaN on an all -inf row: masked out by the p > 0 tests
    d, zs, ze = _pair_logits(small.double(), experts.double())
    costs = torch.empty(batch, num_experts, values.numel(), dtype=torch.float64, device=a.device)

    def kl(log_p1: Tensor, log_p2: Tensor) -> Tensor:
        p1 = torch.exp(log_p1)
        terms = torch.where(p1 > 0, p1 * (log_p1 - log_p2), 0.0)
        return terms.sum(-1).clamp_min(0.0)

    for t in range(num_experts):
        log_q = torch.log_softmax(zs[:, t], -1)
        log_qt = torch.log_softmax(ze[:, t], -1)
        kl_qt_q, kl_q_qt = kl(log_qt, log_q), kl(log_q, log_qt)
        for g, alpha in enumerate(values.tolist()):
            log_pt = torch.log_softmax(a + alpha * d[:, t], -1)
            kl_pt_p, kl_p_pt = kl(log_pt, log_p), kl(log_p, log_pt)
            costs[:, t, g] = (kl_pt_p - kl_qt_q) ** 2 + (kl_p_pt - kl_q_qt) ** 2
    return costs


def fuse_dynamic_naive(
    large: Tensor, small: Tensor, experts: Tensor, grid: Grid = None
) -> tuple[Tensor, Tensor, Tensor]:
    """fuse_dynamic with a full softmax per candidate in float64 (oracle and baseline)."""
    batch, num_experts, _ = _check(large, small, experts)
    if num_experts == 0:
        raise ValueError("dynamic fusion needs at least one expert")
    values = sorted_grid(grid).to(large.device)
    costs = dynamic_costs_naive(large, small, experts, values)
    index, alpha = _choose(costs, values)
    d, _, _ = _pair_logits(small.double(), experts.double())
    chosen = d[torch.arange(batch, device=d.device), index]
    fused = large.double() + alpha[:, None] * chosen
    return fused.to(large.dtype), index, alpha.to(_compute_dtype(large))


def _swept(
    large: Tensor, small: Tensor, experts: Tensor, grid: Grid
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The single-pass formula's inputs to the costs, in the compute dtype: fusion_stats' stats
    and d [B, E, V], fusion_sweep's lse and mean over the sorted grid, and that grid."""
    batch, num_experts, vocab = _check(large, small, experts)
    dtype = _compute_dtype(large)
    if grid is None:
        values = default_grid(dtype, large.device)
    else:
        values = sorted_grid(grid).to(device=large.device, dtype=dtype)
    a = large.to(dtype)
    d, stats = fusion_stats(a, small.to(dtype), experts.to(dtype))
    lse_z, mean_z = fusion_sweep(a, d.reshape(batch * num_experts, vocab), values)
    return stats, lse_z, mean_z, d, values


@functools.cache
def default_grid(dtype: torch.dtype, device: torch.device) -> Tensor:
    """sorted_grid() in dtype on device, made once (callers only read it)."""
    return sorted_grid().to(device=device, dtype=dtype)


def dynamic_costs_ref(large: Tensor, small: Tensor, experts: Tensor, grid: Grid = None) -> Tensor:
    """costs [B, E, G] over sorted_grid(grid) by the single-pass formula, vectorised."""
    return _costs_ref(large, small, experts, grid)[0]


def _costs_ref(
    large: Tensor, small: Tensor, experts: Tensor, grid: Grid
) -> tuple[Tensor, Tensor, Tensor]:
    """(costs [B, E, G], d [B, E, V], sorted grid [G]) in the compute dtype."""
    stats, lse_z, mean_z, d, values = _swept(large, small, experts, grid)
    return fusion_costs_ref(stats, lse_z, mean_z, values, experts.shape[1]), d, values


def fuse_dynamic_ref(
    large: Tensor, small: Tensor, experts: Tensor, grid: Grid = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(fused [B, V], expert index [B] int64, alpha [B]) by the single-pass formula in PyTorch:
    the CPU path."""
    batch, num_experts, _ = _check(large, small, experts)
    if num_experts == 0:
        raise ValueError("dynamic fusion needs at least one expert")
    costs, d, values = _costs_ref(large, small, experts, grid)
    index, alpha = _choose(costs, values)
    chosen = d[torch.arange(batch, device=d.device), index]
    fused = large.to(values.dtype) + alpha[:, None] * chosen
    return fused.to(large.dtype), index, alpha


# ---------------------------------------------------------------------------------------------
# Triton kernels. Only builtins inside: tl.max / tl.sum / tl.min / tl.cdiv / tl.zeros are @jit
# functions of triton's standard library, which the interpreter cannot call unless it was on at
# import. Reductions are spelled tl.reduce(x, axis, combine) with the standard library's own
# combine functions: compiled, that is what tl.max / tl.sum / tl.min do; interpreted, tl.reduce is
# patched and recognises these combine functions (numpy max / min / sum).

if triton is not None:
    _MAX = tl.standard._elementwise_max
    _MIN = tl.standard._elementwise_min
    _SUM = tl.standard._sum_combine


def _apply_kernel(
    large_ptr,
    small_ptr,
    experts_ptr,
    alphas_ptr,
    out_ptr,
    V,
    E,
    stride_lb,
    stride_sb,
    stride_eb,
    stride_ee,
    stride_ob,
    BLOCK_V: tl.constexpr,
):
    """out[row, block] = large + sum_t alphas[row, t] * d_t (experts with alpha 0 not read)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    acc = tl.load(large_ptr + row * stride_lb + offs, mask=mask, other=0.0).to(tl.float32)
    small = tl.load(small_ptr + row * stride_sb + offs, mask=mask, other=0.0).to(tl.float32)
    small_ok = tl.abs(small) < float("inf")
    for t in range(E):
        alpha = tl.load(alphas_ptr + row * E + t)
        if alpha != 0.0:
            expert = tl.load(
                experts_ptr + row * stride_eb + t * stride_ee + offs, mask=mask, other=0.0
            ).to(tl.float32)
            ok = small_ok & (tl.abs(expert) < float("inf"))
            acc += alpha * (tl.where(ok, expert, 0.0) - tl.where(ok, small, 0.0))
    tl.store(out_ptr + row * stride_ob + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _score_kernel(
    large_ptr,
    small_ptr,
    experts_ptr,
    grid_ptr,
    ws_ptr,
    V,
    E,
    G,
    share,
    stride_lb,
    stride_sb,
    stride_eb,
    stride_ee,
    G_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Online-softmax statistics of one (row, expert, share of the vocabulary).

    Tile rows: 0..G-1 the candidates z = a + alpha_g d, G the large logits a (alpha 0), G+1 the
    small base's masked logits, G+2 the expert's, the rest -inf. Per tile row it keeps the running
    max m, sum of exp s and d-weighted sum of exp w; with max |d| (over all tokens, and over those
    where a is finite) it writes ws[row, expert, share] = [m, s, w, max|d|, max|d|_a] x G_PAD."""
    row = tl.program_id(0)
    t = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    alpha = tl.load(grid_ptr + offs_g, mask=offs_g < G, other=0.0)
    is_z = offs_g[:, None] <= G
    is_s = offs_g[:, None] == G + 1
    is_e = offs_g[:, None] == G + 2
    neg_inf = float("-inf")
    m = tl.full((G_PAD,), neg_inf, tl.float32)
    s = tl.full((G_PAD,), 0.0, tl.float32)
    w = tl.full((G_PAD,), 0.0, tl.float32)
    dmax = tl.full((G_PAD,), 0.0, tl.float32)
    dmax_a = tl.full((G_PAD,), 0.0, tl.float32)
    begin = split * share
    end = tl.minimum(begin + share, V)
    for v0 in range(begin, end, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < end
        a = tl.load(large_ptr + row * stride_lb + offs, mask=mask, other=neg_inf)
        zs = tl.load(small_ptr + row * stride_sb + offs, mask=mask, other=neg_inf)
        ze = tl.load(experts_ptr + row * stride_eb + t * stride_ee + offs, mask=mask, other=neg_inf)
        a = a.to(tl.float32)
        zs = zs.to(tl.float32)
        ze = ze.to(tl.float32)
        both = (tl.abs(zs) < float("inf")) & (tl.abs(ze) < float("inf"))
        d = tl.where(both, ze, 0.0) - tl.where(both, zs, 0.0)
        zs = tl.where(both, zs, neg_inf)
        ze = tl.where(both, ze, neg_inf)
        z = tl.where(
            is_z,
            a[None, :] + alpha[:, None] * d[None, :],
            tl.where(is_s, zs[None, :], tl.where(is_e, ze[None, :], neg_inf)),
        )
        m_new = tl.maximum(m, tl.reduce(z, 1, _MAX))
        base = tl.where(m_new == neg_inf, 0.0, m_new)
        scale = tl.exp(m - base)
        ex = tl.exp(z - base[:, None])
        s = s * scale + tl.reduce(ex, 1, _SUM)
        w = w * scale + tl.reduce(ex * d[None, :], 1, _SUM)
        m = m_new
        dmax = tl.maximum(dmax, tl.reduce(tl.abs(d), 0, _MAX))
        d_a = tl.where(a > neg_inf, tl.abs(d), 0.0)
        dmax_a = tl.maximum(dmax_a, tl.reduce(d_a, 0, _MAX))
    out = ws_ptr + ((row * E + t) * tl.num_programs(2) + split) * (5 * G_PAD) + offs_g
    tl.store(out, m)
    tl.store(out + G_PAD, s)
    tl.store(out + 2 * G_PAD, w)
    tl.store(out + 3 * G_PAD, dmax)
    tl.store(out + 4 * G_PAD, dmax_a)


def _select_kernel(
    ws_ptr,
    grid_ptr,
    costs_ptr,
    index_ptr,
    alpha_ptr,
    alphas_ptr,
    E,
    G,
    SPLITS,
    E_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
):
    """Merges a row's shares, writes costs[row] [E, G], the winner's index and alpha, and the
    one-hot alphas[row] [E] of the apply kernel."""
    row = tl.program_id(0)
    offs_e = tl.arange(0, E_PAD)[:, None]
    offs_g = tl.arange(0, G_PAD)[None, :]
    e_ok = offs_e < E
    neg_inf = float("-inf")
    m = tl.full((E_PAD, G_PAD), neg_inf, tl.float32)
    s = tl.full((E_PAD, G_PAD), 0.0, tl.float32)
    w = tl.full((E_PAD, G_PAD), 0.0, tl.float32)
    dmax = tl.full((E_PAD, G_PAD), 0.0, tl.float32)
    dmax_a = tl.full((E_PAD, G_PAD), 0.0, tl.float32)
    for split in range(SPLITS):
        ptrs = ws_ptr + ((row * E + offs_e) * SPLITS + split) * (5 * G_PAD) + offs_g
        m_i = tl.load(ptrs, mask=e_ok, other=neg_inf)
        s_i = tl.load(ptrs + G_PAD, mask=e_ok, other=0.0)
        w_i = tl.load(ptrs + 2 * G_PAD, mask=e_ok, other=0.0)
        d_i = tl.load(ptrs + 3 * G_PAD, mask=e_ok, other=0.0)
        da_i = tl.load(ptrs + 4 * G_PAD, mask=e_ok, other=0.0)
        m_new = tl.maximum(m, m_i)
        base = tl.where(m_new == neg_inf, 0.0, m_new)
        scale, scale_i = tl.exp(m - base), tl.exp(m_i - base)
        s = s * scale + s_i * scale_i
        w = w * scale + w_i * scale_i
        m = m_new
        dmax = tl.maximum(dmax, d_i)
        dmax_a = tl.maximum(dmax_a, da_i)
    valid = s > 0
    safe = tl.where(valid, s, 1.0)
    lse = tl.where(valid, m + tl.log(safe), 0.0)
    mean = tl.where(valid, w / safe, 0.0)
    # Columns G, G+1, G+2: the large logits, the small base, the expert ([E_PAD, 1] each).
    lse_a = tl.reduce(tl.where(offs_g == G, lse, 0.0), 1, _SUM)[:, None]
    mean_a = tl.reduce(tl.where(offs_g == G, mean, 0.0), 1, _SUM)[:, None]
    a_ok = tl.reduce(tl.where((offs_g == G) & valid, 1.0, 0.0), 1, _SUM)[:, None] > 0
    lse_s = tl.reduce(tl.where(offs_g == G + 1, lse, 0.0), 1, _SUM)[:, None]
    mean_s = tl.reduce(tl.where(offs_g == G + 1, mean, 0.0), 1, _SUM)[:, None]
    q_ok = tl.reduce(tl.where((offs_g == G + 1) & valid, 1.0, 0.0), 1, _SUM)[:, None] > 0
    lse_e = tl.reduce(tl.where(offs_g == G + 2, lse, 0.0), 1, _SUM)[:, None]
    mean_e = tl.reduce(tl.where(offs_g == G + 2, mean, 0.0), 1, _SUM)[:, None]
    moved = tl.reduce(dmax, 1, _MAX)[:, None] > 0  # d_t != 0 somewhere
    moved_a = tl.reduce(dmax_a, 1, _MAX)[:, None] > 0  # ... where a is finite (P~ != P)
    alpha = tl.load(grid_ptr + offs_g, mask=offs_g < G, other=0.0)
    keep_q = q_ok & moved
    kl_eq = tl.where(keep_q, tl.maximum(mean_e - lse_e + lse_s, 0.0), 0.0)
    kl_qe = tl.where(keep_q, tl.maximum(lse_e - lse_s - mean_s, 0.0), 0.0)
    keep_p = a_ok & moved_a & (alpha != 0.0)
    kl_zp = tl.where(keep_p, tl.maximum(alpha * mean - lse + lse_a, 0.0), 0.0)
    kl_pz = tl.where(keep_p, tl.maximum(lse - lse_a - alpha * mean_a, 0.0), 0.0)
    cost = (kl_zp - kl_eq) * (kl_zp - kl_eq) + (kl_pz - kl_qe) * (kl_pz - kl_qe)
    in_range = e_ok & (offs_g < G)
    tl.store(costs_ptr + (row * E + offs_e) * G + offs_g, cost, mask=in_range)
    cost = tl.where(in_range, cost, float("inf"))
    best = tl.reduce(tl.reduce(cost, 1, _MIN), 0, _MIN)
    flat = offs_e * G_PAD + offs_g
    first = tl.reduce(tl.reduce(tl.where(cost == best, flat, E_PAD * G_PAD), 1, _MIN), 0, _MIN)
    first = tl.minimum(first, E_PAD * G_PAD - 1)
    t_best = first // G_PAD
    g_best = first % G_PAD
    t_best = tl.where(t_best < E, t_best, 0)  # safety only: costs are finite
    alpha_best = tl.load(grid_ptr + g_best, mask=g_best < G, other=0.0)
    tl.store(index_ptr + row, t_best.to(tl.int64))
    tl.store(alpha_ptr + row, alpha_best)
    offs_e1 = tl.arange(0, E_PAD)
    tl.store(
        alphas_ptr + row * E + offs_e1,
        tl.where(offs_e1 == t_best, alpha_best, 0.0),
        mask=offs_e1 < E,
    )


@functools.cache
def _jitted(interpret: bool) -> tuple:
    """The kernels, jitted on first use so that TRITON_INTERPRET is read then."""
    del interpret  # part of the cache key only
    return triton.jit(_apply_kernel), triton.jit(_score_kernel), triton.jit(_select_kernel)


def triton_available() -> bool:
    return triton is not None


APPLY_BLOCK_V = 1024
SCORE_BLOCK_V = 128


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=64)
def _device_grid(values: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _num_splits(pairs: int, vocab: int, device: torch.device) -> int:
    """Shares of the vocabulary per (row, expert): enough programs to fill the GPU, each share
    at least 8 blocks long; 1 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 1
    programs = 4 * _num_sms(device)
    longest = max(1, vocab // (8 * SCORE_BLOCK_V))
    return max(1, min(longest, -(-programs // max(1, pairs))))


def _rows_contiguous(*tensors: Tensor) -> list[Tensor]:
    return [x if x.stride(-1) == 1 else x.contiguous() for x in tensors]


def _apply(large: Tensor, small: Tensor, experts: Tensor, alphas: Tensor) -> Tensor:
    batch, num_experts, vocab = experts.shape
    out = torch.empty(batch, vocab, dtype=large.dtype, device=large.device)
    if batch == 0 or vocab == 0:
        return out
    apply, _, _ = _jitted(bool(triton.knobs.runtime.interpret))
    apply[(batch, triton.cdiv(vocab, APPLY_BLOCK_V))](
        large,
        small,
        experts,
        alphas,
        out,
        vocab,
        num_experts,
        large.stride(0),
        small.stride(0),
        experts.stride(0),
        experts.stride(1),
        out.stride(0),
        BLOCK_V=APPLY_BLOCK_V,
    )
    return out


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the fusion kernels need triton, which is not installed")


def fuse_static_triton(
    large: Tensor, small: Tensor, experts: Tensor, alphas: Tensor | Sequence[float]
) -> Tensor:
    """Same as fuse_static_ref, as one elementwise Triton kernel (float32 inside)."""
    _need_triton()
    batch, num_experts, _ = _check(large, small, experts)
    alphas = _check_alphas(alphas, batch, num_experts)
    alphas = alphas.to(device=large.device, dtype=torch.float32).contiguous()
    large, small, experts = _rows_contiguous(large, small, experts)
    return _apply(large, small, experts, alphas)


def _triton_dynamic(
    large: Tensor, small: Tensor, experts: Tensor, grid: Grid
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(costs [B, E, G], index [B], alpha [B], one-hot alphas [B, E], sorted grid)."""
    _need_triton()
    batch, num_experts, vocab = _check(large, small, experts)
    device = large.device
    values = _device_grid(tuple(sorted_grid(grid).tolist()), device)
    num_alphas = values.numel()
    g_pad = triton.next_power_of_2(num_alphas + 3)
    e_pad = max(2, triton.next_power_of_2(num_experts))
    costs = torch.empty(batch, num_experts, num_alphas, dtype=torch.float32, device=device)
    # All written by the select kernel.
    index = torch.empty(batch, dtype=torch.int64, device=device)
    alpha = torch.empty(batch, dtype=torch.float32, device=device)
    alphas = torch.empty(batch, num_experts, dtype=torch.float32, device=device)
    if batch == 0 or num_experts == 0:
        return costs, index, alpha, alphas, values
    large, small, experts = _rows_contiguous(large, small, experts)
    splits = _num_splits(batch * num_experts, vocab, device)
    share = triton.cdiv(triton.cdiv(max(vocab, 1), splits), SCORE_BLOCK_V) * SCORE_BLOCK_V
    splits = triton.cdiv(max(vocab, 1), share)
    ws = torch.empty(batch, num_experts, splits, 5, g_pad, dtype=torch.float32, device=device)
    _, score, select = _jitted(bool(triton.knobs.runtime.interpret))
    score[(batch, num_experts, splits)](
        large,
        small,
        experts,
        values,
        ws,
        vocab,
        num_experts,
        num_alphas,
        share,
        large.stride(0),
        small.stride(0),
        experts.stride(0),
        experts.stride(1),
        G_PAD=g_pad,
        BLOCK_V=SCORE_BLOCK_V,
    )
    select[(batch,)](
        ws,
        values,
        costs,
        index,
        alpha,
        alphas,
        num_experts,
        num_alphas,
        splits,
        E_PAD=e_pad,
        G_PAD=g_pad,
    )
    return costs, index, alpha, alphas, values


def dynamic_costs_triton(
    large: Tensor, small: Tensor, experts: Tensor, grid: Grid = None
) -> Tensor:
    """costs [B, E, G] (float32) over sorted_grid(grid), from the Triton kernels."""
    return _triton_dynamic(large, small, experts, grid)[0]


def fuse_dynamic_triton(
    large: Tensor, small: Tensor, experts: Tensor, grid: Grid = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Same as fuse_dynamic_ref with three launches: the sweep (per row, expert and share of
    the vocabulary), the merge and choice (per row), the elementwise fused logits."""
    _, num_experts, _ = _check(large, small, experts)
    if num_experts == 0:
        raise ValueError("dynamic fusion needs at least one expert")
    _, index, alpha, alphas, _ = _triton_dynamic(large, small, experts, grid)
    large, small, experts = _rows_contiguous(large, small, experts)
    return _apply(large, small, experts, alphas), index, alpha


# ---------------------------------------------------------------------------------------------
# Dispatchers


def choose_dynamic(
    large: Tensor, small: Tensor, experts: Tensor, grid: Grid = None
) -> tuple[Tensor, Tensor]:
    """(expert index [B] int64, alpha [B]) of fuse_dynamic, without its fused logits (the
    engine applies the choice in place, kernels.cpu_ops.fusion_apply)."""
    if large.is_cuda and triton is not None:
        _, index, alpha = fuse_dynamic_triton(large, small, experts, grid)
        return index, alpha
    if experts.shape[1] == 0:
        raise ValueError("dynamic fusion needs at least one expert")
    stats, lse_z, mean_z, _, values = _swept(large, small, experts, grid)
    return fusion_choose(stats, lse_z, mean_z, values, experts.shape[1])


def fuse_static(
    large: Tensor, small: Tensor, experts: Tensor, alphas: Tensor | Sequence[float]
) -> Tensor:
    """fuse_static_triton on CUDA tensors when Triton is installed, else fuse_static_ref."""
    if large.is_cuda and triton is not None:
        return fuse_static_triton(large, small, experts, alphas)
    return fuse_static_ref(large, small, experts, alphas)


def fuse_dynamic(
    large: Tensor, small: Tensor, experts: Tensor, grid: Grid = None
) -> tuple[Tensor, Tensor, Tensor]:
    """fuse_dynamic_triton on CUDA tensors when Triton is installed, else fuse_dynamic_ref."""
    if large.is_cuda and triton is not None:
        return fuse_dynamic_triton(large, small, experts, grid)
    return fuse_dynamic_ref(large, small, experts, grid)
