"""Gumbel-top-k: candidate tokens drawn without replacement, for constrained decoding (AWRS).

Adaptive weighted rejection sampling walks candidate tokens of one row of logits in the order in
which sampling without replacement from softmax(logits) would draw them, until the grammar
matcher accepts one. Gumbel-top-k gives that order in one pass: with G_v = -log(-log(U_v)) i.i.d.
Gumbel(0, 1) noise, the tokens sorted by decreasing key logits_v + G_v are distributed exactly as
successive draws without replacement (the first is a softmax sample, the second a sample of the
rest renormalised, ...), so the k largest keys are the first k draws.

The uniform noise U is an input, not drawn here: the engine fills it from per-request seeded
torch generators, so that a request's samples are reproducible whatever the batch it shares and
whichever implementation (CPU reference or GPU kernel) runs it.

- ``gumbel_topk_ref``: the PyTorch path (the CPU path and the test oracle);
- ``gumbel_topk_triton``: a Triton kernel extracts the top k of each (row, block of the
  vocabulary) by k rounds of argmax, and torch.topk merges the blocks' candidates;
- ``gumbel_topk``: the kernel for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1,
  Triton's interpreter: slow, for tests) when k <= KERNEL_MAX_K, else the reference.

Keys of -inf (from -inf logits) sort last; the ids that come with them are valid token ids
(in [0, V)) but otherwise unspecified, possibly repeated: a consumer stops at the first -inf key.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from kernels.cpu_ops import gumbel_topk_keys

try:  # Triton is optional: the PyTorch path needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

# Vocabulary entries per kernel program: the kernel's work is O(V k) whatever the block, so
# smaller blocks only buy parallelism (B = 1 still fills a GPU) for more candidates to merge
# (V / BLOCK_V * k per row, 1/16 of the row at k = 64).
BLOCK_V = 1024

# Above this k, k rounds of argmax over every block cost more than torch.topk's radix select:
# gumbel_topk takes the reference path (torch on the tensors' device) instead. On an H100
# (bench/bench_gpu_kernels.py) the kernel took 0.33-0.8x the reference's time up to k = 32, and
# 0.8-1.5x at k = 64 (1 and 8 rows, 32k and 131k vocabularies).
KERNEL_MAX_K = 32


def _check(logits: Tensor, uniform: Tensor, k: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits is {tuple(logits.shape)}, expected [B, V]")
    if uniform.shape != logits.shape:
        raise ValueError(f"uniform is {tuple(uniform.shape)}, logits {tuple(logits.shape)}")
    if uniform.device != logits.device:
        raise ValueError("logits and uniform must be on one device")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k = {k} is not in [1, V = {logits.shape[1]}]")


def gumbel_topk_ref(logits: Tensor, uniform: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """logits float32 [B, V] (finite or -inf), uniform float32 [B, V] in (0, 1), 1 <= k <= V.
    Returns (keys float32 [B, k], ids int64 [B, k]): per row the k largest keys
    logits + G (G = -log(-log(uniform))), in decreasing key order, and their token ids.
    A -inf logit gives a -inf key; such entries may appear at the end of a row (ids of -inf
    keys are unspecified but valid indices in [0, V)). The PyTorch reference: the CPU path
    and the test oracle."""
    _check(logits, uniform, k)
    keys = logits.float() - torch.log(-torch.log(uniform.float()))
    return torch.topk(keys, k, dim=1)


# ---------------------------------------------------------------------------------------------
# Triton kernel. Only builtins inside (the standard library's @jit functions, tl.max / tl.argmax,
# cannot be called by the interpreter unless it was on at import); the argmax is spelled
# tl.reduce((keys, positions), 0, combine) with the standard library's own tie-break-left
# combine: compiled, that is tl.argmax; interpreted, tl.reduce is patched and recognises the
# combine (numpy nanmax / nanargmax, which also returns the leftmost of equal maxima).

if triton is not None:
    _ARGMAX = tl.standard._argmax_combine_tie_break_left


def _block_topk_kernel(
    logits_ptr,
    uniform_ptr,
    keys_ptr,
    ids_ptr,
    V,
    k,
    stride_lb,
    stride_ub,
    BLOCK_V: tl.constexpr,
):
    """keys/ids[row, block, :k]: the block's k largest keys in decreasing order, and their token
    ids (once the block's entries run out, -inf keys with ids of the block's -inf entries)."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    start = block * BLOCK_V
    pos = tl.arange(0, BLOCK_V)
    mask = start + pos < V
    neg_inf = float("-inf")
    logits = tl.load(logits_ptr + row * stride_lb + start + pos, mask=mask, other=neg_inf)
    # other=0.5 keeps the noise finite off the row; those keys are -inf through the logits.
    u = tl.load(uniform_ptr + row * stride_ub + start + pos, mask=mask, other=0.5)
    keys = logits.to(tl.float32) - tl.log(-tl.log(u.to(tl.float32)))
    out = (row * tl.num_programs(1) + block) * k
    for i in range(k):
        best, taken = tl.reduce((keys, pos), 0, _ARGMAX)
        tl.store(keys_ptr + out + i, best)
        # Once only -inf keys are left, the leftmost wins: the block's first entry, always on the
        # row (start < V), so every id written is a valid token id.
        tl.store(ids_ptr + out + i, start + taken)
        # Out of the later rounds (a -inf key that is taken may come again: unspecified ids).
        keys = tl.where(pos == taken, neg_inf, keys)


@functools.cache
def _jitted(interpret: bool):
    """The kernel, jitted on first use so that TRITON_INTERPRET is read then."""
    del interpret  # part of the cache key only
    return triton.jit(_block_topk_kernel)


def triton_available() -> bool:
    return triton is not None


def gumbel_topk_triton(logits: Tensor, uniform: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Same as gumbel_topk_ref: the kernel writes each block's top k, torch.topk merges them."""
    if triton is None:
        raise RuntimeError("gumbel_topk_triton needs triton, which is not installed")
    _check(logits, uniform, k)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if uniform.stride(1) != 1:
        uniform = uniform.contiguous()
    batch, vocab = logits.shape
    num_blocks = triton.cdiv(vocab, BLOCK_V)
    keys = torch.empty(batch, num_blocks * k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(batch, num_blocks * k, dtype=torch.int32, device=logits.device)
    if batch > 0:
        kernel = _jitted(bool(triton.knobs.runtime.interpret))
        kernel[(batch, num_blocks)](
            logits,
            uniform,
            keys,
            ids,
            vocab,
            k,
            logits.stride(0),
            uniform.stride(0),
            BLOCK_V=BLOCK_V,
        )
    if num_blocks == 1:  # one block's top k: already the row's, in order
        return keys, ids.long()
    # Every token of the row's top k is in its block's top k: the merge sees all of them.
    keys, index = torch.topk(keys, k, dim=1)
    return keys, torch.gather(ids, 1, index).long()


def gumbel_topk(logits: Tensor, uniform: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Same semantics as gumbel_topk_ref: gumbel_topk_triton for CUDA tensors (for CPU tensors
    only under TRITON_INTERPRET=1) when Triton is installed and k <= KERNEL_MAX_K; float32 CPU
    tensors in C (kernels.cpu_ops.gumbel_topk_keys: the keys of kernels.cpu_ops.gumbel_keys,
    within an ulp or two of the reference's, u = 0 counted as the smallest normal number); else
    gumbel_topk_ref."""
    kernel_k = triton is not None and k <= KERNEL_MAX_K
    if kernel_k and (logits.is_cuda or triton.knobs.runtime.interpret):
        return gumbel_topk_triton(logits, uniform, k)
    top = gumbel_topk_keys(logits, uniform, k)  # float32 on the CPU: C, one pass
    return top if top is not None else gumbel_topk_ref(logits, uniform, k)
