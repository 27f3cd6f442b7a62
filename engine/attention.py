"""Paged causal attention on CPU over the flat per-layer KV pools of engine.kv_cache.KVCache.

Layout: q [T, heads, head_dim]; key/value pools [slots, kv_heads, head_dim]. The functions take
plain tensors plus `AttentionMetadata` (built once per forward pass, shared by all layers).
Decode-only steps run kernels.cpu_ops.decode_attention, which reads the cache at the slots
directly; steps with prompt tokens gather each sequence's K/V for torch's SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.batch import ForwardBatch, sequence_slots
from kernels.cpu_ops import decode_attention


@dataclass
class DecodeGather:
    """Every sequence's attended slots padded to one length, for one batched attention call."""

    slots: torch.Tensor  # [S, L] int64; row s is used up to lengths[s], then padding
    lengths: torch.Tensor  # [S] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where the new tokens' K/V go
    query_lens: list[int]
    context_lens: list[int]
    slot_table: torch.Tensor  # [S, L]: ForwardBatch.slot_table
    decode_only: bool
    # Layers may differ in sliding window (Qwen2), so the decode gather is cached per window.
    _decode_gathers: dict[int | None, DecodeGather] = field(
        default_factory=dict, init=False, repr=False
    )

    @classmethod
    def from_batch(cls, batch: ForwardBatch) -> AttentionMetadata:
        return cls(
            slot_mapping=batch.slot_mapping,
            query_lens=batch.query_lens,
            context_lens=batch.context_lens,
            slot_table=batch.slot_table,
            decode_only=batch.is_decode_only,
        )

    @property
    def context_slots(self) -> list[torch.Tensor]:
        """Per sequence, its KV slots [context_len]."""
        return sequence_slots(self.slot_table, self.context_lens)

    def decode_gather(self, window: int | None) -> DecodeGather:
        if window not in self._decode_gathers:
            if window is None or window >= max(self.context_lens):
                # No window cuts in: the slot table is the gather as it stands.
                gather = DecodeGather(
                    self.slot_table, torch.tensor(self.context_lens, dtype=torch.int64)
                )
            else:
                gather = _build_decode_gather(self.context_slots, window)
            self._decode_gathers[window] = gather
        return self._decode_gathers[window]


def _attended_slots(context_slots: torch.Tensor, window: int | None) -> torch.Tensor:
    """The slots the last token of a sequence may attend to."""
    if window is None or window >= context_slots.shape[0]:
        return context_slots
    return context_slots[-window:]


def _build_decode_gather(context_slots: list[torch.Tensor], window: int | None) -> DecodeGather:
    per_sequence = [_attended_slots(slots, window) for slots in context_slots]
    lengths = [s.shape[0] for s in per_sequence]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        slots = torch.stack(per_sequence)
    else:
        slots = torch.zeros(len(per_sequence), longest, dtype=torch.int64)
        for row, seq_slots in zip(slots, per_sequence, strict=True):
            row[: seq_slots.shape[0]] = seq_slots
    return DecodeGather(slots=slots, lengths=torch.tensor(lengths, dtype=torch.int64))


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Causal GQA attention of the new tokens' queries over their sequences' cached K/V (the new
    tokens' K/V must already be written). Returns [T, heads, head_dim] in q's dtype."""
    if meta.decode_only:
        gather = meta.decode_gather(window)
        return decode_attention(q, key_cache, value_cache, gather.slots, gather.lengths, scale)
    out = torch.empty_like(q)
    start = 0
    for query_len, context_len, slots in zip(
        meta.query_lens, meta.context_lens, meta.context_slots, strict=True
    ):
        end = start + query_len
        out[start:end] = _sequence_attention(
            q[start:end], key_cache, value_cache, slots, context_len, scale, window
        )
        start = end
    return out


def _sequence_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    context_slots: torch.Tensor,
    context_len: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """q [n, heads, d] for positions context_len - n .. context_len - 1 of one sequence."""
    query_len = q.shape[0]
    first_query = context_len - query_len
    # Keys older than the first query's window are never attended: skip gathering them.
    first_key = 0 if window is None else max(0, first_query - window + 1)
    slots = context_slots[first_key:context_len]
    keys = key_cache[slots].transpose(0, 1)
    values = value_cache[slots].transpose(0, 1)
    mask = _causal_mask(first_query, context_len, first_key, window)
    # A batch dimension of one: torch runs its fused (flash) CPU kernel only on 4-D inputs and
    # falls back to the unfused math path for 3-D ones (29 against 3 ms per layer for a
    # 512-token prompt of the benchmark model).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys[None],
        values[None],
        attn_mask=mask,
        is_causal=mask is None and query_len > 1,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _causal_mask(
    first_query: int, context_len: int, first_key: int, window: int | None
) -> torch.Tensor | None:
    """[n, L] bool (True = attend), or None when plain top-left causal masking is exact (no
    cached prefix and no window cutting in)."""
    no_window_cut = window is None or window >= context_len
    if first_query == 0 and no_window_cut:
        return None
    query_pos = torch.arange(first_query, context_len)[:, None]
    key_pos = torch.arange(first_key, context_len)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask
