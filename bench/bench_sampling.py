"""Sampling benchmark: engine.sampling.sample (temperature, top-k, top-p, min-p, the draw) on
one decode step's logits, against a plain PyTorch sampler measured in the same run.

The baseline is what a sampler written with torch ops does (and what engine.sampling did
until session 20): divide by the temperature, top-k by torch.topk, top-p by sorting the row,
min-p against the row's maximum, then the exponential race with a buffer of V uniform numbers
(-log u, a division, an argmax). Tandem's CPU path finds each row's cut-off by a radix select
without a sort and draws with hashed noise only for tokens that can win
(kernels.cpu_ops.sampling_thresholds and exponential_race). Logits are random: "peaked" (x 6,
a nucleus of a few tokens) and "flat" (x 0.3, as an untrained or a high-temperature model gives:
the nucleus spans most of the vocabulary). Best of --repeats after a warm-up. Prints figures,
asserts nothing.

    python bench/bench_sampling.py [--batch 1 8] [--vocab 32768 131072] [--repeats 20]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# (name, temperature, top_k, top_p, min_p)
SETTINGS = (
    ("t=1", 1.0, 0, 1.0, 0.0),
    ("t=0.7 top-p 0.9", 0.7, 0, 0.9, 0.0),
    ("t=0.7 top-k 50", 0.7, 50, 1.0, 0.0),
    ("t=1 min-p 0.05", 1.0, 0, 1.0, 0.05),
)


def torch_sample(logits, temperature: float, top_k: int, top_p: float, min_p: float, generator):
    """The baseline: one setting for every row, in torch ops."""
    import torch

    z = logits / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(top_k, dim=-1).values[:, -1:], -math.inf)
    if top_p < 1.0:
        ordered, order = z.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(
            -1, order, probs.cumsum(dim=-1) - probs < top_p
        )
        z = z.masked_fill(~keep, -math.inf)
    if min_p > 0.0:
        z = z.masked_fill(z < z.amax(dim=-1, keepdim=True) + math.log(min_p), -math.inf)
    weights = (z - z.amax(dim=-1, keepdim=True)).exp()
    noise = torch.empty_like(z).uniform_(generator=generator).clamp_(min=1e-38).log_().neg_()
    return (weights / noise).argmax(dim=-1)


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import torch

    from engine.sampling import sample
    from engine.types import SamplingParams
    from kernels.cpu_ops import kernel_available

    print(f"C kernels: {kernel_available()}, {torch.get_num_threads()} threads")
    generator = torch.Generator().manual_seed(0)
    for vocab in args.vocab:
        for batch in args.batch:
            for shape, scale in (("peaked", 6.0), ("flat", 0.3)):
                logits = torch.randn(batch, vocab, generator=generator) * scale
                for name, temperature, top_k, top_p, min_p in SETTINGS:
                    params = [
                        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                       min_p=min_p)
                    ] * batch  # fmt: skip
                    ours = best_time(
                        lambda z=logits, p=params: sample(z, p, [None] * len(p)), args.repeats
                    )
                    setting = (temperature, top_k, top_p, min_p)
                    baseline = best_time(
                        lambda z=logits, s=setting: torch_sample(z, *s, generator), args.repeats
                    )
                    print(
                        f"V {vocab:6d}  batch {batch}  {shape:6s}  {name:<16s}  "
                        f"torch {baseline * 1e3:7.3f} ms  Tandem {ours * 1e3:6.3f} ms  "
                        f"{baseline / ours:5.1f}x",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
