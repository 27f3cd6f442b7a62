"""Paged causal attention on CPU over the flat per-layer KV pools of engine.kv_cache.KVCache.

Layout: q [T, heads, head_dim]; key/value pools [slots, kv_heads, head_dim]. The functions take
plain tensors plus `AttentionMetadata` (built once per forward pass, shared by all layers).
Decode rows (one new token) run kernels.cpu_ops.decode_attention, prompt rows
kernels.cpu_attention.prefill_attention; a step with both splits its rows between them, so a
decode row gets the same kernel, and the same bits, whether or not a prompt joined its step.
Both read the cache at the slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate

import torch

from engine.batch import ForwardBatch, sequence_slots
from kernels.cpu_attention import prefill_attention
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

    @cached_property
    def row_split(self) -> RowSplit | None:
        """The decode rows apart from the prompt rows, where a step has both (else None)."""
        return _split_rows(self)


@dataclass
class RowSplit:
    """A step's decode rows and prompt rows (slices where they are runs), each with its
    sequences' metadata."""

    decode_rows: slice | torch.Tensor
    decode: AttentionMetadata
    prompt_rows: slice | torch.Tensor
    prompt: AttentionMetadata


def _split_rows(meta: AttentionMetadata) -> RowSplit | None:
    decoding = [s for s, n in enumerate(meta.query_lens) if n == 1]
    if meta.decode_only or not decoding:
        return None
    prompts = [s for s, n in enumerate(meta.query_lens) if n != 1]
    starts = list(accumulate(meta.query_lens, initial=0))
    return RowSplit(*_part(meta, starts, decoding), *_part(meta, starts, prompts))


def _part(
    meta: AttentionMetadata, starts: list[int], sequences: list[int]
) -> tuple[slice | torch.Tensor, AttentionMetadata]:
    """The rows of some of the sequences (ascending indices), and their metadata."""
    rows = _index([r for s in sequences for r in range(starts[s], starts[s + 1])])
    query_lens = [meta.query_lens[s] for s in sequences]
    return rows, AttentionMetadata(
        slot_mapping=meta.slot_mapping[rows],
        query_lens=query_lens,
        context_lens=[meta.context_lens[s] for s in sequences],
        slot_table=meta.slot_table[_index(sequences)],
        decode_only=all(n == 1 for n in query_lens),
    )


def _index(positions: list[int]) -> slice | torch.Tensor:
    """positions (ascending) as a slice where they are a run (views, no copies), else a tensor."""
    if positions[-1] - positions[0] == len(positions) - 1:
        return slice(positions[0], positions[-1] + 1)
    return torch.tensor(positions, dtype=torch.int64)


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
    split = meta.row_split
    if split is not None:
        out = torch.empty_like(q)
        for rows, part in ((split.decode_rows, split.decode), (split.prompt_rows, split.prompt)):
            out[rows] = paged_attention(q[rows], key_cache, value_cache, part, scale, window)
        return out
    return prefill_attention(
        q, key_cache, value_cache, meta.slot_table, meta.query_lens, meta.context_lens, scale,
        window,
    )  # fmt: skip
