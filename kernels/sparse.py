"""Sparse activation (WINA / TEAL): a linear layer that skips negligible input channels.

For y = x W^T with W [N, K], input channel j of row t is kept when its score
|x[t, j]| * col_norms[j] (WINA; TEAL: col_norms = None, the score is |x[t, j]|) reaches the row's
threshold; y[t] sums only the kept columns. Weights are stored input-channel-major
(`weight_t` = W.T contiguous, [K, N]) so a skipped channel is a skipped contiguous row of memory.

Thresholds are per row: a calibrated per-layer constant repeated, or the k-th largest score of
the row (`top_k_thresholds`) for per-token top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor


def channel_scores(x: Tensor, col_norms: Tensor | None) -> Tensor:
    """float32 [T, K]: |x| (TEAL) or |x| * ||W[:, j]||_2 (WINA)."""
    scores = x.float().abs()
    return scores if col_norms is None else scores * col_norms.float()


def top_k_thresholds(scores: Tensor, keep: int) -> Tensor:
    """float32 [T]: each row's `keep`-th largest score, so `scores >= threshold` keeps `keep`
    channels (more only on ties)."""
    if keep >= scores.shape[-1]:
        return torch.full(scores.shape[:1], -torch.inf, device=scores.device)
    if keep <= 0:
        return torch.full(scores.shape[:1], torch.inf, device=scores.device)
    return scores.topk(keep, dim=-1, sorted=False).values.min(dim=-1).values


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
    """sparse_linear_ref's semantics; dispatches to the fastest path for the device and shape."""
    return sparse_linear_ref(x, weight_t, col_norms, thresholds, bias)
