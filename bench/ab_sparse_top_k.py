"""Top-k sparse decode steps with the C threshold selection against the composed torch/numpy path.

`kernels.sparse.input_top_k_thresholds` picks each token's top-k threshold in one C call; without
its kernel it composes channel_scores (two torch ops) and numpy's selection. This runs the
benchmark model (bench/make_bench_model.py) with WINA top-k sparsity, switching between the two
at every decode step (both see the same bandwidth drift), at batch 1 and 8, and prints the
median step times beside the dense model's (a separate run: that ratio is the noisier one).
Nothing is asserted.

    python bench/ab_sparse_top_k.py [--sparsity 0.5] [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def step_times(engine, batch: int, steps: int, sparsity: float) -> dict[str, list[float]]:
    """Decode-step times, the selection switched between "fused" and "composed" every step."""
    from bench.interleave import interleaved_step_times
    from engine.sparsity import SparsitySettings, apply_sparsity
    from kernels import sparse

    settings = SparsitySettings(sparsity, "wina", "top-k", "") if sparsity else None
    apply_sparsity(engine.model, settings)
    kernels = dict(sparse._top_k_kernels)
    variants = {
        "fused": lambda: sparse._top_k_kernels.update(kernels),
        "composed": sparse._top_k_kernels.clear,
    }
    try:
        return interleaved_step_times(engine, variants, [None] * batch, steps)
    finally:
        sparse._top_k_kernels.update(kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from bench.make_bench_model import build_bench_model
    from engine.llm_engine import EngineConfig, LLMEngine
    from kernels.sparse import input_top_k_thresholds

    engine = LLMEngine.from_dir(build_bench_model(), EngineConfig(dtype="bfloat16"))
    input_top_k_thresholds(torch.ones(1, 8, dtype=torch.bfloat16), None, 4)  # builds the kernel
    step_times(engine, 1, 8, args.sparsity)  # warm-up
    for round_index in range(args.rounds):
        dense = step_times(engine, 1, args.steps, 0.0)
        dense_ms = statistics.median(dense["fused"] + dense["composed"]) * 1e3
        for batch in (1, 8):
            times = step_times(engine, batch, args.steps, args.sparsity)
            fused, composed = (statistics.median(times[n]) * 1e3 for n in ("fused", "composed"))
            line = f"round {round_index} batch {batch}: fused {fused:.2f} ms, "
            line += f"composed {composed:.2f} ms"
            if batch == 1:
                line += f", dense {dense_ms:.2f} ms (speed-up {dense_ms / fused:.2f}x"
                line += f" against {dense_ms / composed:.2f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
