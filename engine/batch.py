"""What one forward pass computes: a flat batch of new tokens from several sequences."""

from __future__ import annotations

import functools
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
    # [S, L] int64: row i holds sequence i's KV slots in position order up to context_lens[i],
    # then padding (slots of block 0); L is the longest block table's span.
    slot_table: torch.Tensor
    # [S] int64 rows of the flat batch to project to logits, ascending, without repeats
    logits_indices: torch.Tensor

    @property
    def context_slots(self) -> list[torch.Tensor]:
        """Per sequence, its KV slots [context_len] (views of slot_table)."""
        return sequence_slots(self.slot_table, self.context_lens)

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
        # Small Python lists and one vectorised op for the slot table: a decode step builds a
        # batch per model it runs (the fused experts' too), and per-sequence tensor ops cost
        # tens of microseconds each there.
        spans = [-(-ctx // block_size) for ctx in context_lens]
        width = max(spans, default=0)
        blocks = torch.tensor(
            [
                table[:span] + [0] * (width - span)
                for table, span in zip(block_tables, spans, strict=True)
            ],
            dtype=torch.int64,
        ).view(len(spans), width)
        slot_table = torch.add(_offsets(block_size), blocks[:, :, None], alpha=block_size).view(
            len(spans), width * block_size
        )
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices = []
        for i, (new, ctx, table) in enumerate(
            zip(token_ids, context_lens, block_tables, strict=True)
        ):
            start = ctx - len(new)
            input_ids.extend(new)
            positions.extend(range(start, ctx))
            slots.extend(
                table[p // block_size] * block_size + p % block_size for p in range(start, ctx)
            )
            if logits_rows is None or logits_rows[i]:
                logits_indices.append(len(input_ids) - 1)
        # One tensor for the four lists (views of it): each torch call costs tens of us here.
        n = len(input_ids)
        flat = torch.tensor(input_ids + positions + slots + logits_indices, dtype=torch.int64)
        return cls(
            input_ids=flat[:n],
            positions=flat[n : 2 * n],
            slot_mapping=flat[2 * n : 3 * n],
            query_lens=[len(t) for t in token_ids],
            context_lens=list(context_lens),
            slot_table=slot_table,
            logits_indices=flat[3 * n :],
        )


@functools.cache
def _offsets(block_size: int) -> torch.Tensor:
    """0 .. block_size - 1, int64 (made once per block size; only read)."""
    return torch.arange(block_size, dtype=torch.int64)


def sequence_slots(slot_table: torch.Tensor, context_lens: list[int]) -> list[torch.Tensor]:
    """Row i of a slot table cut to context_lens[i]: sequence i's KV slots (views)."""
    return [row[:length] for row, length in zip(slot_table, context_lens, strict=True)]
