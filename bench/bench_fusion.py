"""Dynamic logit fusion benchmark: one decoding step's alpha search (design.md §6).

On CPU: fuse_dynamic_ref (the single-pass formula, vectorised; the engine's CPU path) against
fuse_dynamic_naive (a full softmax per candidate in float64, the oracle) for B rows, E experts
and a V-token vocabulary, with the default 21-candidate grid. On CUDA, when there is a GPU:
fuse_dynamic_triton (and fuse_static_triton, and fuse_dynamic_ref and fuse_dynamic_naive on the
GPU for comparison).
Each figure is the best of --repeats calls after one warm-up call. Prints figures, asserts
nothing; compare the ratios of one run (the machine's load moves absolute times).

    python bench/bench_fusion.py [--repeats 3] [--batch 1 8] [--experts 1 3]
                                 [--vocab 32768 131072] [--threads N] [--skip-naive]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def logits(batch: int, num_experts: int, vocab: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(batch * 1000 + num_experts)
    large = torch.randn(batch, vocab, generator=generator) * 3.0
    small = torch.randn(batch, vocab, generator=generator) * 2.0
    experts = small.unsqueeze(1) + torch.randn(batch, num_experts, vocab, generator=generator)
    return large.to(device), small.to(device), experts.to(device)


def best_time(fn, repeats: int, sync=None) -> float:
    fn()  # warm-up (and, for Triton, compilation)
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - started)
    return min(times)


def cuda_time(fn, repeats: int) -> float:
    """Best of `repeats` averages over 20 back-to-back calls, timed with CUDA events."""
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000 / 20)
    return best


def bench_cpu(fusion, batch: int, num_experts: int, vocab: int, args) -> str:
    import torch

    large, small, experts = logits(batch, num_experts, vocab, "cpu")
    ref_s = best_time(lambda: fusion.fuse_dynamic_ref(large, small, experts), args.repeats)
    line = f"{batch:>3} {num_experts:>2} {vocab:>7} | {ref_s * 1e3:>9.2f}"
    if args.skip_naive:
        return line
    naive_s = best_time(
        lambda: fusion.fuse_dynamic_naive(large, small, experts), max(1, args.repeats // 2)
    )
    _, index, alpha = fusion.fuse_dynamic_ref(large, small, experts)
    _, index_n, alpha_n = fusion.fuse_dynamic_naive(large, small, experts)
    agree = bool(torch.equal(index, index_n) and torch.equal(alpha, alpha_n))
    return f"{line} {naive_s * 1e3:>10.2f} {naive_s / ref_s:>8.1f}x | {agree}"


def bench_cuda(fusion, batch: int, num_experts: int, vocab: int, args) -> str:
    import torch

    large, small, experts = logits(batch, num_experts, vocab, "cuda")
    alphas = torch.ones(batch, num_experts, device="cuda")
    dyn = cuda_time(lambda: fusion.fuse_dynamic_triton(large, small, experts), args.repeats)
    static = cuda_time(
        lambda: fusion.fuse_static_triton(large, small, experts, alphas), args.repeats
    )
    ref = cuda_time(lambda: fusion.fuse_dynamic_ref(large, small, experts), args.repeats)
    _, index, alpha = fusion.fuse_dynamic_triton(large, small, experts)
    _, index_r, alpha_r = fusion.fuse_dynamic_ref(large, small, experts)
    agree = bool(torch.equal(index, index_r) and torch.equal(alpha, alpha_r))
    line = (
        f"{batch:>3} {num_experts:>2} {vocab:>7} | {dyn * 1e6:>13.1f} {static * 1e6:>10.1f} "
        f"{ref * 1e6:>16.1f} {ref / dyn:>5.1f}x"
    )
    if args.skip_naive:
        return f"{line} | {agree}"
    naive = cuda_time(lambda: fusion.fuse_dynamic_naive(large, small, experts), args.repeats)
    return f"{line} {naive * 1e6:>18.1f} {naive / dyn:>6.1f}x | {agree}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()

    import torch

    from kernels import fusion

    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [(b, e, v) for v in args.vocab for b in args.batch for e in args.experts]

    if not args.skip_cpu:
        threads = torch.get_num_threads()
        print(f"CPU, {threads} torch threads, 21 candidates, best of {args.repeats}")
        header = f"{'ref ms':>9} {'naive ms':>10} {'speed-up':>9}"
        print(f"{'B':>3} {'E':>2} {'V':>7} | {header} | agree")
        for config in configs:
            print(bench_cpu(fusion, *config, args), flush=True)

    if not torch.cuda.is_available():
        print("\nCUDA: no GPU here, the Triton kernels are not timed")
        return
    if not fusion.triton_available():
        print("\nCUDA: triton is not installed")
        return
    print(f"\nCUDA ({torch.cuda.get_device_name()}), float32 logits, best of {args.repeats}")
    print(
        f"{'B':>3} {'E':>2} {'V':>7} | {'dyn triton us':>13} {'static us':>10} "
        f"{'dyn ref (GPU) us':>16} {'ratio':>6}"
        + ("" if args.skip_naive else f" {'naive fp64 (GPU) us':>18} {'ratio':>7}")
        + " | agree"
    )
    for config in configs:
        print(bench_cuda(fusion, *config, args), flush=True)


if __name__ == "__main__":
    main()
