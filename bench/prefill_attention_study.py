"""Runs bench/prefill_attention_study.c (build it as its header says) against torch's
scaled_dot_product_attention on one thread: error against a float32 reference and time, for
the benchmark model's attention shape (14 query heads, 2 KV heads, head size 64). Prints
figures, asserts nothing."""

from __future__ import annotations

import ctypes
import time

import torch
import torch.nn.functional as F

LIBRARY = "/tmp/libprefill_attention_study.so"
SCALE = 0.125


def study(lib, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n, heads, dim = q.shape
    out = torch.empty(n, heads, dim)
    packed = ((n + 15) // 16) * 16 * dim
    k_pairs = torch.empty(packed, dtype=torch.int16)
    v_pairs = torch.empty(packed, dtype=torch.int16)
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in (q, k, v, out)]
    lib.attention(
        *pointers, n, heads, k.shape[1], ctypes.c_float(SCALE),
        ctypes.c_void_p(k_pairs.data_ptr()), ctypes.c_void_p(v_pairs.data_ptr()),
    )  # fmt: skip
    return out


def torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=SCALE, enable_gqa=True)
    return out[0].transpose(0, 1)


def median_ms(fn, *args: object, repeats: int = 7) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    lib = ctypes.CDLL(LIBRARY)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for n in (37, 512, 2048):
        q, k, v = (torch.randn(n, h, 64).bfloat16() for h in (14, 2, 2))
        exact = torch_sdpa(q.float(), k.float(), v.float())
        error = (study(lib, q, k, v) - exact).abs().max().item()
        torch_error = (torch_sdpa(q, k, v).float() - exact).abs().max().item()
        ours = median_ms(study, lib, q, k, v)
        theirs = median_ms(torch_sdpa, q, k, v)
        gflop = 14 * n * n / 2 * 64 * 4 / 1e9  # causal: half the scores, QK and PV
        print(
            f"n={n}: max error {error:.4f} (torch bf16 {torch_error:.4f}); study {ours:.2f} ms "
            f"({gflop / ours * 1e3:.0f} GFLOP/s), torch {theirs:.2f} ms "
            f"({gflop / theirs * 1e3:.0f})"
        )


if __name__ == "__main__":
    main()
