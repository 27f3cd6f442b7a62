"""A new LoRA adapter made by merging others: PEFT's `add_weighted_adapter` on engine adapters.

Methods (PEFT's combination type in brackets):

- "linear" or "cat" ["cat"]: exact. Per projection, delta = sum_i w_i B_i A_i, written as one
  LoRA of rank sum_i r_i by stacking the A's and the weighted B's. PEFT's own "linear" instead
  sums the A's and the B's separately (cross terms B_i A_j), which is exact for one adapter only,
  so it is not offered.
- "svd" ["svd"], "ties" ["ties_svd"], "dare_linear" ["dare_linear_svd"], "dare_ties"
  ["dare_ties_svd"]: the dense deltas of each projection are combined (weighted sum; TIES: trim
  each to its top-`density` magnitudes, elect each entry's sign, average the weighted entries that
  agree with it; DARE: drop entries at random, keeping each with probability `density`, and
  rescale by 1 / density), then a truncated SVD puts the result back in LoRA form at `rank`.

A projection only some adapters adapt is merged from those adapters alone, as PEFT does.
`save_adapter` writes a merged adapter as a PEFT directory, so it can be registered (and
reloaded from disk) like any other.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.lora import (
    CONFIG_FILE,
    MAX_RANK,
    PROJECTIONS,
    WEIGHTS_FILE,
    AdapterConfig,
    LoraAdapter,
    LoraWeights,
)
from engine.types import AdapterError, InvalidRequest

EXACT_METHODS = ("linear", "cat")
SVD_METHODS = ("svd", "ties", "dare_linear", "dare_ties")
METHODS = EXACT_METHODS + SVD_METHODS
_PRUNING_METHODS = ("ties", "dare_linear", "dare_ties")  # the ones `density` applies to
_PROJ_ORDER = {name: i for i, name in enumerate(PROJECTIONS)}


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    method: str,
    *,
    density: float = 1.0,
    rank: int | None = None,
    seed: int = 0,
) -> LoraAdapter:
    """A new adapter (fresh uid, same base, the inputs' dtype) merging `adapters` with `weights`.

    `density` (0, 1]: the fraction of each delta's entries TIES / DARE keep (1: prune nothing).
    `rank`: the SVD methods' rank (default: the largest rank of the inputs), capped per
    projection at min(out, in); the exact methods take no rank (theirs is the sum of the inputs').
    `seed`: DARE's random drops, drawn per layer, projection and adapter in that order.
    InvalidRequest for bad arguments, AdapterError for adapters that cannot be merged."""
    _check_arguments(adapters, weights, method, density, rank)
    dtype = functools.reduce(torch.promote_types, (a.dtype for a in adapters))
    device = next(iter(adapters[0].weights.values())).a.device
    keys = {key for adapter in adapters for key in adapter.weights}
    # A fixed order makes DARE's draws reproducible; it is also PEFT's module order.
    keys = sorted(keys, key=lambda key: (key[0], _PROJ_ORDER[key[1]]))
    generator = torch.Generator(device=device).manual_seed(seed)
    target_rank = rank or max(a.max_rank for a in adapters)
    merged = {}
    for key in keys:
        present = [
            (adapter.weights[key], float(weight))
            for adapter, weight in zip(adapters, weights, strict=True)
            if key in adapter.weights
        ]
        if method in EXACT_METHODS:
            lora = _concatenate(key, present)
        else:
            # float32 whatever the adapters' dtype: trimming, sign election and SVD need it.
            deltas = torch.stack([w.b.float() @ w.a.float() for w, _ in present])
            factors = torch.tensor([factor for _, factor in present], device=device)
            dense = _combine(method, deltas, factors, density, generator)
            lora = _truncated_svd(dense, target_rank)
        merged[key] = LoraWeights(lora.a.to(dtype), lora.b.to(dtype))
    max_rank = max(w.rank for w in merged.values())
    projections = sorted({proj for _, proj in merged}, key=_PROJ_ORDER.__getitem__)
    # The scaling is folded into B, so the config says alpha = r (scaling 1), as PEFT's does.
    config = AdapterConfig(r=max_rank, lora_alpha=max_rank, target_modules=tuple(projections))
    path = f"merged:{method}({', '.join(a.path for a in adapters)})"
    return LoraAdapter(path, config, merged, adapters[0].base_signature)


def _check_arguments(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    method: str,
    density: float,
    rank: int | None,
) -> None:
    if not adapters:
        raise InvalidRequest("no adapters to merge")
    if len(weights) != len(adapters):
        raise InvalidRequest(f"{len(weights)} weights for {len(adapters)} adapters")
    for weight in weights:
        if not _is_real(weight) or not math.isfinite(weight):
            raise InvalidRequest(f"merge weight {weight!r} is not a finite number")
    if method not in METHODS:
        raise InvalidRequest(f"unknown merge method {method!r}; supported: {', '.join(METHODS)}")
    if not _is_real(density) or not 0.0 < density <= 1.0:
        raise InvalidRequest(f"density {density!r} is not in (0, 1]")
    if density != 1.0 and method not in _PRUNING_METHODS:
        # Refused rather than ignored: the caller expects pruning that would not happen.
        raise InvalidRequest(f"density applies to {', '.join(_PRUNING_METHODS)}, not {method!r}")
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
            raise InvalidRequest(f"rank {rank!r} is not in 1..{MAX_RANK}")
        if method in EXACT_METHODS:
            raise InvalidRequest(
                f"method {method!r} is exact (its rank is the sum of the inputs' ranks) and "
                "takes no rank; use 'svd' for a weighted sum at a given rank"
            )
    if len({a.base_signature for a in adapters}) > 1:
        raise AdapterError("the adapters to merge were loaded for base models of other shapes")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _concatenate(key: tuple[int, str], present: list[tuple[LoraWeights, float]]) -> LoraWeights:
    """sum_i w_i B_i A_i = [w_1 B_1 | w_2 B_2 | ...] @ [A_1; A_2; ...], exactly."""
    rank = sum(w.rank for w, _ in present)
    if rank > MAX_RANK:
        layer, proj = key
        raise AdapterError(
            f"the exact merge of layer {layer} {proj} would have rank {rank}, over the limit of "
            f"{MAX_RANK}; use method 'svd' (or ties / dare_*) with a rank"
        )
    a = torch.cat([w.a.float() for w, _ in present])
    b = torch.cat([w.b.float() * factor for w, factor in present], dim=1)
    return LoraWeights(a, b)


def _combine(
    method: str,
    deltas: torch.Tensor,
    factors: torch.Tensor,
    density: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """peft.utils.merge_utils' task_arithmetic / ties / dare_linear / dare_ties (majority sign
    "total") on deltas [n, out, in] with weights [n]; one dense delta [out, in]."""
    if density < 1.0 and method == "ties":
        deltas = torch.stack([_keep_largest(d, density) for d in deltas])
    elif density < 1.0 and method.startswith("dare"):
        # One draw per adapter, in order, as PEFT's random_pruning does.
        masks = [torch.bernoulli(torch.full_like(d, density), generator=generator) for d in deltas]
        deltas = deltas * torch.stack(masks) / density
    weighted = deltas * factors.view(-1, 1, 1)
    if method in ("svd", "dare_linear"):
        return weighted.sum(0)
    # TIES: as in PEFT, the sign is elected from the unweighted (trimmed) deltas, and the mean
    # is over the adapters whose entry is non-zero with that sign.
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agrees = deltas.sign() == sign
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The delta with all but its int(density * numel) largest-magnitude entries zeroed."""
    mask = torch.zeros(delta.numel(), device=delta.device)
    mask[delta.abs().flatten().topk(int(density * delta.numel())).indices] = 1.0
    return delta * mask.view_as(delta)


def _truncated_svd(delta: torch.Tensor, rank: int) -> LoraWeights:
    """The best rank-`rank` approximation of delta [out, in] as LoRA factors."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, s.numel())
    # As PEFT (after kohya-ss's svd_merge_lora): A has orthonormal rows, B = U S carries the
    # singular values.
    return LoraWeights(a=vh[:rank], b=u[:, :rank] * s[:rank])


def save_adapter(adapter: LoraAdapter, out_dir: str | Path) -> Path:
    """Write `adapter` as a PEFT LoRA directory that `load_adapter` and PEFT read back to the
    same weights. The scaling is already folded into B, so every module gets alpha = its rank
    (scaling 1) through `rank_pattern` / `alpha_pattern`, which also carry per-module ranks."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for (layer, proj), weights in sorted(adapter.weights.items()):
        module = f"model.layers.{layer}.{PROJECTIONS[proj][0]}.{proj}"
        tensors[f"base_model.model.{module}.lora_A.weight"] = weights.a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = weights.b.contiguous()
        ranks[module] = weights.rank
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.max_rank,
        "lora_alpha": adapter.max_rank,
        "rank_pattern": ranks,
        "alpha_pattern": ranks,
        "target_modules": sorted(adapter.projections),
        "bias": "none",
        "use_rslora": False,
        "lora_dropout": 0.0,
        "base_model_name_or_path": None,
    }
    save_file(tensors, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # Provenance beside PEFT's files (PEFT's config refuses keys it does not know).
    (out / "tandem_merge.json").write_text(json.dumps({"merged": adapter.path}) + "\n")
    return out
