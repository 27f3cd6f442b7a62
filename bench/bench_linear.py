"""Decode-time linear layers: torch F.linear against kernels.cpu_linear.linear on the CPU.

Prints, for the Qwen2.5-0.5B weight shapes and a few batch sizes, the weight bytes streamed per
second by each, next to this machine's streaming read bandwidth measured in the same run, then
a batch-1 decode estimate for the whole model and the per-call overhead on a tiny matrix.
Every call is timed on its own and a figure is the median over all calls of several
interleaved rounds: on a shared machine the median shrugs off the calls that lost their core.
Nothing is asserted.

    python bench/bench_linear.py [--batch 1 4 8 16] [--rounds 5] [--dtype bf16]
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

from kernels.cpu_linear import kernel_available, linear

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

# Weight copies per shape add up to at least this many bytes, over twice the 105 MB L3, so
# every call streams its weight from DRAM as in a real forward pass.
WORKING_SET_BYTES = 256 * 2**20

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Measurement:
    name: str
    batch: int
    weight_bytes: int
    seconds: dict[str, float]  # per call, keyed by implementation

    def gbps(self, implementation: str) -> float:
        return self.weight_bytes / self.seconds[implementation] / 1e9


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
    name: str, weights: list[Tensor], batch: int, implementations: dict[str, LinearFn], rounds: int
) -> Measurement:
    x = torch.randn(batch, weights[0].shape[1]).to(weights[0].dtype)
    times: dict[str, list[float]] = {label: [] for label in implementations}
    for _ in range(rounds):
        for label, fn in implementations.items():
            times[label] += call_times(fn, x, weights)
    weight_bytes = weights[0].numel() * weights[0].element_size()
    medians = {label: statistics.median(samples) for label, samples in times.items()}
    return Measurement(name, batch, weight_bytes, medians)


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


def decode_tokens_per_second(by_name: dict[str, Measurement], implementation: str) -> float:
    layer = sum(by_name[name].seconds[implementation] for name in PER_LAYER)
    return 1.0 / (QWEN_LAYERS * layer + by_name["lm_head"].seconds[implementation])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    implementations: dict[str, LinearFn] = {"F.linear": F.linear, "ours": linear}

    torch.set_grad_enabled(False)
    fast = kernel_available(dtype)
    print(f"threads={torch.get_num_threads()} dtype={args.dtype} fast kernel={fast}")
    stream = stream_read_gbps(args.rounds)
    print(f"streaming read bandwidth (torch.sum over 512 MB fp32): {stream:.1f} GB/s\n")

    columns = ("layer", "shape", "M", "F.linear", "ours", "speedup", "of stream")
    header = "{:8} {:>12} {:>3} {:>9} {:>9} {:>8} {:>10}".format(*columns)
    print(header + "\n" + "-" * len(header))
    by_batch: dict[int, dict[str, Measurement]] = {batch: {} for batch in args.batch}
    for name, shape in QWEN_SHAPES.items():
        weights = weight_copies(shape, dtype)
        for batch in args.batch:
            result = measure_shape(name, weights, batch, implementations, args.rounds)
            by_batch[batch][name] = result
            print(
                f"{name:8} {f'{shape[0]}x{shape[1]}':>12} {batch:>3} "
                f"{result.gbps('F.linear'):>6.1f} GB/s {result.gbps('ours'):>4.1f} GB/s "
                f"{result.gbps('ours') / result.gbps('F.linear'):>7.2f}x "
                f"{result.gbps('ours') / stream:>9.0%}"
            )
        del weights

    if 1 in by_batch:
        total_bytes = sum(
            (QWEN_LAYERS if name in PER_LAYER else 1) * by_batch[1][name].weight_bytes
            for name in QWEN_SHAPES
        )
        print(f"\nQwen2.5-0.5B batch-1 decode, linear layers only ({total_bytes / 1e6:.0f} MB):")
        print(f"  bandwidth bound at {stream:.1f} GB/s: {stream * 1e9 / total_bytes:.1f} tok/s")
        for label in implementations:
            print(f"  {label}: {decode_tokens_per_second(by_batch[1], label):.1f} tok/s")

    print("\ncall overhead, 16x16 weight, M=1:")
    for label, fn in implementations.items():
        print(f"  {label}: {call_overhead_us(fn, dtype):.2f} us/call")


if __name__ == "__main__":
    main()
