"""What one forward pass computes: a flat batch of new tokens from several sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Tokens of all scheduled sequences, concatenated in sequence order.

    Sequence i contributes `query_lens[i]` new tokens at positions
    `context_lens[i] - query_lens[i] .. context_lens[i] - 1`; its keys and values for the whole
    context (cached + new) live at `context_slots[i]`. The new tokens' K/V are written to
    `slot_mapping`. Logits are computed only for rows `logits_indices` (usually the last new token
    of each sequence that samples this step).
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: KV slot of each new token
    query_lens: list[int]
    context_lens: list[int]
    context_slots: list[torch.Tensor]  # per sequence [context_len] int64
    logits_indices: torch.Tensor  # [S] int64 rows of the flat batch to project to logits

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @classmethod
    def build(
        cls,
        token_ids: list[list[int]],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        logits_rows: list[bool] | None = None,
    ) -> ForwardBatch:
        """token_ids[i]: the new tokens of sequence i; context_lens[i]: its length after them."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_slots = []
        logits_indices = []
        for i, (new, ctx, table) in enumerate(
            zip(token_ids, context_lens, block_tables, strict=True)
        ):
            start = ctx - len(new)
            seq_slots = _slots(table, ctx, block_size)
            input_ids.extend(new)
            positions.extend(range(start, ctx))
            slots.extend(seq_slots[start:].tolist())
            context_slots.append(seq_slots)
            if logits_rows is None or logits_rows[i]:
                logits_indices.append(len(input_ids) - 1)
        return cls(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_lens=[len(t) for t in token_ids],
            context_lens=list(context_lens),
            context_slots=context_slots,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
        )


def _slots(block_table: list[int], length: int, block_size: int) -> torch.Tensor:
    blocks = torch.tensor(block_table[: (length + block_size - 1) // block_size], dtype=torch.int64)
    offsets = torch.arange(block_size, dtype=torch.int64)
    return (blocks[:, None] * block_size + offsets[None, :]).flatten()[:length]
