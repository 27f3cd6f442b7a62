"""kernels.lora: the PyTorch path (dense and segmented) and the Triton kernels (interpreted on CPU
tensors, TRITON_INTERPRET=1) against a float64 loop over the entries."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kernels import lora
from kernels.lora import LoraMapping, LoraStack, lora_ref, lora_triton

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_stack(
    ranks: tuple[int, ...],
    slices: tuple[tuple[int, int], ...],
    k: int,
    dtype: torch.dtype,
    column_major: bool = False,
) -> LoraStack:
    """column_major: B as a transposed view (the kernels take any strides)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(len(slices), sum(ranks), k, generator=generator) / k**0.5
    b = torch.randn(sum(width for _, width in slices), sum(ranks), generator=generator)
    b = b.to(dtype)
    if column_major:
        b = b.t().contiguous().t()
    return LoraStack(a.to(dtype), b, slices, ranks)


def expected(y: torch.Tensor, x: torch.Tensor, stack: LoraStack, runs: list) -> torch.Tensor:
    """float64, one (row, slot) entry at a time."""
    out = y.double().clone()
    for first, count, uses in runs:
        for row in range(first, first + count):
            for slot, weight in uses:
                rank, column = stack.slot_ranks[slot], stack.slot_offsets[slot]
                for p, (start, width) in enumerate(stack.slices):
                    a = stack.a[p, column : column + rank].double()
                    b = stack.b_slices[p][:, column : column + rank].double()
                    out[row, start : start + width] += weight * (b @ (a @ x[row].double()))
    return out


# (name, slot ranks, slices (first column, width) of an output of width N, K, N, runs,
# B column-major)
CASES = [
    (
        # Decode-sized: mixed ranks padded to one tile, a rank-0 slot, a slot nobody uses (an
        # empty segment), rows without adapters, a row with two adapters (two waves), slices
        # with a gap (q and v of a fused qkv without k).
        "decode",
        (4, 0, 17, 1, 8),
        ((0, 40), (64, 24)),
        100,
        88,
        [(0, 1, [(0, 1.0)]), (1, 1, []), (2, 1, [(2, 0.5), (3, -1.0)]), (3, 2, [(2, 1.0)])],
        False,
    ),
    (
        # B column-major: the segmented path and the Triton kernels take any strides.
        "decode-column-major-b",
        (8, 3),
        ((0, 40), (40, 40)),
        64,
        80,
        [(0, 2, [(1, 1.0)]), (2, 1, [(0, 1.0)]), (3, 1, [])],
        True,
    ),
    (
        # Prefill-sized: segments longer than one 16-row tile, the largest rank.
        "prefill",
        (64, 16),
        ((0, 96),),
        80,
        96,
        [(0, 30, [(1, 1.0)]), (30, 7, []), (37, 20, [(0, 0.25), (1, 2.0)]), (57, 3, [(0, 1.0)])],
        False,
    ),
]


def case_inputs(case: tuple, dtype: torch.dtype) -> tuple:
    _, ranks, slices, k, n, runs, column_major = case
    stack = make_stack(ranks, slices, k, dtype, column_major)
    tokens = max(first + count for first, count, _ in runs)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k, generator=generator).to(dtype)
    y = torch.randn(tokens, n, generator=generator).to(dtype)
    mapping = LoraMapping.build(tokens, len(ranks), runs)
    return stack, x, y, mapping, runs


def check(result: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(result.double(), oracle, atol=1e-4, rtol=1e-5)
    else:  # y is rounded to bf16 once more than the oracle
        torch.testing.assert_close(result.double(), oracle, atol=0.05, rtol=0.02)


@pytest.fixture(params=["dense", "segmented"])
def ref_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(lora, "DENSE_MAX_CELLS", 10**9 if request.param == "dense" else 0)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_against_float64(case: tuple, dtype: torch.dtype, ref_path: str) -> None:
    stack, x, y, mapping, runs = case_inputs(case, dtype)
    oracle = expected(y, x, stack, runs)
    untouched = y.clone()
    out = lora_ref(y, x, stack, mapping)
    assert out is y
    check(y, oracle, dtype)
    # Rows without adapters are left bit for bit as they were.
    adapted = {row for first, count, uses in runs if uses for row in range(first, first + count)}
    for row in set(range(y.shape[0])) - adapted:
        assert torch.equal(y[row], untouched[row])


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton kernels in Triton's interpreter (read when they are first launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_triton_equals_reference(
    case: tuple, dtype: torch.dtype, split_k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lora, "_split_k", lambda *_: split_k)
    stack, x, y, mapping, runs = case_inputs(case, dtype)
    oracle = expected(y, x, stack, runs)
    reference = lora_ref(y.clone(), x, stack, mapping)
    out = lora_triton(y, x, stack, mapping)
    assert out is y
    check(y, oracle, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(y, reference, atol=tolerance, rtol=tolerance)


@pytest.mark.usefixtures("interpret")
def test_triton_without_entries_or_ranks_leaves_y(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = make_stack((3, 5), ((0, 16),), 32, torch.float32)
    x, y = torch.randn(4, 32), torch.randn(4, 16)
    before = y.clone()
    for fn in (lora_ref, lora_triton):
        fn(y, x, stack, LoraMapping.build(4, 2, [(0, 4, [])]))
        assert torch.equal(y, before)
    empty = make_stack((0, 0), ((0, 16),), 32, torch.float32)
    for fn in (lora_ref, lora_triton):
        fn(y, x, empty, LoraMapping.build(4, 2, [(0, 4, [(1, 1.0)])]))
        assert torch.equal(y, before)


def test_mapping_groups_entries_by_wave_then_slot() -> None:
    mapping = LoraMapping.build(
        6, 3, [(0, 2, [(2, 1.0), (0, 0.5)]), (2, 1, []), (3, 3, [(0, 2.0)])]
    )
    assert mapping.segments == ((0, 0, 3), (2, 3, 2), (0, 5, 2))  # (slot, first, length)
    assert mapping.waves == ((0, 2), (2, 1))
    assert mapping.token_indices.tolist() == [3, 4, 5, 0, 1, 0, 1]
    assert mapping.token_weights.tolist() == [2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    # Consecutive rows of weight 1 (only slot 2's) are read and added as a slice.
    assert mapping.plain_starts == (-1, 0, -1)
    assert LoraMapping.build(4, 1, [(0, 1, [(0, 1.0)]), (2, 2, [(0, 1.0)])]).plain_starts == (-1,)
    weights = mapping.slot_weights()
    assert weights.tolist() == [
        [0.5, 0.0, 1.0],
        [0.5, 0.0, 1.0],
        [0.0, 0.0, 0.0],
        [2.0, 0.0, 0.0],
        [2.0, 0.0, 0.0],
        [2.0, 0.0, 0.0],
    ]
    columns = mapping.column_mask((1, 2, 0), torch.bfloat16)
    assert columns is not None and columns.dtype == torch.bfloat16
    assert columns[0].tolist() == [0.5, 0.0, 0.0]
    # One slot on every row with weight 1: no mask at all; weights 0 or 1: a bit mask.
    single = LoraMapping.build(3, 1, [(0, 3, [(0, 1.0)])])
    assert single.column_mask((4,), torch.float32) is None
    bits = LoraMapping.build(3, 2, [(0, 1, [(1, 1.0)]), (1, 2, [(0, 1.0)])])
    expected_bits = [[0, -1, -1], [-1, 0, 0], [-1, 0, 0]]
    assert bits.column_mask((1, 2), torch.bfloat16).tolist() == expected_bits
    assert bits.column_mask((1, 2), torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="slot 3"):
        LoraMapping.build(2, 3, [(0, 2, [(3, 1.0)])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_segments_of_consecutive_rows_equal_the_gathered_form(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """A prefill of several prompts, most under an adapter of their own: the slices of x and y
    give the very bits of the gathered form (slot 0's two prompts keep that form)."""
    monkeypatch.setattr(lora, "DENSE_MAX_CELLS", 0)
    ranks, slices = (16, 8, 0, 32), ((0, 96), (96, 16), (112, 16))
    stack = make_stack(ranks, slices, 80, dtype)
    runs = [(0, 40, [(1, 1.0)]), (40, 3, []), (43, 33, [(0, 1.0)]), (76, 21, [(3, 1.0)])]
    runs += [(97, 5, [(2, 1.0)]), (102, 9, [(0, 1.0)])]
    mapping = LoraMapping.build(111, len(ranks), runs)
    assert mapping.plain_starts == (-1, 0, 97, 76)  # segments by slot: 0, 1, 2, 3
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(111, 80, generator=generator).to(dtype)
    y = torch.randn(111, 128, generator=generator).to(dtype)
    gathered_form = dataclasses.replace(mapping, plain_starts=(-1,) * len(mapping.segments))
    gathered = lora_ref(y.clone(), x, stack, gathered_form)
    assert torch.equal(lora_ref(y.clone(), x, stack, mapping), gathered)
    check(gathered, expected(y, x, stack, runs), dtype)


def test_stack_checks_its_shapes() -> None:
    with pytest.raises(ValueError, match="A is"):
        LoraStack(torch.zeros(1, 5, 8), torch.zeros(4, 6), ((0, 4),), (2, 4))
    with pytest.raises(ValueError, match="B is"):
        LoraStack(torch.zeros(1, 6, 8), torch.zeros(5, 6), ((0, 4),), (2, 4))


def test_triton_kernels_compile_for_a_gpu(compile_for_h100) -> None:
    """No GPU here: compile both kernels (bf16, the serving dtype) to PTX and SASS for an H100
    (sm_90), which catches what the interpreter lets through (types, dot shapes, control
    flow)."""
    dtype = "bf16"

    shrink, expand = lora._jitted(False)
    precision = {"PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST": dtype == "fp32"}
    pointers = {
        "x_ptr": dtype,
        "a_ptr": dtype,
        "b_ptr": dtype,
        "y_ptr": dtype,
        "v_ptr": "fp32",
        "weight_ptr": "fp32",
        "token_ptr": "i64",
        "seg_start_ptr": "i64",
        "seg_len_ptr": "i64",
        "seg_slot_ptr": "i64",
    }
    kernels = [
        (shrink, {"BLOCK_M": 16, "BLOCK_R": 64, "BLOCK_K": 64, "SPLIT_K": 4, **precision}),
        (expand, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 16, **precision}),
    ]
    for kernel, constants in kernels:
        compile_for_h100(kernel, constants, pointers, "i32")


@pytest.mark.parametrize(
    ("ranks", "runs", "mask_kind"),
    [
        # One adapter of weight 1 per row (or none): the vector kernels' segmented form.
        ((16, 16, 8), [(0, 2, [(0, 1.0)]), (2, 3, [(2, 1.0)]), (5, 1, [])], "int16"),
        # The same with slots across the kernel's chunks of 16 or 32 columns, and their ends
        # inside a pair of columns.
        (
            (5, 40, 9),
            [(0, 1, [(1, 1.0)]), (1, 2, [(0, 1.0)]), (3, 1, []), (4, 2, [(2, 1.0)])],
            "int16",
        ),
        # Two adapters of weight 1 in adjacent slots: one range, segmented; or too wide: dense.
        ((8, 8, 16), [(0, 1, [(0, 1.0), (1, 1.0)]), (1, 1, [(2, 1.0)])], "int16"),
        ((200, 100, 8), [(0, 1, [(0, 1.0), (1, 1.0)]), (1, 2, [(2, 1.0)])], "int16"),
        # A row with two adapters, weights other than 1: the dense form.
        ((4, 0, 17, 1, 8), CASES[0][5], "float"),
        ((16,), [(0, 3, [(0, 1.0)])], "none"),
    ],
)
@pytest.mark.parametrize(
    ("dtype", "variant"),
    [
        (torch.bfloat16, "amx"),
        (torch.bfloat16, "avx512"),
        (torch.bfloat16, "avx2"),
        (torch.float32, "avx512"),
        (torch.float32, "avx2"),
    ],
)
@pytest.mark.parametrize(
    ("slices", "threads"),
    [
        # A gap between slices, the last wide: the AMX kernel runs it in one parallel region.
        (((0, 40), (56, 24), (80, 136)), 2),
        (((0, 40), (56, 24), (80, 136)), 1),
        # A slice narrower than a tile: the AMX kernel's calls one after the other.
        (((0, 40), (56, 8), (80, 136)), 2),
    ],
)
def test_dense_in_one_c_call_equals_the_ops_one_by_one(
    ranks: tuple,
    runs: list,
    mask_kind: str,
    dtype: torch.dtype,
    variant: str,
    slices: tuple,
    threads: int,
) -> None:
    """kernels.cpu_linear.lora_dense_ (what the dense path runs for decode batches) against the
    same dense path op by op: the same bits, whichever mask the rows' weights give, on one
    thread or two."""
    from kernels import cpu_linear

    if variant not in cpu_linear.variants(dtype):
        pytest.skip(f"this CPU cannot run the {variant} kernel")
    stack = make_stack(ranks, slices, 72, dtype)
    tokens = max(first + count for first, count, _ in runs)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 72, generator=generator).to(dtype)
    y = torch.randn(tokens, 230, generator=generator).to(dtype)
    mapping = LoraMapping.build(tokens, len(ranks), runs)
    mask = mapping.column_mask(stack.slot_ranks, dtype)
    kinds = {None: "none", torch.int16: "int16", dtype: "float"}
    wanted = "float" if mask_kind == "int16" and dtype.itemsize == 4 else mask_kind  # no int16 bits
    assert kinds[None if mask is None else mask.dtype] == wanted
    default, default_threads = cpu_linear.variants(dtype)[0], torch.get_num_threads()
    cpu_linear.set_variant(dtype, variant)
    torch.set_num_threads(threads)
    try:
        fused, one_by_one = y.clone(), y.clone()
        assert cpu_linear.lora_dense_(fused, x, stack.a2d, mask, stack.b, stack.slices)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(LoraStack, "dense_call", lambda self: None)
            lora._dense(one_by_one, x, stack, mapping)
    finally:
        cpu_linear.set_variant(dtype, default)
        torch.set_num_threads(default_threads)
    assert torch.equal(fused, one_by_one)
    assert not torch.equal(fused, y)  # the adapters did add something


def test_dense_c_call_refuses_what_it_cannot_take_and_leaves_y() -> None:
    """LoraDense checks its stack once and every call's tensors each time; a call it cannot
    take returns False with y untouched (kernels.lora then runs the ops one by one)."""
    from kernels import cpu_linear

    if not cpu_linear.kernel_available(torch.bfloat16):
        pytest.skip("no compiled kernel on this CPU")
    slices = ((0, 40), (40, 24))
    stack = make_stack((16, 16), slices, 64, torch.bfloat16)
    call = stack.dense_call()
    assert call is not None and stack.dense_call() is call  # prepared once
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(17, 64, generator=generator).to(torch.bfloat16)
    y = torch.randn(17, 64, generator=generator).to(torch.bfloat16)
    mask = LoraMapping.build(4, 2, [(0, 2, [(0, 1.0)]), (2, 2, [(1, 1.0)])]).column_mask(
        stack.slot_ranks, torch.bfloat16
    )
    shared = torch.randn(4, 128, generator=generator).to(torch.bfloat16)
    before = y.clone()
    refused = {
        "17 rows": (y, x, None),
        "x float32": (y[:4], x[:4].float(), mask),
        "y narrower than the slices": (y[:4, :63], x[:4], mask),
        "x strided": (y[:4], torch.randn(4, 128, generator=generator).to(y.dtype)[:, ::2], mask),
        "mask for 2 rows": (y[:4], x[:4], mask[:2]),
        "y overlaps x": (shared[:, 64:], shared[:, :64], mask),
    }
    for name, (out, rows, row_mask) in refused.items():
        assert call(out, rows, row_mask, None) is False, name
    assert torch.equal(y, before)
    assert call(y[:4], x[:4], mask, torch.zeros(1, dtype=torch.uint8)) is False  # skip length
    column_major = stack.b.t().contiguous().t()
    assert cpu_linear.LoraDense.prepare(stack.a2d, column_major, slices) is None
    assert cpu_linear.LoraDense.prepare(stack.a2d, stack.b[:-1], slices) is None  # B short
    assert call(y[:4], x[:4], mask, None) is True


def test_dense_in_one_c_call_does_not_read_the_a_of_idle_slots() -> None:
    """Four rank-16 slots, the batch uses 0 and 2: the groups of A of slots 1 and 3 are idle.
    Poisoned with NaN there, the result is still the op-by-op result of a clean stack (with
    0/1 weights the int16 mask clears NaN too; with 0.5 only a kernel that never read them
    stays finite, which the AMX kernel is)."""
    from kernels import cpu_linear

    slices = ((0, 40), (40, 24))
    runs_by_weight = {
        1.0: [(0, 2, [(0, 1.0)]), (2, 2, [(2, 1.0)])],
        0.5: [(0, 2, [(0, 0.5)]), (2, 2, [(2, 0.5)])],
    }
    for weight, runs in runs_by_weight.items():
        clean = make_stack((16, 16, 16, 16), slices, 64, torch.bfloat16)
        poisoned = LoraStack(clean.a.clone(), clean.b, slices, clean.slot_ranks)
        for slot in (1, 3):
            poisoned.a[:, 16 * slot : 16 * slot + 16] = torch.nan
        mapping = LoraMapping.build(4, 4, runs)
        skip = mapping.idle_groups(clean.slot_ranks, len(slices))
        assert skip.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(4, 64, generator=generator).to(torch.bfloat16)
        y = torch.randn(4, 64, generator=generator).to(torch.bfloat16)
        expected = y.clone()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(LoraStack, "dense_call", lambda self: None)
            lora._dense(expected, x, clean, mapping)
        if weight == 0.5 and "amx" not in cpu_linear.variants(torch.bfloat16):
            continue  # the AVX-512 kernel reads every row; only the AMX kernel skips groups
        out = y.clone()
        lora._dense(out, x, poisoned, mapping)
        assert torch.equal(out, expected), weight
