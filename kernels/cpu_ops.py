"""Fused small ops for the CPU: a decoder layer's non-linear ops (the residual add and the
norm after it in one), dynamic logit fusion's passes over the vocabulary and its choice, and
sampling's (top-k / top-p / min-p thresholds, the exponential race, the argmax, the Gumbel keys
of constrained walks). The C module also runs a decode step's layers in one call for
kernels.cpu_decode.

Each op has a PyTorch reference `<op>_ref` with the same signature: the oracle of the tests and
the path for every case the C kernel (kernels/csrc/cpu_ops.c) does not take: other devices,
float16, autograd, unusual strides, or a machine without gcc, Python's headers or AVX2. The C
kernels follow the references' rounding step by step; results differ only where a sum is added
in another order (the RMS norm's variance, attention's dot products) or exp rounds differently.

Why: a decoding step of a 24-layer model runs each of these ~24-50 times, and as torch ops they
cost 5-20 us per call whatever their size; here a call costs about a microsecond. The fusion
statistics and sweep (kernels.fusion's dynamic mode) are two passes over the vocabulary (per
pair, and per pair and alpha) instead of some twenty torch ops over [B, E, V] and a
[pairs, alphas, V] tensor; the fused logits are then written in place, one pass per row.
"""

from __future__ import annotations

import math
import sysconfig
import threading
import warnings
from array import array
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor
from torch.nn import functional as F

from kernels.build import CSRC_DIR, BuildError, build_shared_library, cpu_flags, load_extension

_SOURCE = CSRC_DIR / "cpu_ops.c"
_FLAGS = (
    "-O3",
    "-fopenmp",
    "-mavx2",
    "-mfma",
    "-fno-math-errno",
    # Every product and sum rounded as written: the references' rounding rests on it.
    "-ffp-contract=off",
)
_REQUIRED_CPU_FLAGS = frozenset({"avx2", "fma"})
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}

_module: ModuleType | None = None
_loaded = False
_load_lock = threading.Lock()


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise the last dimension in float32 and round back before scaling, like
    transformers' LlamaRMSNorm."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """As rms_norm_ref, for x [T, D] or [T, H, D] (rows may be strided, elements not) and weight
    [D], or [H, D] for x [T, H, D] (one weight per head)."""
    module = _kernels()
    code = _DTYPES.get(x.dtype)
    dims = x.dim()
    d = x.shape[-1] if dims else 0
    per_head = dims == 3 and weight.dim() == 2
    if (
        module is None
        or code is None
        or dims not in (2, 3)
        or x.stride(-1) != 1
        or weight.dtype is not x.dtype
        or weight.shape != ((x.shape[1], d) if per_head else (d,))
        or not weight.is_contiguous()
        or not (x.is_cpu and weight.is_cpu)
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return rms_norm_ref(x, weight, eps)
    if dims == 2:
        t, h, ld_t, ld_h = x.shape[0], 1, x.stride(0), 0
        out = x.new_empty(t, d)
    else:
        t, h = x.shape[0], x.shape[1]
        ld_t, ld_h = x.stride(0), x.stride(1)
        out = x.new_empty(t, h, d)
    module.rms_norm(
        code, x.data_ptr(), ld_t, ld_h, weight.data_ptr(), d if per_head else 0, out.data_ptr(),
        t, h, d, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out


def add_rms_norm_ref(hidden: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    """hidden += delta in place, then rms_norm_ref of the sum: a decoder layer's residual add
    and the next norm."""
    hidden.add_(delta)
    return rms_norm_ref(hidden, weight, eps)


def add_rms_norm(hidden: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    """As add_rms_norm_ref, for hidden and delta [T, D] (rows may be strided, elements not)."""
    module = _kernels()
    code = _DTYPES.get(hidden.dtype)
    if (
        module is None
        or code is None
        or hidden.dim() != 2
        or delta.shape != hidden.shape
        or delta.dtype is not hidden.dtype
        or weight.dtype is not hidden.dtype
        or weight.shape != (hidden.shape[1],)
        or hidden.stride(1) != 1
        or delta.stride(1) != 1
        or weight.stride(0) != 1
        or not (hidden.is_cpu and delta.is_cpu and weight.is_cpu)
        or (torch.is_grad_enabled() and (delta.requires_grad or weight.requires_grad))
        or hidden.untyped_storage().data_ptr() == delta.untyped_storage().data_ptr()
    ):
        return add_rms_norm_ref(hidden, delta, weight, eps)
    t, d = hidden.shape
    out = hidden.new_empty(t, d)
    module.add_rms_norm(
        code, hidden.data_ptr(), hidden.stride(0), delta.data_ptr(), delta.stride(0),
        weight.data_ptr(), out.data_ptr(), t, d, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out


def rope_store_kv_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_mapping: Tensor,
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by the angles of cos, sin [T, D / 2], then
    write k and v [T, Hk, D] into the caches [slots, Hk, D] at slot_mapping [T]."""
    for x in (q, k):
        _rotate_(x, cos.unsqueeze(1), sin.unsqueeze(1))
    key_cache.index_copy_(0, slot_mapping, k)
    value_cache.index_copy_(0, slot_mapping, v)


def _rotate_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): the products and sums of transformers'
    `x * cos + rotate_half(x) * sin`, rounded the same way."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x2_sin = x2 * sin
    x1_sin = x1 * sin
    x1.mul_(cos).sub_(x2_sin)
    x2.mul_(cos).add_(x1_sin)


def rope_store_kv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_mapping: Tensor,
) -> None:
    """As rope_store_kv_ref."""
    module = _kernels()
    code = _DTYPES.get(q.dtype)
    args = (q, k, v, cos, sin, key_cache, value_cache, slot_mapping)
    if module is None or code is None or not _rope_fits(*args):
        rope_store_kv_ref(*args)
        return
    t, hq, d = q.shape
    module.rope_store_kv(
        code, q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        cos.data_ptr(), sin.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
        slot_mapping.data_ptr(), t, hq, k.shape[1], d,
    )  # fmt: skip


def _rope_fits(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_mapping: Tensor,
) -> bool:
    """Shapes, strides, dtypes and devices the C kernel reads correctly: checked in full
    (it writes into the caches), as cheaply as Python allows."""
    dtype = q.dtype
    if q.dim() != 3 or k.dim() != 3 or key_cache.dim() != 3:
        return False
    t, _, d = q.shape
    hk = k.shape[1]
    kv_shape = (t, hk, d)
    return (
        d % 2 == 0
        and k.shape == kv_shape
        and v.shape == kv_shape
        and q.stride(2) == 1 and q.stride(1) == d
        and k.stride(2) == 1 and k.stride(1) == d
        and v.stride(2) == 1 and v.stride(1) == d
        and cos.shape == (t, d // 2) and sin.shape == cos.shape
        and cos.is_contiguous() and sin.is_contiguous()
        and key_cache.shape[1] == hk and key_cache.shape[2] == d
        and value_cache.shape == key_cache.shape
        and key_cache.is_contiguous() and value_cache.is_contiguous()
        and slot_mapping.dtype is torch.int64 and slot_mapping.shape == (t,)
        and slot_mapping.stride(0) == 1
        and k.dtype is dtype and v.dtype is dtype and cos.dtype is dtype and sin.dtype is dtype
        and key_cache.dtype is dtype and value_cache.dtype is dtype
        and q.is_cpu and key_cache.is_cpu and value_cache.is_cpu and cos.is_cpu
        and sin.is_cpu and slot_mapping.is_cpu
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
    )  # fmt: skip


def decode_attention_ref(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slots: Tensor,
    lengths: Tensor,
    scale: float,
) -> Tensor:
    """Attention of one new query per sequence, q [S, Hq, D], over its cached keys and values
    (caches [slots, Hk, D]; sequence s attends slots[s, :lengths[s]]; Hk divides Hq).
    Returns [S, Hq, D] in q's dtype."""
    longest = slots.shape[1]
    mask = None
    if int(lengths.min()) < longest:  # padded rows: mask the padding out
        mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :]
    # [S, L, Hk, D] -> [S, Hk, L, D]; queries [S, Hq, 1, D].
    keys = key_cache[slots].transpose(1, 2)
    values = value_cache[slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def decode_attention(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slots: Tensor,
    lengths: Tensor,
    scale: float,
) -> Tensor:
    """As decode_attention_ref."""
    module = _kernels()
    code = _DTYPES.get(q.dtype)
    if (
        module is None
        or code is None
        or not _attention_fits(q, key_cache, value_cache, slots, lengths)
    ):
        return decode_attention_ref(q, key_cache, value_cache, slots, lengths, scale)
    s, hq, d = q.shape
    out = q.new_empty(s, hq, d)
    module.decode_attention(
        code, q.data_ptr(), q.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
        slots.data_ptr(), lengths.data_ptr(), out.data_ptr(), s, slots.shape[1], hq,
        key_cache.shape[1], d, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out


def _attention_fits(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, slots: Tensor, lengths: Tensor
) -> bool:
    """As _rope_fits, for decode_attention (slot values are the caller's to keep in range)."""
    dtype = q.dtype
    if q.dim() != 3 or key_cache.dim() != 3 or slots.dim() != 2:
        return False
    s, hq, d = q.shape
    hk = key_cache.shape[1]
    return (
        key_cache.shape[2] == d
        and hq % hk == 0
        and value_cache.shape == key_cache.shape
        and key_cache.is_contiguous() and value_cache.is_contiguous()
        and q.stride(2) == 1 and q.stride(1) == d
        and slots.shape[0] == s and slots.shape[1] > 0 and slots.is_contiguous()
        and lengths.shape == (s,) and lengths.stride(0) == 1
        and slots.dtype is torch.int64 and lengths.dtype is torch.int64
        and key_cache.dtype is dtype and value_cache.dtype is dtype
        and q.is_cpu and key_cache.is_cpu and value_cache.is_cpu and slots.is_cpu
        and lengths.is_cpu
        and not (torch.is_grad_enabled() and q.requires_grad)
    )  # fmt: skip


def silu_mul_ref(gate_up: Tensor) -> Tensor:
    """silu(gate) * up, where gate_up [T, 2F] holds gate then up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: Tensor) -> Tensor:
    """As silu_mul_ref."""
    module = _kernels()
    code = _DTYPES.get(gate_up.dtype)
    if (
        module is None
        or code is None
        or gate_up.dim() != 2
        or gate_up.shape[1] % 2
        or gate_up.stride(1) != 1
        or not gate_up.is_cpu
        or (torch.is_grad_enabled() and gate_up.requires_grad)
    ):
        return silu_mul_ref(gate_up)
    t, width = gate_up.shape
    out = gate_up.new_empty(t, width // 2)
    module.silu_mul(
        code, gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), t, width // 2,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


# fusion_sweep_ref computes this many z entries (candidates x vocabulary) at a time at most.
SWEEP_CHUNK_ELEMENTS = 1 << 20


def fusion_sweep_ref(a: Tensor, d: Tensor, alphas: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic logit fusion's sweep (kernels.fusion): for a [B, V], d [P, V] (pair p moves row
    p // (P / B) of a) and alphas [G], with z = a + alpha * d, returns lse [P, G] = LSE(z) and
    mean [P, G] = E_softmax(z)[d]; both 0 where no z is finite. a is finite or -inf, d finite.
    In a's dtype (float32 or float64)."""
    pairs, vocab = d.shape
    experts = pairs // a.shape[0]
    a_rows = a.unsqueeze(1).expand(a.shape[0], experts, vocab).reshape(pairs, vocab)
    num_alphas = alphas.numel()
    lse = torch.empty(pairs, num_alphas, dtype=a.dtype, device=a.device)
    mean = torch.empty_like(lse)
    step = max(1, SWEEP_CHUNK_ELEMENTS // max(1, num_alphas * vocab))
    for first in range(0, pairs, step):
        rows = slice(first, first + step)
        z = torch.addcmul(a_rows[rows, None, :], alphas[None, :, None], d[rows, None, :])
        top = z.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)
        ex = z.sub_(top).exp_()
        total = ex.sum(-1)
        weighted = (ex @ d[rows, :, None]).squeeze(-1)
        safe = torch.where(total > 0, total, 1.0)
        lse[rows] = top.squeeze(-1) + torch.log(safe)
        mean[rows] = weighted / safe
    return lse, mean


def fusion_sweep(a: Tensor, d: Tensor, alphas: Tensor) -> tuple[Tensor, Tensor]:
    """As fusion_sweep_ref; float32 on the CPU runs the C kernel (its exp differs from torch's
    by an ulp or two, its sums add in another order; over an evenly spaced grid, as the default
    is, two exponentials per token serve eleven alphas, the others' terms multiplied out from
    them, each within about ten ulps of its own exponential)."""
    module = _kernels()
    if (
        module is None
        or a.dtype is not torch.float32
        or d.dtype is not torch.float32
        or alphas.dtype is not torch.float32
        or a.dim() != 2
        or d.dim() != 2
        or d.shape[1] != a.shape[1]
        or a.shape[0] == 0
        or d.shape[0] % a.shape[0]
        or a.stride(1) != 1
        or d.stride(1) != 1
        or not (a.is_cpu and d.is_cpu and alphas.is_cpu)
        or (torch.is_grad_enabled() and (a.requires_grad or d.requires_grad))
    ):
        return fusion_sweep_ref(a, d, alphas)
    alphas = alphas.contiguous()
    pairs, vocab = d.shape
    num_alphas = alphas.numel()
    lse = a.new_empty(pairs, num_alphas)
    mean = a.new_empty(pairs, num_alphas)
    module.fusion_sweep(
        a.data_ptr(), a.stride(0), d.data_ptr(), d.stride(0), pairs, pairs // a.shape[0], vocab,
        alphas.data_ptr(), num_alphas, lse.data_ptr(), mean.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return lse, mean


def fusion_variants() -> tuple[str, ...]:
    """The variants of fusion_sweep's and fusion_stats' C code this CPU runs, the default first
    ("avx512" where the CPU has AVX-512, "avx2"); none without the compiled kernels."""
    if _kernels() is None:
        return ()
    return ("avx512", "avx2") if "avx512f" in cpu_flags() else ("avx2",)


def set_fusion_variant(name: str) -> None:
    """Run fusion_sweep's and fusion_stats' `name` variant (one of fusion_variants()) from now
    on: "avx2" is the code of CPUs without AVX-512, there to test it on those with."""
    module = _kernels()
    if name not in fusion_variants() or module is None:
        raise ValueError(f"this CPU runs the fusion variants {fusion_variants()}, not {name!r}")
    module.set_fusion_avx512(int(name == "avx512"))


# The columns of fusion_stats' statistics, per pair (row b, expert t); flags are 0 or 1.
FUSION_STATS = (
    "lse_s",  # LSE of the small base's logits where the pair's logits are both finite (else 0)
    "mean_s",  # E_Q[d], Q their softmax (0 where none is finite)
    "lse_e",  # the same for the expert's logits
    "mean_e",  # E_Qt[d]
    "valid",  # whether the pair has a token where both are finite
    "moved",  # whether d != 0 anywhere
    "moved_a",  # whether d != 0 where the large logit is > -inf
    "lse_a",  # LSE of the large logits (0 where none is finite)
    "valid_a",  # whether a large logit is finite
    "mean_a",  # E_P[d], P = softmax(a) (the plain mean of d where no large logit is finite)
)


def fusion_stats_ref(a: Tensor, small: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic logit fusion's statistics (kernels.fusion) of a [B, V] (large), small [B, V]
    and experts [B, E, V]: d [B, E, V] = experts - small where both are finite, else 0, and
    stats [B * E, len(FUSION_STATS)] in a's dtype (float32 or float64)."""
    batch, num_experts, _ = experts.shape
    small = small.unsqueeze(1)
    both = torch.isfinite(small) & torch.isfinite(experts)
    d = torch.where(both, experts - small, 0.0)
    neg_inf = torch.tensor(-math.inf, dtype=d.dtype, device=d.device)
    lse_s, mean_s, valid = _lse_mean(torch.where(both, small, neg_inf), d)
    lse_e, mean_e, _ = _lse_mean(torch.where(both, experts, neg_inf), d)
    nonzero = d != 0
    moved = nonzero.any(-1)
    moved_a = (nonzero & (a > -math.inf).unsqueeze(1)).any(-1)
    lse_a, _, valid_a = _lse_mean(a, torch.zeros((), dtype=a.dtype, device=a.device))
    p = torch.softmax(torch.where(valid_a[:, None], a, 0.0), -1)
    mean_a = (d * p.unsqueeze(1)).sum(-1)  # bmm is slower for this shape on the CPU
    per_row = (batch, num_experts)
    lse_a, valid_a = lse_a[:, None].expand(per_row), valid_a[:, None].expand(per_row)
    columns = (lse_s, mean_s, lse_e, mean_e, valid, moved, moved_a, lse_a, valid_a, mean_a)
    stats = torch.stack([column.to(a.dtype) for column in columns], dim=-1)
    return d, stats.reshape(batch * num_experts, len(FUSION_STATS))


def _lse_mean(z: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Over the last dimension: LSE(z), E_softmax(z)[d] and whether any entry is finite (both
    0 where none is)."""
    top = z.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    ex = torch.exp(z - top)
    total = ex.sum(-1)
    weighted = (ex * d).sum(-1)
    valid = total > 0
    safe = torch.where(valid, total, 1.0)
    lse = torch.where(valid, top.squeeze(-1) + torch.log(safe), 0.0)
    return lse, torch.where(valid, weighted / safe, 0.0), valid


def fusion_stats(a: Tensor, small: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
    """As fusion_stats_ref; float32 on the CPU runs the C kernel (its exp differs from torch's
    by an ulp or two, its sums add in another order; d is the same bits)."""
    module = _kernels()
    if (
        module is None
        or a.dtype is not torch.float32
        or small.dtype is not torch.float32
        or experts.dtype is not torch.float32
        or a.dim() != 2
        or experts.dim() != 3
        or small.shape != a.shape
        or experts.shape[0] != a.shape[0]
        or experts.shape[2] != a.shape[1]
        or a.stride(1) != 1
        or small.stride(1) != 1
        or experts.stride(2) != 1
        or not (a.is_cpu and small.is_cpu and experts.is_cpu)
        or (torch.is_grad_enabled() and (a.requires_grad or experts.requires_grad))
    ):
        return fusion_stats_ref(a, small, experts)
    batch, num_experts, vocab = experts.shape
    d = a.new_empty(batch, num_experts, vocab)
    stats = a.new_empty(batch * num_experts, module.FUSION_STATS)
    module.fusion_stats(
        a.data_ptr(), a.stride(0), small.data_ptr(), small.stride(0), experts.data_ptr(),
        experts.stride(0), experts.stride(1), batch, num_experts, vocab, d.data_ptr(),
        stats.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return d, stats


def fusion_costs_ref(
    stats: Tensor, lse: Tensor, mean: Tensor, alphas: Tensor, num_experts: int
) -> Tensor:
    """Dynamic logit fusion's costs [B, E, G] (kernels.fusion) from fusion_stats' stats
    [B * E, len(FUSION_STATS)] and fusion_sweep's lse and mean [B * E, G] over alphas [G]: the
    squared mismatch of the two KL divergences, large fused against large, and expert against
    small base. In alphas' dtype."""
    pairs, num_alphas = lse.shape
    columns = dict(zip(FUSION_STATS, stats.unbind(-1), strict=True))
    # KL(Q_t || Q) and KL(Q || Q_t) by the LSE formula: 0 for a pair with no common finite
    # token or whose d is 0 everywhere.
    keep_q = (columns["valid"] > 0) & (columns["moved"] > 0)
    lse_s, lse_e = columns["lse_s"], columns["lse_e"]
    kl_eq = torch.where(keep_q, (columns["mean_e"] - lse_e + lse_s).clamp_min(0.0), 0.0)
    kl_qe = torch.where(keep_q, (lse_e - lse_s - columns["mean_s"]).clamp_min(0.0), 0.0)
    lse_a = columns["lse_a"][:, None]
    alpha = alphas.view(1, -1)
    kl_zp = alpha * mean - lse + lse_a  # KL(P~ || P)
    kl_pz = lse - lse_a - alpha * columns["mean_a"][:, None]  # KL(P || P~)
    # P~ != P only where d moves a finite large logit, for alpha != 0.
    kept = (columns["valid_a"] > 0) & (columns["moved_a"] > 0)
    keep = kept[:, None] & (alpha != 0)
    kl_zp = torch.where(keep, kl_zp.clamp_min(0.0), 0.0)
    kl_pz = torch.where(keep, kl_pz.clamp_min(0.0), 0.0)
    costs = (kl_zp - kl_eq[:, None]) ** 2 + (kl_pz - kl_qe[:, None]) ** 2
    return costs.view(pairs // num_experts, num_experts, num_alphas)


def fusion_choose(
    stats: Tensor,
    lse: Tensor,
    mean: Tensor,
    alphas: Tensor,
    num_experts: int,
    costs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(expert index [B] int64, alpha [B]) of the lowest of fusion_costs_ref's costs, the first
    in expert-major then alpha order (as torch.argmin of the flattened costs; alphas ascending);
    the costs written to `costs` [B, E, G] where given. float32 on the CPU runs the C code: the
    same float32 operations, so the same bits, without the dozens of torch ops on tiny tensors
    that cost a batch-1 step a fraction of a millisecond."""
    module = _kernels()
    pairs, num_alphas = lse.shape
    if (
        module is None
        or any(t.dtype is not torch.float32 or not t.is_cpu for t in (stats, lse, mean, alphas))
        or num_experts <= 0
        or pairs % num_experts
        or num_alphas == 0
        or tuple(stats.shape) != (pairs, len(FUSION_STATS))
        or mean.shape != lse.shape
        or alphas.numel() != num_alphas
        or (
            costs is not None
            and (
                costs.dtype is not torch.float32
                or not (costs.is_cpu and costs.is_contiguous())
                or costs.numel() != pairs * num_alphas
            )
        )
    ):
        computed = fusion_costs_ref(stats, lse, mean, alphas, num_experts)
        if costs is not None:
            costs.copy_(computed)
        flat = computed.flatten(1).argmin(1)
        return flat // num_alphas, alphas.flatten()[flat % num_alphas]
    stats, lse, mean, alphas = (t.contiguous() for t in (stats, lse, mean, alphas))
    batch = pairs // num_experts
    index = torch.empty(batch, dtype=torch.int64)
    alpha = torch.empty(batch, dtype=torch.float32)
    module.fusion_choose(
        stats.data_ptr(), lse.data_ptr(), mean.data_ptr(), alphas.data_ptr(), batch, num_experts,
        num_alphas, index.data_ptr(), alpha.data_ptr(), 0 if costs is None else costs.data_ptr(),
    )  # fmt: skip
    return index, alpha


def fusion_apply_ref(
    logits: Tensor,
    rows: Sequence[int],
    small: Sequence[Tensor],
    experts: Sequence[Sequence[Tensor]],
    alphas: Tensor,
    vocab: int,
) -> None:
    """Fused logits in place (kernels.fusion.fuse_static_ref's formula, row by row): for i,
    logits[rows[i], :vocab] += sum_t alphas[i, t] * d_it, d_it = experts[i][t] - small[i]
    (0 wherever either is not finite) accumulated expert by expert in float32, an expert whose
    alphas are all 0 skipped; logits[rows[i], vocab:] = -inf. logits [N, W] float32; small[i]
    and experts[i][t] hold at least vocab floats; alphas [len(rows), E] float32."""
    from kernels.fusion import fuse_static_ref  # kernels.fusion imports this module

    index = torch.tensor(list(rows), dtype=torch.int64)
    logits[index, :vocab] = fuse_static_ref(
        logits[index, :vocab],
        torch.stack([row[:vocab] for row in small]),
        torch.stack([torch.stack([t[:vocab] for t in row]) for row in experts]),
        alphas,
    )
    logits[index, vocab:] = -torch.inf


def fusion_apply(
    logits: Tensor,
    rows: Sequence[int],
    small: Sequence[Tensor],
    experts: Sequence[Sequence[Tensor]],
    alphas: Tensor,
    vocab: int,
) -> None:
    """As fusion_apply_ref; on the CPU one pass per row in C (the same bits), where the
    reference's dozen torch ops over [B, V] cost milliseconds at batch 8. Rows must differ."""
    module = _kernels()
    pieces = [*small, *(t for row in experts for t in row)]
    if (
        module is None
        or not _fusion_rows_fit(logits, rows, small, experts, pieces, vocab)
        or alphas.dtype is not torch.float32
        or not alphas.is_cpu
        or tuple(alphas.shape) != (len(rows), len(experts[0]) if experts else 0)
    ):
        fusion_apply_ref(logits, rows, small, experts, alphas, vocab)
        return
    # Arrays, not tensors: a torch op costs a step tens of us once the caches are cold.
    targets, pointers = array("q", rows), array("q", [t.data_ptr() for t in pieces])
    weights = alphas.contiguous()
    batch = len(rows)
    module.fusion_apply(
        logits.data_ptr(), logits.stride(0), targets.buffer_info()[0], pointers.buffer_info()[0],
        pointers.buffer_info()[0] + 8 * batch, weights.data_ptr(), batch, weights.shape[1], vocab,
        logits.shape[1], torch.get_num_threads(),
    )  # fmt: skip


def _fusion_rows_fit(
    logits: Tensor,
    rows: Sequence[int],
    small: Sequence[Tensor],
    experts: Sequence[Sequence[Tensor]],
    pieces: Sequence[Tensor],
    vocab: int,
) -> bool:
    """Whether the C fusion passes can take these: float32 CPU logits [N, W] contiguous, rows
    distinct and inside it, a small row and the same number of expert rows per row, each piece
    (small and expert rows) a float32 CPU vector of at least vocab <= W floats, no autograd."""
    return (
        logits.dtype is torch.float32
        and logits.dim() == 2
        and logits.is_contiguous()
        and logits.is_cpu
        and len(small) == len(rows)
        and len(experts) == len(rows)
        and all(len(row) == len(experts[0]) for row in experts)
        and 0 < vocab <= logits.shape[1]
        and all(
            t.dtype is torch.float32 and t.is_cpu and t.dim() == 1 and t.stride(0) == 1
            and t.shape[0] >= vocab
            for t in pieces
        )
        and all(0 <= r < logits.shape[0] for r in rows)
        and len(set(rows)) == len(rows)
        and not (torch.is_grad_enabled() and logits.requires_grad)
    )  # fmt: skip


def fusion_dynamic_ref(
    logits: Tensor,
    rows: Sequence[int],
    small: Sequence[Tensor],
    experts: Sequence[Sequence[Tensor]],
    alphas: Tensor,
    vocab: int,
) -> tuple[list[int], list[float]]:
    """Dynamic fusion of logits[rows[i]] in place (kernels.fusion's dynamic mode, row by row):
    each row's expert and alpha of the lowest cost over the grid alphas [G] (ascending), from
    its large logits[rows[i], :vocab], its small base's small[i] and its experts' experts[i]
    (1-D rows of at least vocab floats, the same number per row); then, as fusion_apply_ref,
    logits[rows[i], :vocab] += alpha_i * d of the chosen expert and logits[rows[i], vocab:] =
    -inf. Returns (expert index, alpha) per row. float32 logits."""
    index = torch.tensor(list(rows), dtype=torch.int64)
    large, alphas = logits[index, :vocab], alphas.to(logits.dtype)
    base = torch.stack([row[:vocab] for row in small])
    offered = torch.stack([torch.stack([t[:vocab] for t in row]) for row in experts])
    d, stats = fusion_stats_ref(large, base, offered)
    lse, mean = fusion_sweep_ref(large, d.flatten(0, 1), alphas)
    costs = fusion_costs_ref(stats, lse, mean, alphas, offered.shape[1])
    flat = costs.flatten(1).argmin(1)
    picks, alpha = flat // alphas.numel(), alphas[flat % alphas.numel()]
    steer = [[row[e]] for row, e in zip(experts, picks.tolist(), strict=True)]
    fusion_apply_ref(logits, rows, small, steer, alpha[:, None], vocab)
    return picks.tolist(), alpha.tolist()


def fusion_dynamic(
    logits: Tensor,
    rows: Sequence[int],
    small: Sequence[Tensor],
    experts: Sequence[Sequence[Tensor]],
    alphas: Tensor,
    vocab: int,
) -> tuple[list[int], list[float]]:
    """As fusion_dynamic_ref; on the CPU one C call: fusion_stats, fusion_sweep, fusion_choose
    and fusion_apply's C code in turn (their bits), with none of the dozen torch ops around
    them that cost a decode step hundreds of microseconds once the weights' stream has left
    the caches cold. Rows must differ."""
    module = _kernels()
    num_experts = len(experts[0]) if experts else 0
    pieces = [*small, *(t for row in experts for t in row)]
    if (
        module is None
        or not rows
        or num_experts == 0
        or not _fusion_rows_fit(logits, rows, small, experts, pieces, vocab)
        or alphas.dtype is not torch.float32
        or not (alphas.is_cpu and alphas.is_contiguous())
        or alphas.dim() != 1
        or alphas.numel() == 0
    ):
        return fusion_dynamic_ref(logits, rows, small, experts, alphas, vocab)
    batch, num_alphas = len(rows), alphas.numel()
    pairs = batch * num_experts
    sizes = (pairs * vocab, pairs * module.FUSION_STATS, pairs * num_alphas, pairs * num_alphas)
    d, stats, lse, mean = _scratch_addresses(sizes)
    index, alpha = array("q", bytes(8 * batch)), array("f", bytes(4 * batch))
    # Named, so that they live through the call.
    targets, pointers = array("q", rows), array("q", [t.data_ptr() for t in pieces])
    module.fusion_dynamic(
        logits.data_ptr(), logits.stride(0), targets.buffer_info()[0],
        pointers.buffer_info()[0], pointers.buffer_info()[0] + 8 * batch, batch, num_experts,
        vocab, logits.shape[1], alphas.data_ptr(), num_alphas, d, stats, lse, mean,
        index.buffer_info()[0], alpha.buffer_info()[0], torch.get_num_threads(),
    )  # fmt: skip
    return index.tolist(), alpha.tolist()


_scratch = threading.local()


def _scratch_addresses(sizes: Sequence[int]) -> list[int]:
    """Addresses of float32 buffers of these sizes, laid end to end in this thread's scratch
    (grown as needed, kept between calls: an allocation per call costs a step tens of us)."""
    total = sum(sizes)
    buffer = getattr(_scratch, "floats", None)
    if buffer is None or buffer.numel() < total:
        buffer = _scratch.floats = torch.empty(total, dtype=torch.float32)
    address, addresses = buffer.data_ptr(), []
    for size in sizes:
        addresses.append(address)
        address += 4 * size
    return addresses


def _float32_rows(*tensors: Tensor) -> bool:
    """Whether the C code can read these [B, V] tensors: the kernels built, float32 on the CPU,
    2-D with unit stride along a row, all of one shape."""
    first = tensors[0]
    return _kernels() is not None and all(
        t.dtype is torch.float32
        and t.is_cpu
        and t.dim() == 2
        and t.stride(1) == 1
        and t.shape == first.shape
        for t in tensors
    )


def _mix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer on uint32 values held in int64 (products split in 16-bit
    halves so that none overflows int64)."""

    def times(h: Tensor, c: int) -> Tensor:
        return ((h & 0xFFFF) * c + ((((h >> 16) * c) & 0xFFFF) << 16)) & 0xFFFFFFFF

    h = h ^ (h >> 16)
    h = times(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = times(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def race_uniform_ref(keys: Tensor, vocab: int) -> Tensor:
    """The exponential race's uniform numbers u [B, vocab] (float32, exact) of int64 keys [B]:
    token v of row b gets u = (2 (h >> 9) + 1) 2^-24 with h = mix(mix(v ^ k0) ^ k1) for the
    key's low and high 32 bits k0 and k1: U(0, 1) from a hash, in 2^23 steps, never 0 or 1."""
    ids = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    low, high = keys & 0xFFFFFFFF, (keys >> 32) & 0xFFFFFFFF
    h = _mix32(_mix32(ids[None, :] ^ low[:, None]) ^ high[:, None])
    return ((h >> 9) * 2 + 1).float() * 2.0**-24


def race_uniform(keys: Tensor, vocab: int) -> Tensor:
    """As race_uniform_ref (the same numbers); int64 keys on the CPU in C."""
    module = _kernels()
    if module is None or keys.dtype is not torch.int64 or not keys.is_cpu or keys.dim() != 1:
        return race_uniform_ref(keys, vocab)
    keys = keys.contiguous()
    out = torch.empty(keys.shape[0], vocab, dtype=torch.float32)
    module.race_uniform(
        keys.data_ptr(), keys.shape[0], vocab, out.data_ptr(), vocab, torch.get_num_threads()
    )
    return out


def race_noise_ref(keys: Tensor, vocab: int) -> Tensor:
    """The exponential race's noise E = -log u [B, vocab] (float64) of race_uniform_ref's u:
    Exp(1) noise from a hash."""
    return -torch.log(race_uniform_ref(keys, vocab).double())


def exponential_race_ref(logits: Tensor, keys: Tensor, floors: Tensor | None = None) -> Tensor:
    """One token per row of logits [B, V] (int64 [B]): argmax_v exp(z_v - max z) / E_v with
    race_noise_ref's noise, in float64, the first on ties; token 0 where a row has no finite
    logit. With E_v ~ Exp(1) i.i.d., a draw from softmax(z). floors [B]: logits below their
    row's count as -inf (a row's maximum must not be). On logits' device."""
    z = logits.double()
    if floors is not None:
        z = z.masked_fill(logits < floors.to(logits.device, logits.dtype)[:, None], -math.inf)
    top = z.amax(dim=-1, keepdim=True)
    finite = torch.isfinite(top).squeeze(-1)
    scores = (z - torch.where(torch.isfinite(top), top, 0.0)).exp() / race_noise_ref(
        keys.to(z.device), z.shape[1]
    )
    return torch.where(finite, scores.argmax(dim=-1), 0)


def exponential_race(logits: Tensor, keys: Tensor, floors: Tensor | None = None) -> Tensor:
    """As exponential_race_ref; float32 logits on the CPU run the C code (its exp and log in
    float32, within an ulp or two of the reference's: the same token but for near ties; rows
    in parallel; tokens more than 21 below the row's maximum, which cannot win, skipped)."""
    if (
        not _float32_rows(logits)
        or keys.dtype is not torch.int64
        or tuple(keys.shape) != (logits.shape[0],)
        or not keys.is_cpu
        or logits.shape[1] >= 2**31
        or (
            floors is not None
            and (
                floors.dtype is not torch.float32
                or not floors.is_cpu
                or tuple(floors.shape) != (logits.shape[0],)
            )
        )
    ):
        return exponential_race_ref(logits, keys, floors)
    keys = keys.contiguous()
    floors = None if floors is None else floors.contiguous()
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    _kernels().exponential_race(
        logits.data_ptr(), logits.stride(0), keys.data_ptr(),
        0 if floors is None else floors.data_ptr(), logits.shape[0], logits.shape[1],
        tokens.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return tokens


def argmax_rows(logits: Tensor) -> Tensor:
    """logits.argmax(dim=-1) of logits [B, V] (the first maximum; the first NaN where a row
    has one); float32 on the CPU in C."""
    if not _float32_rows(logits) or logits.shape[1] == 0:
        return logits.argmax(dim=-1)
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    _kernels().argmax_rows(
        logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1],
        tokens.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return tokens


def gumbel_keys(logits: Tensor, uniform: Tensor) -> Tensor:
    """Gumbel keys logits - log(-log u) [B, V] for logits and uniform u [B, V] (u = 0 counts as
    float32's smallest normal number); float32 on the CPU in C (its logs within an ulp or two
    of torch's), else torch."""
    if not _float32_rows(logits, uniform):
        tiny = torch.finfo(uniform.dtype).tiny
        return logits - (-uniform.clamp(min=tiny).log()).log()
    keys = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _kernels().gumbel(
        logits.data_ptr(), logits.stride(0), uniform.data_ptr(), uniform.stride(0),
        logits.shape[0], logits.shape[1], 0, keys.data_ptr(), 0, torch.get_num_threads(),
    )  # fmt: skip
    return keys


def gumbel_topk_keys(logits: Tensor, uniform: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """(keys [B, k], ids [B, k]): each row's k largest gumbel_keys in decreasing order (ties:
    the lower id first; -inf keys, id 0, where fewer are finite), in C without the keys of the
    whole row; None where the C code does not take these tensors (then: torch.topk of
    gumbel_keys)."""
    if not _float32_rows(logits, uniform) or not 1 <= k <= logits.shape[1]:
        return None
    keys = torch.empty(logits.shape[0], k, dtype=torch.float32)
    ids = torch.empty(logits.shape[0], k, dtype=torch.int64)
    _kernels().gumbel(
        logits.data_ptr(), logits.stride(0), uniform.data_ptr(), uniform.stride(0),
        logits.shape[0], logits.shape[1], k, keys.data_ptr(), ids.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return keys, ids


def sampling_thresholds_ref(
    logits: Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]
) -> Tensor:
    """Per row of logits [B, V], the smallest value theta such that keeping the logits >= theta
    applies top-k (the k largest and any tied with the k-th; k = 0 or >= V: off), then top-p
    over what top-k kept, renormalised (each token whose probability mass ranked above it is
    < p, and any tied with the last one kept; p = 1: off), then min-p (the tokens with p >=
    min_p p_max, compared as z >= max z + log min_p in logits' dtype; 0: off). -inf where a row
    keeps every finite logit. By sorting each row, the mass in float64; [B] in logits' dtype."""
    thresholds = torch.full((logits.shape[0],), -math.inf, dtype=logits.dtype)
    rows = zip(logits, top_k, top_p, min_p, strict=True)
    for r, (row, k, p, lowest) in enumerate(rows):
        values = row[row > -math.inf].sort(descending=True).values
        if 0 < k < row.numel() and k <= values.numel():
            thresholds[r] = values[k - 1]
            values = values[values >= values[k - 1]]
        if p < 1.0 and values.numel():
            probs = torch.softmax(values.double(), 0)
            mass_above = probs.cumsum(0) - probs
            thresholds[r] = values[int((mass_above < p).sum()) - 1]
        if lowest > 0.0:
            cut = row.max() + torch.tensor(math.log(lowest), dtype=logits.dtype)
            thresholds[r] = torch.maximum(thresholds[r], cut.cpu())
    return thresholds.to(logits.device)


def sampling_thresholds(
    logits: Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]
) -> Tensor:
    """As sampling_thresholds_ref; float32 on the CPU runs the C code: no sort (a radix select
    over the values' bits, three passes over a row at most per filter), the masses from float32
    exponentials summed in double (the same kept tokens but where the mass above one is within
    about 1e-6 of p), rows in parallel."""
    if not _float32_rows(logits) or not len(top_k) == len(top_p) == len(min_p) == len(logits):
        return sampling_thresholds_ref(logits, top_k, top_p, min_p)
    batch = logits.shape[0]
    ks = torch.tensor(list(top_k), dtype=torch.int64)
    ps = torch.tensor(list(top_p), dtype=torch.float64)
    lowest = torch.tensor(list(min_p), dtype=torch.float64)
    thresholds = torch.empty(batch, dtype=torch.float32)
    _kernels().sampling_thresholds(
        logits.data_ptr(), logits.stride(0), batch, logits.shape[1], ks.data_ptr(),
        ps.data_ptr(), lowest.data_ptr(), thresholds.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return thresholds


def kernel_available() -> bool:
    """Whether these ops have their compiled fast path on this machine."""
    return _kernels() is not None


def _kernels() -> ModuleType | None:
    if not _loaded:
        _load()
    return _module


def _load() -> None:
    global _module, _loaded
    with _load_lock:
        if _loaded:
            return
        if _REQUIRED_CPU_FLAGS.issubset(cpu_flags()):
            _module = _build()
        _loaded = True


def _build() -> ModuleType | None:
    flags = (*_FLAGS, f"-I{sysconfig.get_paths()['include']}")
    try:
        path = build_shared_library(_SOURCE, flags)
        module = load_extension("cpu_ops", path)
        if len(FUSION_STATS) != module.FUSION_STATS:
            raise ImportError(f"{path} has {module.FUSION_STATS} fusion statistics")
    except (BuildError, ImportError, OSError) as error:
        warnings.warn(
            f"cpu_ops: no fast kernels ({error}); using the torch references",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return module
