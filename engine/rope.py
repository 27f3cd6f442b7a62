"""Rotary position embeddings, neox style (rotate_half) as in Hugging Face Llama/Qwen/Mistral."""

from __future__ import annotations

import math

import torch

from engine.config import RopeScaling

_INITIAL_TABLE_LEN = 4096


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """[head_dim // 2] float32 angular speeds, scaled like transformers' ROPE_INIT_FUNCTIONS."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: slow (long-wavelength) frequencies are divided by `factor`, fast ones are kept,
    and the band between is interpolated smoothly."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Keeps cos/sin tables [max_position, head_dim // 2] and grows them when a longer position
    shows up, so a forward pass only gathers rows."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling, dtype: torch.dtype):
        self.head_dim = head_dim
        self.dtype = dtype
        self._inv_freq = inverse_frequencies(head_dim, theta, scaling)
        self._cos = torch.empty(0, head_dim // 2, dtype=dtype)
        self._sin = torch.empty(0, head_dim // 2, dtype=dtype)
        self._extend(_INITIAL_TABLE_LEN)

    def _extend(self, length: int) -> None:
        # fp32 angles, rounded to the model dtype once, as transformers does per forward.
        angles = torch.outer(torch.arange(length, dtype=torch.float32), self._inv_freq)
        self._cos = angles.cos().to(self.dtype)
        self._sin = angles.sin().to(self.dtype)

    def cos_sin(
        self, positions: torch.Tensor, bound: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the tables for `positions` [T]: cos, sin [T, head_dim // 2]. `bound`: a
        number above every position where the caller knows one (it spares a reduction)."""
        if bound is not None:
            needed = bound
        else:
            needed = int(positions.max()) + 1 if positions.numel() else 0
        cos, sin = self.tables(needed)
        return cos[positions], sin[positions]

    def tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin tables [P, head_dim // 2] (row p: position p), P >= length."""
        if length > self._cos.shape[0]:
            self._extend(max(length, 2 * self._cos.shape[0]))
        return self._cos, self._sin
