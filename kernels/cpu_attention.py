"""Causal GQA attention of a step's query rows (prompt chunks, and any decode rows batched with
them) over the paged KV cache.

`prefill_attention_ref` runs torch's SDPA per sequence on K/V gathered from the cache.
`prefill_attention` runs kernels/csrc/prefill_attention.c instead for bf16 on CPUs with AVX-512
BF16 (head sizes in multiples of 16 up to 256): 3.3x torch's flash CPU kernel on a 512-token
prompt, as accurate, and the same bits for a row however its prompt was chunked or cached.
Anything else runs the reference.

Layout: q [T, hq, d] holds each sequence's rows in turn (query_lens[s] of them, the last
positions of its context_lens[s]); caches [slots, hk, d]; slot_table [S, L] int64, sequence s at
position p in slot slot_table[s, p]. Returns [T, hq, d] in q's dtype.
"""

from __future__ import annotations

import sysconfig
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.build import CSRC_DIR, BuildError, build_shared_library, cpu_flags, load_extension

_SOURCE = CSRC_DIR / "prefill_attention.c"
_FLAGS = (
    "-O3",
    "-fopenmp",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mfma",
    # Scheduling for this CPU only (no instructions beyond the flags above): 1.3x on a Zen 4.
    "-mtune=native",
    "-fno-math-errno",
    "-ffp-contract=off",
)
_REQUIRED_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"})
MAX_HEAD_SIZE = 256

_module: ModuleType | None = None
_loaded = False
_enabled = True
_load_lock = threading.Lock()


def prefill_attention_ref(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_table: Tensor,
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    scale: float,
    window: int | None,
) -> Tensor:
    """As the module says, with torch's SDPA."""
    out = torch.empty_like(q)
    start = 0
    for row, query_len, context_len in zip(slot_table, query_lens, context_lens, strict=True):
        end = start + query_len
        out[start:end] = _sequence_attention(
            q[start:end], key_cache, value_cache, row[:context_len], scale, window
        )
        start = end
    return out


def prefill_attention(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_table: Tensor,
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    scale: float,
    window: int | None,
) -> Tensor:
    """As prefill_attention_ref."""
    module = _kernels() if _enabled else None
    if module is None or not _fits(q, key_cache, value_cache, slot_table):
        return prefill_attention_ref(
            q, key_cache, value_cache, slot_table, query_lens, context_lens, scale, window
        )
    lengths = torch.tensor([*query_lens, *context_lens], dtype=torch.int64)
    sequences = len(query_lens)
    t, hq, d = q.shape
    out = q.new_empty(t, hq, d)
    module.prefill_attention(
        q.data_ptr(), q.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
        slot_table.data_ptr(), slot_table.stride(0), lengths.data_ptr(),
        lengths.data_ptr() + 8 * sequences, out.data_ptr(), sequences, hq, key_cache.shape[1],
        d, window or 0, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out


def kernel_available() -> bool:
    """Whether prefill_attention runs the C kernel here (for bf16 tensors that fit it)."""
    return _kernels() is not None


def enable_kernel(enabled: bool) -> None:
    """Run the C kernel where it fits (the default), or the reference always: for benchmarks
    that compare the two in one process."""
    global _enabled
    _enabled = enabled


def _fits(q: Tensor, key_cache: Tensor, value_cache: Tensor, slot_table: Tensor) -> bool:
    if q.dim() != 3 or key_cache.dim() != 3 or slot_table.dim() != 2:
        return False
    _, hq, d = q.shape
    hk = key_cache.shape[1]
    return (
        q.dtype is torch.bfloat16
        and key_cache.dtype is torch.bfloat16 and value_cache.dtype is torch.bfloat16
        and d % 16 == 0 and 0 < d <= MAX_HEAD_SIZE and hq % hk == 0
        and key_cache.shape[2] == d and value_cache.shape == key_cache.shape
        and key_cache.is_contiguous() and value_cache.is_contiguous()
        and q.stride(2) == 1 and q.stride(1) == d
        and slot_table.dtype is torch.int64 and slot_table.stride(1) == 1
        and q.is_cpu and key_cache.is_cpu and value_cache.is_cpu and slot_table.is_cpu
        and not (torch.is_grad_enabled() and q.requires_grad)
    )  # fmt: skip


def _sequence_attention(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    context_slots: Tensor,
    scale: float,
    window: int | None,
) -> Tensor:
    """q [n, heads, d] for the last n positions of one sequence, whose K/V are at
    context_slots."""
    query_len, context_len = q.shape[0], context_slots.shape[0]
    first_query = context_len - query_len
    # Keys older than the first query's window are never attended: skip gathering them.
    first_key = 0 if window is None else max(0, first_query - window + 1)
    slots = context_slots[first_key:]
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
) -> Tensor | None:
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


def _kernels() -> ModuleType | None:
    global _module, _loaded
    if not _loaded:
        with _load_lock:
            if not _loaded:
                _module = _build() if _REQUIRED_CPU_FLAGS.issubset(cpu_flags()) else None
                _loaded = True
    return _module


def _build() -> ModuleType | None:
    flags = (*_FLAGS, f"-I{sysconfig.get_paths()['include']}")
    try:
        return load_extension("prefill_attention", build_shared_library(_SOURCE, flags))
    except (BuildError, ImportError, OSError) as error:
        warnings.warn(
            f"cpu_attention: no prefill kernel ({error}); using torch's attention",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
