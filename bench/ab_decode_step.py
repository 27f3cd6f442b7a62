"""Decode steps with every layer in one C call against the layers run one by one from Python.

engine.model runs a decode-only step's layers through kernels.cpu_decode (one C call: the same
kernels in the same order, no Python between them) wherever nothing needs the Python path.
This runs the benchmark model (bench/make_bench_model.py) switching between that and the
layers one by one at every decode step (both see the same bandwidth drift), at batch 1 and 8,
without adapters and (--adapters N) with N distinct rank-16 adapters on all projections
(bench/bench_lora.py's), and prints the median step times. Nothing is asserted.

    python bench/ab_decode_step.py [--batch 1 8] [--adapters 8] [--steps 80] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=0, help="also batches with adapters")
    args = parser.parse_args()

    from bench.interleave import interleaved_step_times
    from bench.make_bench_model import build_bench_model
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.model import CausalLM

    engine = LLMEngine.from_dir(build_bench_model(), EngineConfig(dtype="bfloat16", max_num_seqs=8))
    adapter_ids = []
    if args.adapters:
        from bench.bench_lora import load_bench_adapters

        adapter_ids = load_bench_adapters(engine, args.adapters)
    one_call = CausalLM._decode_in_one_call

    def install(method):
        return lambda: setattr(CausalLM, "_decode_in_one_call", method)

    variants = {
        "layers one by one": install(lambda self, *args: False),
        "one C call": install(one_call),
    }
    try:
        for batch in args.batch:
            runs = {"no adapter": [None] * batch}
            if adapter_ids:
                runs["adapters"] = [adapter_ids[i % len(adapter_ids)] for i in range(batch)]
            for label, ids in runs.items():
                interleaved_step_times(engine, variants, ids, 4)  # warm-up
                for round_index in range(args.rounds):
                    times = interleaved_step_times(engine, variants, ids, args.steps)
                    by_one, in_one = (statistics.median(times[name]) * 1e3 for name in variants)
                    print(
                        f"batch {batch}, {label}, round {round_index}: layers one by one "
                        f"{by_one:6.2f} ms, one C call {in_one:6.2f} ms ({by_one / in_one:.3f}x)",
                        flush=True,
                    )
    finally:
        CausalLM._decode_in_one_call = one_call


if __name__ == "__main__":
    main()
