"""Sparse activation (WINA) on the CPU: kernels.sparse.sparse_linear against the dense layer.

For the Qwen2.5-0.5B projections (bf16) and a few batch sizes, times the engine's dense path
(kernels.cpu_linear.linear on W [N, K]) and sparse_linear (the C kernel, on weight_t = W.T
[K, N]) at several sparsities: per-row top-k thresholds of WINA scores |x| * ||W[:, j]|| on
random x. A batch streams the union of its rows' kept channels, so at T > 1 it reads more than
(1 - s) of the weight: the table shows that fraction, the speedup over dense, the bound on it
(1 / (1 - s), and 1 / union for the rows together), and the effective bandwidth (bytes of the
weight rows actually read / time), next to this machine's memory bandwidth measured in the same
run (a large tensor copy, and a read-only stream). Then an estimate for the linear layers of the
whole model (the 24 layers' four projections, not the LM head).

Every call is timed on its own and a figure is the median over all calls of several interleaved
rounds; the weights are copied enough times to exceed the L3 cache, so every call streams from
DRAM. On a shared machine the median shrugs off calls that lost their core; --statistic
fastest-decile shows what calls reach when they do get the cores. Nothing is asserted.

    python bench/bench_sparse_linear.py [--rows 1 4] [--sparsity 0 0.25 0.4 0.5 0.65]
                                        [--rounds 5] [--threads 2]
                                        [--statistic median|fastest-decile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.cpu_linear import linear
from kernels.sparse import (
    channel_scores,
    cpu_kernel_available,
    sparse_linear,
    top_k_thresholds,
    uses_cpu_kernel,
)

# Qwen2.5-0.5B: hidden 896, 14 query + 2 kv heads of 64, MLP 4864: (K, N) of each projection.
QWEN_SHAPES = {
    "qkv": (896, 1152),
    "o": (896, 896),
    "gate_up": (896, 9728),
    "down": (4864, 896),
}
QWEN_LAYERS = 24
DTYPE = torch.bfloat16

# Weight copies per shape add up to at least this many bytes, over twice the 105 MB L3.
WORKING_SET_BYTES = 256 * 2**20

STATISTICS: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    "fastest-decile": lambda times: sorted(times)[len(times) // 10],
}


@dataclass(frozen=True)
class Row:
    name: str
    k: int
    n: int
    rows: int
    sparsity: float
    union: float  # fraction of the channels some row keeps: the fraction of weight_t read
    dense_s: float
    sparse_s: float

    @property
    def weight_bytes(self) -> int:
        return self.k * self.n * DTYPE.itemsize


def copy_gbps(rounds: int) -> float:
    """(bytes read + bytes written) / time of copying a 512 MB tensor into another, the best of
    `rounds` (other processes can only slow it down)."""
    source = torch.ones(128 * 2**20, dtype=torch.float32)
    target = torch.empty_like(source)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / min(times) / 1e9


def read_gbps(rounds: int) -> float:
    """Bytes / time of torch.mv over a 512 MB fp32 matrix (BLAS streams it faster than torch.sum
    reads a tensor), the best of `rounds`: what a read-only stream reaches."""
    matrix = torch.ones(8192, 16 * 2**10, dtype=torch.float32)
    vector = torch.ones(matrix.shape[1])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        torch.mv(matrix, vector)
        times.append(time.perf_counter() - start)
    return matrix.numel() * matrix.element_size() / min(times) / 1e9


def copies_of(tensor: Tensor) -> list[Tensor]:
    count = max(2, -(-WORKING_SET_BYTES // (tensor.numel() * tensor.element_size())))
    return [tensor] + [tensor.clone() for _ in range(count - 1)]


def call_times(fn: Callable[[Tensor], Tensor], weights: list[Tensor]) -> list[float]:
    times = []
    for weight in weights:
        start = time.perf_counter()
        fn(weight)
        times.append(time.perf_counter() - start)
    return times


def measure_shape(
    name: str,
    k: int,
    n: int,
    batches: list[int],
    sparsities: list[float],
    rounds: int,
    statistic: Callable[[list[float]], float],
) -> list[Row]:
    weight = torch.randn(n, k).to(DTYPE)
    norms = weight.float().norm(dim=0)
    dense_weights = copies_of(weight)
    sparse_weights = copies_of(weight.T.contiguous())
    results = []
    for batch in batches:
        x = torch.randn(batch, k).to(DTYPE)
        scores = channel_scores(x, norms)
        cases: dict[object, Callable[[Tensor], Tensor]] = {"dense": lambda w, x=x: linear(x, w)}
        unions = {}
        for sparsity in sparsities:
            thresholds = top_k_thresholds(scores, round((1 - sparsity) * k))
            assert uses_cpu_kernel(x, sparse_weights[0], norms, thresholds)
            keep = scores >= thresholds[:, None]
            unions[sparsity] = keep.any(dim=0).float().mean().item()
            cases[sparsity] = lambda w, x=x, t=thresholds: sparse_linear(x, w, norms, t)
        times: dict[object, list[float]] = {label: [] for label in cases}
        for _ in range(rounds):  # interleaved, so that a slow spell hits every case alike
            for label, fn in cases.items():
                weights = dense_weights if label == "dense" else sparse_weights
                times[label] += call_times(fn, weights)
        dense = statistic(times["dense"])
        for sparsity in sparsities:
            row = Row(
                name, k, n, batch, sparsity, unions[sparsity], dense, statistic(times[sparsity])
            )
            print_row(row)
            results.append(row)
    return results


HEADER = (
    f"{'layer':8} {'K x N':>10} {'T':>2} {'s':>5} {'read':>5} {'dense ms':>9} {'sparse ms':>9}"
    f" {'speedup':>8} {'1/(1-s)':>8} {'1/read':>7} {'dense GB/s':>10} {'eff GB/s':>9}"
)


def print_row(row: Row) -> None:
    read_bytes = row.union * row.weight_bytes
    print(
        f"{row.name:8} {f'{row.k}x{row.n}':>10} {row.rows:>2} {row.sparsity:>5.2f}"
        f" {row.union:>5.0%} {row.dense_s * 1e3:>9.3f} {row.sparse_s * 1e3:>9.3f}"
        f" {row.dense_s / row.sparse_s:>7.2f}x {1 / (1 - row.sparsity):>7.2f}x"
        f" {1 / max(row.union, 1e-9):>6.2f}x"
        f" {row.weight_bytes / row.dense_s / 1e9:>10.1f} {read_bytes / row.sparse_s / 1e9:>9.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0, 0.25, 0.4, 0.5, 0.65])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="median")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    statistic = STATISTICS[args.statistic]

    print(f"threads={torch.get_num_threads()} dtype=bf16 rows={args.rows}", flush=True)
    print("building / loading the kernels ...", flush=True)
    if not cpu_kernel_available(DTYPE):
        raise SystemExit("no CPU sparse kernel on this machine (see the warning above)")
    linear(torch.ones(1, 8, dtype=DTYPE), torch.ones(8, 8, dtype=DTYPE))
    print("measuring memory bandwidth ...", flush=True)
    copy, read = copy_gbps(args.rounds), read_gbps(args.rounds)
    print(
        f"memory bandwidth (best of {args.rounds}): copy of 512 MB (read + write) {copy:.1f} GB/s,"
        f" read-only stream (torch.mv) {read:.1f} GB/s"
    )
    print(
        "read: fraction of weight_t rows streamed (the union over the batch); eff GB/s: those"
        f" bytes / time; {args.statistic} per call\n"
    )
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    results: list[Row] = []
    for name, (k, n) in QWEN_SHAPES.items():
        results += measure_shape(name, k, n, args.rows, args.sparsity, args.rounds, statistic)

    for batch in args.rows:
        print(f"\nQwen2.5-0.5B, T={batch}, the {QWEN_LAYERS} layers' projections per step:")
        # One dense time per layer (each shape's rows share it).
        dense = QWEN_LAYERS * sum({r.name: r.dense_s for r in results if r.rows == batch}.values())
        print(f"  dense: {dense * 1e3:.2f} ms")
        for sparsity in args.sparsity:
            rows = [r for r in results if r.rows == batch and r.sparsity == sparsity]
            total = QWEN_LAYERS * sum(r.sparse_s for r in rows)
            print(
                f"  s={sparsity:.2f}: {total * 1e3:.2f} ms ({dense / total:.2f}x;"
                f" bound {1 / (1 - sparsity):.2f}x)"
            )
    peak = max(r.union * r.weight_bytes / r.sparse_s / 1e9 for r in results if r.sparsity > 0)
    dense_peak = max(r.weight_bytes / r.dense_s / 1e9 for r in results)
    print(
        f"\nbest effective bandwidth of sparse_linear: {peak:.1f} GB/s; of the dense layer:"
        f" {dense_peak:.1f} GB/s; read-only stream: {read:.1f} GB/s (the dense layer's figure is"
        " the better measure of what this machine streams where the stream lost its cores)"
    )


if __name__ == "__main__":
    main()
