"""Multi-LoRA for a batch whose rows use different adapters (S-LoRA / Punica style).

For every row t of the batch and every adapter i the row uses with weight w:

    y[t] += w * B_i (A_i x[t])        (the adapter's scaling folded into B_i)

Two implementations with one signature, `lora_ref(y, x, stack, mapping)` (PyTorch: the CPU path
and the test oracle) and `lora_triton(y, x, stack, mapping)` (GPU; tested under
TRITON_INTERPRET=1). Both add into `y` in place and return it.

`LoraStack` holds the adapters of S slots for one projection, or for a fused group of
projections that read the same input (q/k/v, gate/up): a "slice" p is one projection, writing
the columns `slices[p]` of y. Ranks are not padded in memory: slot s owns the columns
`slot_offsets[s] : slot_offsets[s] + slot_ranks[s]` of A's rows and of B's columns (rank 0 for a
slot that does not adapt this projection); the Triton kernel pads ranks in its tiles only.

`LoraMapping` says which rows use which slots: "entries" (row, weight) grouped into segments of
one slot each, built once per forward pass and shared by every layer. A row that uses several
adapters has one entry per adapter, in different "waves": within a wave a row appears at most
once, so the expand kernel of one wave owns its rows and adds into y without atomics.

The PyTorch path computes small batches (decode) densely: one shrink GEMV of every row against
every slot's A, one mask of each row's columns by its weights, one expand GEMV (and add) per
projection, whatever the number of adapters: each weight is read once. Larger batches (prefill)
run one small GEMM pair per segment instead, computing only the rows that use the slot.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kernels.cpu_linear import LoraDense, linear, linear_add_

try:  # Triton is optional: the PyTorch path needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

# Batches of at most this many (row, slot) cells are computed densely (every row against every
# slot); larger ones segment by segment.
DENSE_MAX_CELLS = 1024
_UNPREPARED = object()  # LoraStack._dense_call before its first use


@dataclass
class LoraStack:
    """LoRA weights of S slots for one projection or one fused group of projections."""

    a: Tensor  # [P, R, K]: A of every slot and slice; R = sum(slot_ranks)
    b: Tensor  # [N_b, R]: B (scaling folded in); rows: the slices' output columns, in order
    slices: tuple[tuple[int, int], ...]  # per slice: (first column of y, width)
    slot_ranks: tuple[int, ...]  # per slot; 0 where the slot does not adapt this projection
    slot_offsets: tuple[int, ...] = field(init=False)
    max_rank: int = field(init=False)
    a2d: Tensor = field(init=False, repr=False)  # [P * R, K] view of `a`
    b_slices: tuple[Tensor, ...] = field(init=False, repr=False)  # [width, R] views of `b`
    _device_meta: dict[torch.device, tuple[Tensor, ...]] = field(
        default_factory=dict, init=False, repr=False
    )
    _dense_call: object = field(default=_UNPREPARED, init=False, repr=False)

    def __post_init__(self) -> None:
        offsets, total = [], 0
        for rank in self.slot_ranks:
            offsets.append(total)
            total += rank
        num_slices, columns, _ = self.a.shape
        widths = [width for _, width in self.slices]
        if columns != total or len(self.slices) != num_slices:
            raise ValueError(
                f"A is {tuple(self.a.shape)}, expected [{len(self.slices)}, {total}, K]"
            )
        if tuple(self.b.shape) != (sum(widths), total):
            raise ValueError(f"B is {tuple(self.b.shape)}, expected [{sum(widths)}, {total}]")
        self.slot_offsets = tuple(offsets)
        self.max_rank = max(self.slot_ranks, default=0)
        self.a2d = self.a.view(num_slices * columns, self.a.shape[2])
        self.b_slices = tuple(self.b.split(widths))

    @property
    def num_slots(self) -> int:
        return len(self.slot_ranks)

    @property
    def num_columns(self) -> int:
        return self.a.shape[1]

    def dense_call(self) -> LoraDense | None:
        """The dense path's one-C-call kernel for this stack (checked once), or None."""
        if self._dense_call is _UNPREPARED:
            self._dense_call = LoraDense.prepare(self.a2d, self.b, self.slices)
        return self._dense_call

    def device_meta(self, device: torch.device) -> tuple[Tensor, ...]:
        """(slot offsets, slot ranks, slice first columns, slice widths, slice first B rows) as
        int32 tensors on `device`, for the Triton kernels."""
        if device not in self._device_meta:
            b_rows = [0]
            for _, width in self.slices[:-1]:
                b_rows.append(b_rows[-1] + width)
            values = (
                self.slot_offsets,
                self.slot_ranks,
                [start for start, _ in self.slices],
                [width for _, width in self.slices],
                b_rows,
            )
            self._device_meta[device] = tuple(
                torch.tensor(v, dtype=torch.int32, device=device) for v in values
            )
        return self._device_meta[device]


# One run of consecutive rows that use the same adapters: (first row, number of rows,
# ((slot, weight), ...)).
Run = tuple[int, int, Sequence[tuple[int, float]]]


@dataclass
class LoraMapping:
    """Which rows of a batch use which slots, with which weights."""

    num_tokens: int
    num_slots: int
    token_indices: Tensor  # [M] int64: the row of every entry, grouped by segment
    token_weights: Tensor  # [M] float32
    seg_starts: Tensor  # [G] int64: first entry of each segment
    seg_lens: Tensor  # [G] int64
    seg_slots: Tensor  # [G] int64
    segments: tuple[tuple[int, int, int], ...]  # host copy: (slot, first entry, length)
    waves: tuple[tuple[int, int], ...]  # (first segment, number of segments) of each wave
    # Per segment: its first row where its rows are consecutive with weight 1 (a prompt's rows
    # under one adapter), else -1: such a segment reads and adds a slice of the rows in place.
    plain_starts: tuple[int, ...]
    _column_masks: dict[tuple, Tensor | None] = field(default_factory=dict, init=False, repr=False)
    _idle_groups: dict[tuple, Tensor | None] = field(default_factory=dict, init=False, repr=False)
    _slot_weights: Tensor | None = field(default=None, init=False, repr=False)

    @classmethod
    def build(
        cls,
        num_tokens: int,
        num_slots: int,
        runs: Sequence[Run],
        device: torch.device | str | None = None,
    ) -> LoraMapping:
        """Entries from runs of rows (disjoint): wave-major, then slot-major."""
        per_wave: list[dict[int, tuple[list[int], list[float]]]] = []
        for first, count, uses in runs:
            for lane, (slot, weight) in enumerate(uses):
                if not 0 <= slot < num_slots:
                    raise ValueError(f"slot {slot} is outside [0, {num_slots})")
                if lane == len(per_wave):
                    per_wave.append({})
                rows, weights = per_wave[lane].setdefault(slot, ([], []))
                rows.extend(range(first, first + count))
                weights.extend([float(weight)] * count)
        indices: list[int] = []
        weights: list[float] = []
        segments: list[tuple[int, int, int]] = []
        waves: list[tuple[int, int]] = []
        for wave in per_wave:
            waves.append((len(segments), len(wave)))
            for slot in sorted(wave):
                rows, row_weights = wave[slot]
                segments.append((slot, len(indices), len(rows)))
                indices.extend(rows)
                weights.extend(row_weights)

        def as_tensor(values: list, dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            num_tokens=num_tokens,
            num_slots=num_slots,
            token_indices=as_tensor(indices, torch.int64),
            token_weights=as_tensor(weights, torch.float32),
            seg_starts=as_tensor([s[1] for s in segments], torch.int64),
            seg_lens=as_tensor([s[2] for s in segments], torch.int64),
            seg_slots=as_tensor([s[0] for s in segments], torch.int64),
            segments=tuple(segments),
            waves=tuple(waves),
            plain_starts=tuple(
                _plain_start(indices[first : first + length], weights[first : first + length])
                for _, first, length in segments
            ),
        )

    @property
    def num_entries(self) -> int:
        return int(self.token_indices.shape[0])

    @property
    def max_segment_len(self) -> int:
        return max((length for _, _, length in self.segments), default=0)

    def slot_weights(self) -> Tensor:
        """[T, S] float32: the weight of each slot in each row (0 where unused)."""
        if self._slot_weights is None:
            weights = self.token_weights.new_zeros(self.num_tokens, self.num_slots)
            slots = self.seg_slots.repeat_interleave(self.seg_lens)
            weights.index_put_((self.token_indices, slots), self.token_weights, accumulate=True)
            self._slot_weights = weights
        return self._slot_weights

    def idle_groups(self, slot_ranks: tuple[int, ...], num_slices: int) -> Tensor | None:
        """uint8 [ceil(num_slices * sum(slot_ranks) / 16)]: 1 for each 16-row group of a stack's
        A (slices one after the other, slots in order within each) that holds no row of a slot
        this batch uses; None when every group holds one."""
        key = (slot_ranks, num_slices)
        if key not in self._idle_groups:
            used = {slot for slot, _, _ in self.segments}
            rows = torch.tensor(
                [slot in used for slot, rank in enumerate(slot_ranks) for _ in range(rank)],
                dtype=torch.bool,
            ).repeat(num_slices)
            groups = -(-rows.numel() // 16)
            padded = torch.zeros(groups * 16, dtype=torch.bool)
            padded[: rows.numel()] = rows
            idle = ~padded.view(groups, 16).any(1)
            self._idle_groups[key] = idle.to(torch.uint8) if bool(idle.any()) else None
        return self._idle_groups[key]

    def column_mask(self, slot_ranks: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
        """[T, sum(slot_ranks)]: each row's weight for every column of a stack with these ranks,
        or None when it is 1 everywhere (one slot used by every row). For 16-bit `dtype` and
        weights that are all 0 or 1 it is an int16 bit mask (0 or -1) to AND the values with:
        elementwise bf16 arithmetic is slow on the CPU, bitwise int16 is not."""
        key = (slot_ranks, dtype)
        if key not in self._column_masks:
            self._column_masks[key] = self._build_column_mask(slot_ranks, dtype)
        return self._column_masks[key]

    def _build_column_mask(self, slot_ranks: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
        weights = self.slot_weights()
        ones = weights.eq(1.0)
        if self.num_slots == 1 and bool(ones.all()):
            return None
        ranks = torch.tensor(slot_ranks, device=weights.device)
        columns = weights.repeat_interleave(ranks, dim=1, output_size=sum(slot_ranks))
        if dtype.itemsize == 2 and bool((ones | weights.eq(0.0)).all()):
            return columns.to(torch.int16).neg_()
        return columns.to(dtype)


# ---- the PyTorch path -----------------------------------------------------------------------


def lora_ref(y: Tensor, x: Tensor, stack: LoraStack, mapping: LoraMapping) -> Tensor:
    """y[t, slice p] += sum over the entries (t, slot s, w): w * B_s,p (A_s,p x[t]).

    y: [T, N] (updated in place), x: [T, K], both in the stack's dtype."""
    if not mapping.segments or stack.max_rank == 0:
        return y
    if stack.num_slots != mapping.num_slots:
        raise ValueError(f"stack has {stack.num_slots} slots, mapping {mapping.num_slots}")
    if uses_dense_path(stack, mapping):
        _dense(y, x, stack, mapping)
    else:
        _segmented(y, x, stack, mapping)
    return y


def uses_dense_path(stack: LoraStack, mapping: LoraMapping) -> bool:
    """Dense costs rows x all slots; segments cost a few ops each and only the rows they hold."""
    if mapping.num_tokens * stack.num_slots <= DENSE_MAX_CELLS:
        return True
    return stack.num_slots == 1 and 2 * mapping.num_entries >= mapping.num_tokens


def _dense(y: Tensor, x: Tensor, stack: LoraStack, mapping: LoraMapping) -> None:
    mask = mapping.column_mask(stack.slot_ranks, x.dtype)
    # Decode batches: the ops below in one C call (a step makes ~100 of these), which does not
    # read the A rows of slots that no row uses.
    skip = mapping.idle_groups(stack.slot_ranks, len(stack.slices))
    call = stack.dense_call()
    if call is not None and call(y, x, mask, skip):
        return
    tokens = x.shape[0]
    shrunk = linear(x, stack.a2d).view(tokens, len(stack.slices), stack.num_columns)
    if mask is None:
        pass
    elif mask.dtype == torch.int16:
        shrunk.view(torch.int16).bitwise_and_(mask.unsqueeze(1))
    else:
        shrunk.mul_(mask.unsqueeze(1))
    for p, ((start, width), b) in enumerate(zip(stack.slices, stack.b_slices, strict=True)):
        # The C GEMV (B row-major): torch's bf16 GEMMs of these shapes are several times slower.
        # It adds into y as it stores (a temporary and a bf16 add per slice cost ~20 us).
        linear_add_(y[:, start : start + width], shrunk[:, p], b)


def _plain_start(rows: list[int], weights: list[float]) -> int:
    """rows[0] if the rows are consecutive and every weight is 1, else -1."""
    if not rows:
        return -1
    consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
    return rows[0] if consecutive and all(w == 1.0 for w in weights) else -1


def _segmented(y: Tensor, x: Tensor, stack: LoraStack, mapping: LoraMapping) -> None:
    for (slot, first, length), row in zip(mapping.segments, mapping.plain_starts, strict=True):
        rank = stack.slot_ranks[slot]
        if rank == 0:
            continue
        column = stack.slot_offsets[slot]
        if row >= 0:
            _add_plain_segment(y[row : row + length], x[row : row + length], stack, column, rank)
            continue
        rows = mapping.token_indices[first : first + length]
        weights = mapping.token_weights[first : first + length].to(x.dtype)
        a = stack.a[:, column : column + rank]  # [P, rank, K]
        shrunk = torch.matmul(x.index_select(0, rows), a.transpose(1, 2))  # [P, n, rank]
        shrunk.mul_(weights[None, :, None])
        for p, ((start, width), b) in enumerate(zip(stack.slices, stack.b_slices, strict=True)):
            delta = shrunk[p] @ b[:, column : column + rank].t()
            # = index_add_ (a segment holds each row once), which costs ~10x this in bf16.
            out = y[:, start : start + width]
            out.index_copy_(0, rows, out.index_select(0, rows).add_(delta))


def _add_plain_segment(y: Tensor, x: Tensor, stack: LoraStack, column: int, rank: int) -> None:
    """_segmented's sums for consecutive rows of weight 1 on slices of x and y: no gather, no
    scatter, no weights; the same bits."""
    for p, ((start, width), b) in enumerate(zip(stack.slices, stack.b_slices, strict=True)):
        shrunk = x @ stack.a[p, column : column + rank].t()  # [n, rank]
        y[:, start : start + width] += shrunk @ b[:, column : column + rank].t()


# ---- the Triton path ------------------------------------------------------------------------


def _shrink_kernel(
    x_ptr,
    a_ptr,
    v_ptr,
    token_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    slot_offset_ptr,
    slot_rank_ptr,
    K,
    stride_xm,
    stride_xk,
    stride_ap,
    stride_ar,
    stride_ak,
    stride_vm,
    stride_vp,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """v[entry, p, :rank] (+)= x[row] @ A[p, slot columns].T for a tile of a segment's entries
    and a 1/SPLIT_K share of K (shares add up atomically into the zeroed float32 v)."""
    pid_m = tl.program_id(0)
    p = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    segment = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + segment)
    slot = tl.load(seg_slot_ptr + segment)
    rank = tl.load(slot_rank_ptr + slot)
    if pid_m * BLOCK_M < seg_len and rank > 0:
        column = tl.load(slot_offset_ptr + slot)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seg_len
        entries = tl.load(seg_start_ptr + segment) + offs_m
        rows = tl.load(token_ptr + entries, mask=m_mask, other=0)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        # Only builtins here (no tl.cdiv / tl.zeros, which are @jit functions of triton's
        # standard library that the interpreter cannot call unless it was on at import).
        k_tiles = (K + BLOCK_K - 1) // BLOCK_K
        k_share = (k_tiles + SPLIT_K - 1) // SPLIT_K * BLOCK_K
        k_begin = split * k_share
        k_end = tl.minimum(k_begin + k_share, K)
        acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x_tile = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            a_tile = tl.load(
                a_ptr
                + p * stride_ap
                + (column + offs_r)[None, :] * stride_ar
                + offs_k[:, None] * stride_ak,
                mask=r_mask[None, :] & k_mask[:, None],
                other=0.0,
            )
            if UPCAST:
                x_tile = x_tile.to(tl.float32)
                a_tile = a_tile.to(tl.float32)
            acc += tl.dot(x_tile, a_tile, input_precision=PRECISION)
        v_ptrs = v_ptr + entries[:, None] * stride_vm + p * stride_vp + offs_r[None, :]
        v_mask = m_mask[:, None] & r_mask[None, :]
        if SPLIT_K == 1:
            tl.store(v_ptrs, acc, mask=v_mask)
        else:
            tl.atomic_add(v_ptrs, acc, mask=v_mask)


def _expand_kernel(
    v_ptr,
    b_ptr,
    y_ptr,
    token_ptr,
    weight_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    slot_offset_ptr,
    slot_rank_ptr,
    slice_start_ptr,
    slice_width_ptr,
    slice_b_row_ptr,
    first_segment,
    num_slices,
    stride_vm,
    stride_vp,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y[row, slice columns] += w * v[entry, p] @ B[slice rows, slot columns].T for a tile of a
    segment's entries and of a slice's columns; the rows of one wave are distinct."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    segment = first_segment + tl.program_id(2) // num_slices
    p = tl.program_id(2) % num_slices
    seg_len = tl.load(seg_len_ptr + segment)
    slot = tl.load(seg_slot_ptr + segment)
    rank = tl.load(slot_rank_ptr + slot)
    width = tl.load(slice_width_ptr + p)
    if pid_m * BLOCK_M < seg_len and pid_n * BLOCK_N < width and rank > 0:
        column = tl.load(slot_offset_ptr + slot)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seg_len
        entries = tl.load(seg_start_ptr + segment) + offs_m
        rows = tl.load(token_ptr + entries, mask=m_mask, other=0)
        weights = tl.load(weight_ptr + entries, mask=m_mask, other=0.0)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        v = tl.load(
            v_ptr + entries[:, None] * stride_vm + p * stride_vp + offs_r[None, :],
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        v = v * weights[:, None]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < width
        b_tile = tl.load(
            b_ptr
            + (tl.load(slice_b_row_ptr + p) + offs_n)[None, :] * stride_bn
            + (column + offs_r)[:, None] * stride_br,
            mask=n_mask[None, :] & r_mask[:, None],
            other=0.0,
        )
        if UPCAST:
            delta = tl.dot(v, b_tile.to(tl.float32), input_precision=PRECISION)
        else:
            delta = tl.dot(v.to(b_tile.dtype), b_tile, input_precision=PRECISION)
        y_ptrs = (
            y_ptr
            + rows[:, None] * stride_ym
            + (tl.load(slice_start_ptr + p) + offs_n)[None, :] * stride_yn
        )
        y_mask = m_mask[:, None] & n_mask[None, :]
        y_tile = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y_tile.to(tl.float32) + delta).to(y_tile.dtype), mask=y_mask)


@functools.cache
def _jitted(interpret: bool) -> tuple:
    """The kernels, jitted on first use so that TRITON_INTERPRET is read then."""
    del interpret  # part of the cache key only
    return triton.jit(_shrink_kernel), triton.jit(_expand_kernel)


def triton_available() -> bool:
    return triton is not None


def _split_k(max_segment_len: int, k: int) -> int:
    """Decode-sized segments leave most of a GPU idle: split the long reduction instead."""
    if max_segment_len > 16:
        return 1
    return max(1, min(8, k // 512))


def lora_triton(y: Tensor, x: Tensor, stack: LoraStack, mapping: LoraMapping) -> Tensor:
    """Same as lora_ref, as two Triton launches per wave: shrink (split-K) and expand (+= y)."""
    if not mapping.segments or stack.max_rank == 0:
        return y
    if triton is None:
        raise RuntimeError("lora_triton needs triton, which is not installed")
    if stack.num_slots != mapping.num_slots:
        raise ValueError(f"stack has {stack.num_slots} slots, mapping {mapping.num_slots}")
    interpret = bool(triton.knobs.runtime.interpret)
    shrink, expand = _jitted(interpret)
    num_slices = len(stack.slices)
    block_r = max(16, triton.next_power_of_2(stack.max_rank))
    longest = mapping.max_segment_len
    block_m = 16 if longest <= 16 else 64
    split_k = _split_k(longest, x.shape[1])
    # The interpreter multiplies 16-bit tiles wrongly: it gets float32 tiles (exact products).
    upcast = interpret or x.dtype == torch.float32
    precision = "ieee" if upcast else "tf32"
    alloc = torch.zeros if split_k > 1 else torch.empty
    v = alloc((mapping.num_entries, num_slices, block_r), dtype=torch.float32, device=x.device)
    offsets, ranks, slice_starts, slice_widths, slice_b_rows = stack.device_meta(x.device)
    seg_args = (mapping.seg_starts, mapping.seg_lens, mapping.seg_slots, offsets, ranks)
    m_tiles = triton.cdiv(longest, block_m)
    shrink[(m_tiles, num_slices * split_k, len(mapping.segments))](
        x,
        stack.a,
        v,
        mapping.token_indices,
        *seg_args,
        x.shape[1],
        x.stride(0),
        x.stride(1),
        *stack.a.stride(),
        v.stride(0),
        v.stride(1),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=64,
        SPLIT_K=split_k,
        PRECISION=precision,
        UPCAST=upcast,
    )
    block_n = 64
    n_tiles = triton.cdiv(max(width for _, width in stack.slices), block_n)
    for first_segment, count in mapping.waves:
        wave_longest = max(length for _, _, length in mapping.segments[first_segment:][:count])
        expand[(triton.cdiv(wave_longest, block_m), n_tiles, count * num_slices)](
            v,
            stack.b,
            y,
            mapping.token_indices,
            mapping.token_weights,
            *seg_args,
            slice_starts,
            slice_widths,
            slice_b_rows,
            first_segment,
            num_slices,
            v.stride(0),
            v.stride(1),
            stack.b.stride(0),
            stack.b.stride(1),
            y.stride(0),
            y.stride(1),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            PRECISION=precision,
            UPCAST=upcast,
        )
    return y


def lora_apply(y: Tensor, x: Tensor, stack: LoraStack, mapping: LoraMapping) -> Tensor:
    """lora_triton on CUDA tensors when Triton is installed, else lora_ref."""
    if x.is_cuda and triton is not None:
        return lora_triton(y, x, stack, mapping)
    return lora_ref(y, x, stack, mapping)
