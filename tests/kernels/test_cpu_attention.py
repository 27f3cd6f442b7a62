"""kernels.cpu_attention: the prefill attention kernel and its torch reference against a float64
oracle written out with explicit masks, over a paged cache with scattered slots."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from kernels import cpu_attention
from kernels.build import cpu_flags

# On the CPU's flags, not on kernel_available(): where the CPU has them, a kernel that fails to
# build must fail these tests, not skip them.
needs_kernel = pytest.mark.skipif(
    not cpu_attention._REQUIRED_CPU_FLAGS.issubset(cpu_flags()),
    reason="this CPU has no AVX-512 BF16: prefill_attention runs the reference here",
)

NUM_SLOTS = 2048


@dataclass
class Case:
    q: torch.Tensor  # [T, hq, d], a view of wider rows as the engine's q is
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    slot_table: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    scale: float
    window: int | None

    def args(self) -> tuple:
        return (
            self.q, self.key_cache, self.value_cache, self.slot_table, self.query_lens,
            self.context_lens, self.scale, self.window,
        )  # fmt: skip


def make_case(
    query_lens: list[int],
    context_lens: list[int],
    hq: int,
    hk: int,
    d: int,
    window: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Case:
    generator = torch.Generator().manual_seed(seed)
    width = max(context_lens) + 5  # rows run past the longest context, as in the engine
    table = torch.randperm(NUM_SLOTS, generator=generator)[: len(context_lens) * width]
    caches = [torch.randn(NUM_SLOTS, hk, d, generator=generator).to(dtype) for _ in range(2)]
    rows = torch.randn(sum(query_lens), (hq + 2 * hk) * d, generator=generator).to(dtype)
    q = rows[:, : hq * d].view(-1, hq, d)
    return Case(
        q, *caches, table.view(len(context_lens), width), query_lens, context_lens, d**-0.5, window
    )


def oracle(case: Case) -> torch.Tensor:
    """float64, one query row at a time: softmax over exactly the keys its position may see."""
    hq, hk = case.q.shape[1], case.key_cache.shape[1]
    out = torch.empty(case.q.shape, dtype=torch.float64)
    row = 0
    for s, (query_len, context_len) in enumerate(
        zip(case.query_lens, case.context_lens, strict=True)
    ):
        slots = case.slot_table[s, :context_len]
        keys = case.key_cache[slots].double().repeat_interleave(hq // hk, dim=1)
        values = case.value_cache[slots].double().repeat_interleave(hq // hk, dim=1)
        for position in range(context_len - query_len, context_len):
            first = 0 if case.window is None else max(0, position - case.window + 1)
            q = case.q[row].double()  # [hq, d]
            scores = torch.einsum("hd,khd->hk", q, keys[first : position + 1]) * case.scale
            weights = torch.softmax(scores, dim=-1)
            out[row] = torch.einsum("hk,khd->hd", weights, values[first : position + 1])
            row += 1
    return out


CASES = {
    "one prompt": ([37], [37], 14, 2, 64, None),
    "prompt over a cached prefix": ([100], [300], 8, 2, 128, None),
    "prompts and decode rows": ([100, 1, 17, 1], [300, 50, 17, 2], 8, 2, 128, None),
    "window": ([100, 1, 17], [300, 50, 17], 8, 2, 128, 64),
    "window shorter than a block": ([33], [40], 4, 4, 80, 7),
    "head size 256": ([5, 16, 1], [200, 16, 1], 12, 3, 256, None),
    "head size 16, group 7": ([40], [40], 7, 1, 16, None),
    "long window over a prefix": ([200], [900], 4, 1, 32, 300),
    "window of one": ([40], [40], 4, 2, 64, 1),
    "context of one": ([1], [1], 4, 2, 64, None),
}


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_oracle_as_closely_as_torch(name: str, threads: int) -> None:
    case = make_case(*CASES[name], seed=len(name))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_attention.prefill_attention(*case.args())
    finally:
        torch.set_num_threads(previous)
    exact = oracle(case)
    torch_bf16 = cpu_attention.prefill_attention_ref(*case.args())
    assert got.dtype == torch.bfloat16 and got.shape == case.q.shape
    error = (got.double() - exact).abs()
    torch_error = (torch_bf16.double() - exact).abs()
    # The output's own rounding (half a bf16 unit) dominates both.
    assert error.max() <= 1.5 * torch_error.max()
    assert error.mean() <= 1.25 * torch_error.mean()


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_oracle(name: str) -> None:
    case = make_case(*CASES[name], dtype=torch.float32, seed=len(name))
    got = cpu_attention.prefill_attention_ref(*case.args())
    torch.testing.assert_close(got.double(), oracle(case), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("window", [None, 24])
def test_rows_get_the_same_bits_however_the_prompt_is_chunked(window: int | None) -> None:
    """The prefix cache and chunked prefill must not change a prompt's result."""
    whole = make_case([150], [150], 6, 2, 64, window)
    expected = cpu_attention.prefill_attention(*whole.args())
    start = 0
    for end in (1, 17, 40, 41, 100, 150):
        chunk = replace(whole, q=whole.q[start:end], query_lens=[end - start], context_lens=[end])
        got = cpu_attention.prefill_attention(*chunk.args())
        assert torch.equal(got, expected[start:end]), (start, end)
        start = end


@needs_kernel
def test_a_sequence_gets_the_same_bits_alone_or_batched() -> None:
    case = make_case([30, 1, 64], [90, 7, 64], 4, 2, 32, seed=3)
    together = cpu_attention.prefill_attention(*case.args())
    row = 0
    for s, (query_len, context_len) in enumerate(
        zip(case.query_lens, case.context_lens, strict=True)
    ):
        alone = cpu_attention.prefill_attention(
            case.q[row : row + query_len], case.key_cache, case.value_cache,
            case.slot_table[s : s + 1], [query_len], [context_len], case.scale, case.window,
        )  # fmt: skip
        assert torch.equal(alone, together[row : row + query_len])
        row += query_len


@needs_kernel
def test_slots_a_sequence_does_not_attend_are_never_read() -> None:
    """Slots past a context, or before its window, may hold anything (NaN here)."""
    case = make_case([20, 5], [20, 60], 4, 2, 64, window=16, seed=4)
    expected = cpu_attention.prefill_attention(*case.args())
    unread = torch.ones(NUM_SLOTS, dtype=torch.bool)
    unread[case.slot_table[0, :20]] = False
    unread[case.slot_table[1, 60 - 5 - 15 : 60]] = False
    case.key_cache[unread] = float("nan")
    case.value_cache[unread] = float("nan")
    assert torch.equal(cpu_attention.prefill_attention(*case.args()), expected)


def test_what_the_kernel_does_not_take_runs_the_reference() -> None:
    """float32, and head sizes that are not a multiple of 16, give the reference's result."""
    for dtype, d in ((torch.float32, 64), (torch.bfloat16, 24)):
        case = make_case([9, 1], [12, 30], 4, 2, d, dtype=dtype)
        got = cpu_attention.prefill_attention(*case.args())
        assert torch.equal(got, cpu_attention.prefill_attention_ref(*case.args()))


@needs_kernel
def test_enable_kernel_switches_to_the_reference_and_back() -> None:
    case = make_case([40], [40], 4, 2, 64)
    kernel = cpu_attention.prefill_attention(*case.args())
    cpu_attention.enable_kernel(False)
    try:
        reference = cpu_attention.prefill_attention(*case.args())
    finally:
        cpu_attention.enable_kernel(True)
    assert torch.equal(reference, cpu_attention.prefill_attention_ref(*case.args()))
    assert not torch.equal(kernel, reference)  # the two round differently
    assert torch.equal(cpu_attention.prefill_attention(*case.args()), kernel)
