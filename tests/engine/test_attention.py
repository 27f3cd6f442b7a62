"""engine.attention.paged_attention on steps that mix decode rows with prompt chunks: each row
against a float64 oracle, and a decode row the same bits as in a step of decodes alone."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, paged_attention
from engine.batch import ForwardBatch

BLOCK = 4
NUM_BLOCKS = 128
HQ, HK, D = 4, 2, 32


def _tables(context_lens: list[int]) -> list[list[int]]:
    """Sequence s owns blocks s, s + S, s + 2S, ... (interleaved, so slots are scattered)."""
    count = len(context_lens)
    return [list(range(s, NUM_BLOCKS, count))[: -(-n // BLOCK)] for s, n in enumerate(context_lens)]


def _metadata(
    query_lens: list[int], context_lens: list[int], tables: list[list[int]] | None = None
) -> AttentionMetadata:
    tables = tables or _tables(context_lens)
    tokens = [[1] * n for n in query_lens]
    return AttentionMetadata.from_batch(ForwardBatch.build(tokens, context_lens, tables, BLOCK))


def _oracle(q, key_cache, value_cache, meta: AttentionMetadata, window: int | None):
    out = torch.empty(q.shape, dtype=torch.float64)
    row = 0
    lengths = zip(meta.query_lens, meta.context_lens, strict=True)
    for s, (query_len, context_len) in enumerate(lengths):
        slots = meta.slot_table[s, :context_len]
        keys = key_cache[slots].double().repeat_interleave(HQ // HK, dim=1)
        values = value_cache[slots].double().repeat_interleave(HQ // HK, dim=1)
        for position in range(context_len - query_len, context_len):
            first = 0 if window is None else max(0, position - window + 1)
            scores = torch.einsum("hd,khd->hk", q[row].double(), keys[first : position + 1])
            weights = torch.softmax(scores * D**-0.5, dim=-1)
            out[row] = torch.einsum("hk,khd->hd", weights, values[first : position + 1])
            row += 1
    return out


# Decodes first then a prompt (the scheduler's usual order: row runs), and interleaved.
LAYOUTS = {
    "runs": ([1, 1, 9], [30, 7, 20]),
    "interleaved": ([1, 12, 1, 5, 1], [25, 40, 3, 5, 50]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_step_rows_match_oracle_and_decode_rows_their_decode_only_bits(
    layout: str, window: int | None, dtype: torch.dtype
) -> None:
    query_lens, context_lens = LAYOUTS[layout]
    meta = _metadata(query_lens, context_lens)
    generator = torch.Generator().manual_seed(len(query_lens))
    slots = NUM_BLOCKS * BLOCK
    key_cache, value_cache = (
        torch.randn(slots, HK, D, generator=generator).to(dtype) for _ in "kv"
    )
    q = torch.randn(sum(query_lens), HQ, D, generator=generator).to(dtype)
    got = paged_attention(q, key_cache, value_cache, meta, D**-0.5, window)

    tolerance = 1e-2 if dtype is torch.bfloat16 else 1e-5
    torch.testing.assert_close(
        got.double(),
        _oracle(q, key_cache, value_cache, meta, window),
        rtol=tolerance,
        atol=tolerance,
    )
    split = meta.row_split
    assert split is not None and split.decode.decode_only and not split.prompt.decode_only
    decoding = [s for s, n in enumerate(query_lens) if n == 1]
    tables = _tables(context_lens)
    alone = _metadata(
        [1] * len(decoding), [context_lens[s] for s in decoding], [tables[s] for s in decoding]
    )
    decode_rows = [sum(query_lens[:s]) for s in decoding]
    decode_only = paged_attention(q[decode_rows], key_cache, value_cache, alone, D**-0.5, window)
    assert torch.equal(got[decode_rows], decode_only)


def test_row_split_uses_views_for_runs_and_indices_otherwise() -> None:
    runs = _metadata(*LAYOUTS["runs"]).row_split
    assert runs is not None
    assert (runs.decode_rows, runs.prompt_rows) == (slice(0, 2), slice(2, 11))
    interleaved = _metadata(*LAYOUTS["interleaved"]).row_split
    assert interleaved is not None
    assert interleaved.decode_rows.tolist() == [0, 13, 19]
    assert interleaved.prompt_rows.tolist() == [*range(1, 13), *range(14, 19)]
    assert interleaved.prompt.query_lens == [12, 5] and interleaved.prompt.context_lens == [40, 5]
    assert _metadata([3, 9], [3, 9]).row_split is None
