"""Decode-time linear layers: torch F.linear against kernels.cpu_linear.linear on the CPU.

Prints, for the Qwen2.5-0.5B weight shapes and a few batch sizes, the weight bytes streamed per
second by F.linear and by each of our kernel variants, next to this machine's streaming read
bandwidth measured in the same run; then a batch-1 decode estimate for the whole model, how our
kernel and a torch op share the OpenMP threads, and the per-call overhead on a tiny matrix.
Every call is timed on its own and a figure is the median over all calls of several
interleaved rounds: on a shared machine the median shrugs off the calls that lost their core.
Where other processes keep both cores busy, --statistic fastest-decile shows what calls reach
when they do get the cores. Nothing is asserted.

    python bench/bench_linear.py [--batch 1 4 8 16] [--rounds 5] [--dtype bf16] [--threads 2]
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
from torch.nn import functional as F

from kernels.cpu_linear import linear, set_variant, variants

LinearFn = Callable[[Tensor, Tensor], Tensor]

# Qwen2.5-0.5B: hidden 896, 14 query + 2 kv heads of 64, MLP 4864, vocabulary (rounded) 32768.
QWEN_SHAPES = {
    "qkv": (1152, 896),
    "o": (896, 896),
    "gate_up": (9728, 896),
    "down": (896, 4864),
    "lm_head": (32768, 896),
}
QWEN_LAYERS = 24
PER_LAYER = ("qkv", "o", "gate_up", "down")
TORCH = "F.linear"

# Weight copies per shape add up to at least this many bytes, over twice the 105 MB L3, so
# every call streams its weight from DRAM as in a real forward pass.
WORKING_SET_BYTES = 256 * 2**20

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


STATISTICS: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    "fastest-decile": lambda times: sorted(times)[len(times) // 10],
}


@dataclass(frozen=True)
class Measurement:
    weight_bytes: int
    seconds: dict[str, float]  # per call, keyed by implementation

    def gbps(self, implementation: str) -> float:
        return self.weight_bytes / self.seconds[implementation] / 1e9


class Implementations:
    """F.linear and each of our kernel variants, selected by label."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.labels = (TORCH, *variants(dtype))

    def select(self, label: str) -> LinearFn:
        if label == TORCH:
            return F.linear
        set_variant(self.dtype, label)
        return linear


def stream_read_gbps(rounds: int) -> float:
    """Bandwidth of torch.sum over a 512 MB fp32 tensor: what a read-only stream reaches."""
    data = torch.ones(128 * 2**20, dtype=torch.float32)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * data.element_size() / statistics.median(times) / 1e9


def weight_copies(shape: tuple[int, int], dtype: torch.dtype) -> list[Tensor]:
    first = torch.randn(shape).to(dtype)
    copies = max(2, -(-WORKING_SET_BYTES // (first.numel() * first.element_size())))
    return [first] + [first.clone() for _ in range(copies - 1)]


def call_times(fn: LinearFn, x: Tensor, weights: list[Tensor]) -> list[float]:
    times = []
    for weight in weights:
        start = time.perf_counter()
        fn(x, weight)
        times.append(time.perf_counter() - start)
    return times


def measure_shape(
    weights: list[Tensor],
    batch: int,
    implementations: Implementations,
    rounds: int,
    statistic: Callable[[list[float]], float],
) -> Measurement:
    x = torch.randn(batch, weights[0].shape[1]).to(weights[0].dtype)
    times: dict[str, list[float]] = {label: [] for label in implementations.labels}
    for _ in range(rounds):
        for label in implementations.labels:
            times[label] += call_times(implementations.select(label), x, weights)
    weight_bytes = weights[0].numel() * weights[0].element_size()
    return Measurement(weight_bytes, {label: statistic(t) for label, t in times.items()})


def decode_tokens_per_second(by_name: dict[str, Measurement], label: str) -> float:
    layer = sum(by_name[name].seconds[label] for name in PER_LAYER)
    return 1.0 / (QWEN_LAYERS * layer + by_name["lm_head"].seconds[label])


def interleaving_ms(dtype: torch.dtype, rounds: int) -> dict[str, float]:
    """Milliseconds per iteration of our kernel alone, a torch op that uses the OpenMP pool
    alone, and both alternating. With one shared OpenMP runtime, both is about the sum; two
    runtimes would leave each pool's threads spinning while the other pool works."""
    weights = weight_copies(QWEN_SHAPES["down"], dtype)
    x = torch.randn(1, weights[0].shape[1]).to(dtype)
    activations = torch.randn(4 * 2**20)

    def ours_only() -> None:
        for weight in weights:
            linear(x, weight)

    def torch_only() -> None:
        for _ in weights:
            F.silu(activations)

    def both() -> None:
        for weight in weights:
            linear(x, weight)
            F.silu(activations)

    cases = {"ours": ours_only, "torch op": torch_only, "alternating": both}
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(rounds):
        for label, run in cases.items():
            start = time.perf_counter()
            run()
            times[label].append((time.perf_counter() - start) / len(weights) * 1e3)
    return {label: statistics.median(samples) for label, samples in times.items()}


def call_overhead_us(fn: LinearFn, dtype: torch.dtype, calls: int = 20000) -> float:
    """Microseconds per call on a 16x16 weight, where the arithmetic is negligible."""
    weight = torch.randn(16, 16).to(dtype)
    x = torch.randn(1, 16).to(dtype)
    for _ in range(100):
        fn(x, weight)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x, weight)
    return (time.perf_counter() - start) / calls * 1e6


def print_table(
    implementations: Implementations,
    batches: list[int],
    rounds: int,
    statistic: Callable[[list[float]], float],
    stream: float,
) -> dict[int, dict[str, Measurement]]:
    labels = implementations.labels
    header = f"{'layer':8} {'shape':>10} {'M':>3}" + "".join(f" {label:>9}" for label in labels)
    header += "  best/F.linear  best/stream"
    print(header + "\n" + "-" * len(header))
    by_batch: dict[int, dict[str, Measurement]] = {batch: {} for batch in batches}
    for name, shape in QWEN_SHAPES.items():
        weights = weight_copies(shape, implementations.dtype)
        for batch in batches:
            result = measure_shape(weights, batch, implementations, rounds, statistic)
            by_batch[batch][name] = result
            best = max(result.gbps(label) for label in labels[1:])
            print(
                f"{name:8} {f'{shape[0]}x{shape[1]}':>10} {batch:>3}"
                + "".join(f" {result.gbps(label):>9.1f}" for label in labels)
                + f"  {best / result.gbps(TORCH):>12.2f}x  {best / stream:>10.0%}"
            )
        del weights
    return by_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="median")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dtype = DTYPES[args.dtype]
    implementations = Implementations(dtype)
    default_variant = implementations.labels[1]

    print(f"threads={torch.get_num_threads()} dtype={args.dtype} variants={variants(dtype)}")
    stream = stream_read_gbps(args.rounds)
    print(f"streaming read bandwidth (torch.sum over 512 MB fp32): {stream:.1f} GB/s")
    print(f"weight GB/s, {args.statistic} per call:\n")
    statistic = STATISTICS[args.statistic]
    by_batch = print_table(implementations, args.batch, args.rounds, statistic, stream)

    if 1 in by_batch:
        total_bytes = sum(
            (QWEN_LAYERS if name in PER_LAYER else 1) * measurement.weight_bytes
            for name, measurement in by_batch[1].items()
        )
        print(f"\nQwen2.5-0.5B batch-1 decode, linear layers only ({total_bytes / 1e6:.0f} MB):")
        print(f"  bandwidth bound at {stream:.1f} GB/s: {stream * 1e9 / total_bytes:.1f} tok/s")
        for label in implementations.labels:
            print(f"  {label}: {decode_tokens_per_second(by_batch[1], label):.1f} tok/s")

    set_variant(dtype, default_variant)
    interleaved = interleaving_ms(dtype, args.rounds)
    print(f"\nOpenMP sharing ({default_variant}), per iteration (down M=1, silu over 16 MB):")
    for label, ms in interleaved.items():
        print(f"  {label}: {ms:.3f} ms")
    separate = interleaved["ours"] + interleaved["torch op"]
    print(f"  alternating / (ours + torch op): {interleaved['alternating'] / separate:.2f}")

    print("\ncall overhead, 16x16 weight, M=1:")
    for label in implementations.labels:
        print(f"  {label}: {call_overhead_us(implementations.select(label), dtype):.2f} us/call")


if __name__ == "__main__":
    main()
