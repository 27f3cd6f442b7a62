"""engine.batch.ForwardBatch and the decode gather built from it, against slots computed one
position at a time from the block tables."""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.batch import ForwardBatch

BLOCK = 4


def _slot(table: list[int], position: int) -> int:
    return table[position // BLOCK] * BLOCK + position % BLOCK


def test_build_lays_out_tokens_positions_and_slots() -> None:
    tables = [[7, 2, 9], [5], [3, 8, 1, 6]]
    new = [[11, 12, 13], [21], [31]]
    lengths = [10, 2, 13]  # a prefill chunk over a cached prefix, and two decodes
    batch = ForwardBatch.build(new, lengths, tables, BLOCK, logits_rows=[True, False, True])
    assert batch.input_ids.tolist() == [11, 12, 13, 21, 31]
    assert batch.positions.tolist() == [7, 8, 9, 1, 12]
    expected_slots = [_slot(tables[0], p) for p in (7, 8, 9)]
    expected_slots += [_slot(tables[1], 1), _slot(tables[2], 12)]
    assert batch.slot_mapping.tolist() == expected_slots
    assert batch.logits_indices.tolist() == [2, 4]
    assert batch.query_lens == [3, 1, 1] and not batch.is_decode_only
    for table, length, slots in zip(tables, lengths, batch.context_slots, strict=True):
        assert slots.tolist() == [_slot(table, p) for p in range(length)]


def test_decode_gather_is_each_sequences_slots_with_or_without_a_window() -> None:
    tables = [[4, 0, 2], [1, 3], [5]]
    lengths = [9, 6, 3]
    batch = ForwardBatch.build([[1], [2], [3]], lengths, tables, BLOCK)
    meta = AttentionMetadata.from_batch(batch)
    for window in (None, 100, 4):
        gather = meta.decode_gather(window)
        for row, (table, length) in enumerate(zip(tables, lengths, strict=True)):
            first = 0 if window is None else max(0, length - window)
            n = int(gather.lengths[row])
            assert n == length - first
            assert gather.slots[row, :n].tolist() == [_slot(table, p) for p in range(first, length)]
        assert gather.slots.is_contiguous() and gather.slots.dtype is torch.int64
