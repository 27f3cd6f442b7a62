"""Decode steps with the weights in huge pages (as the loader places them) against a copy in
ordinary 4 KB pages, alternated step by step in one engine (bench/interleave.py).

The engine loads the model as usual (engine.huge_pages: one arena advised for transparent huge
pages); variant "4k" swaps in a copy of every weight made by torch's allocator, which Linux
backs with 4 KB pages unless THP runs in "always" mode. Both copies hold the same bits. Prints
each round's median step times and their ratio (huge / 4k), and how much of the process's
anonymous memory the kernel backs with huge pages. Asserts nothing.

    python bench/ab_huge_pages.py [--batch 1] [--sparsity 0.5] [--rounds 8] [--steps 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def anon_huge_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def copy_weights(weights):
    """The same weights, every tensor copied by torch's allocator (strides kept)."""
    import torch

    def copied(holder):
        return {
            field.name: value.clone()
            for field in dataclasses.fields(holder)
            if isinstance(value := getattr(holder, field.name), torch.Tensor)
        }

    layers = [dataclasses.replace(layer, **copied(layer)) for layer in weights.layers]
    top = copied(weights)
    if weights.lm_head is weights.embed:
        top["lm_head"] = top["embed"]
    return dataclasses.replace(weights, layers=layers, **top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: the benchmark model)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.0, help="WINA top-k level (0: dense)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="decode steps per round")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))

    import engine.model as engine_model
    from bench.bench_decode import progress
    from bench.interleave import interleaved_step_times
    from bench.make_bench_model import build_bench_model
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sparsity import SparsitySettings, apply_sparsity

    before = anon_huge_bytes()
    engine = LLMEngine.from_dir(
        args.model or build_bench_model(),
        EngineConfig(dtype="bfloat16", max_num_seqs=max(8, args.batch), prefix_caching=False),
    )
    if args.sparsity > 0:
        apply_sparsity(engine.model, SparsitySettings(args.sparsity, "wina", "top-k", ""))
    model = engine.model
    print(f"huge pages taken by the load: {(anon_huge_bytes() - before) / 1e6:.0f} MB", flush=True)
    weights = {"huge": model.weights, "4k": copy_weights(model.weights)}
    decode_steps = {}  # each variant's prepared one-call decode step
    current: list[str] = []

    def install(name: str):
        def switch() -> None:
            if current and current[0] == name:
                return
            if current:
                decode_steps[current[0]] = model._decode_layers
            model.weights = weights[name]
            model._decode_layers = decode_steps.get(name, engine_model._UNPREPARED)
            current[:] = [name]

        return switch

    variants = {name: install(name) for name in weights}
    progress("warm-up")
    interleaved_step_times(engine, variants, [None] * args.batch, 8)
    ratios = []
    for r in range(args.rounds):
        times = interleaved_step_times(engine, variants, [None] * args.batch, args.steps)
        huge, small = statistics.median(times["huge"]), statistics.median(times["4k"])
        ratios.append(huge / small)
        print(
            f"round {r + 1}: huge pages {huge * 1e3:.3f} ms, 4 KB pages {small * 1e3:.3f} ms,"
            f" huge / 4k {huge / small:.4f}",
            flush=True,
        )
    print(
        f"batch {args.batch}, sparsity {args.sparsity}: median huge / 4k"
        f" {statistics.median(ratios):.4f} ({min(ratios):.4f}-{max(ratios):.4f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
