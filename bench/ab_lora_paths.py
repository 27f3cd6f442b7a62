"""A/B the multi-LoRA decode paths on whole batch-8 steps, interleaved step by step.

Variants switched at every step (bench/interleave.py), so all see the same bandwidth drift:
- "ops one by one": kernels/lora.py's dense path as separate calls (shrink, mask, an expand
  and a bf16 add per slice), as before session 9;
- "one C call": kernels.cpu_linear.LoraDense, prepared once per stack (the default; with the
  AMX kernel the shrink and every expand share one parallel region);
- "one C call, reading idle slots": the same without skipping the A rows of slots no row uses.
Batches: no adapter, and 8 adapters while 8 slots are filled, then while 16 are (the other 8
served in between). Prints median step times and the ratios to no adapter; asserts nothing.

    python bench/ab_lora_paths.py [--steps 40] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def variants() -> dict:
    """Per variant, the function that installs it into kernels.lora."""
    from kernels import lora
    from kernels.cpu_linear import linear

    prepared, add, idle = lora.LoraStack.dense_call, lora.linear_add_, lora.LoraMapping.idle_groups

    def one_by_one_add(out, x, weight):
        return out.add_(linear(x, weight))

    def install(dense_call, add_call, idle_groups):
        def go() -> None:
            lora.LoraStack.dense_call = dense_call
            lora.linear_add_ = add_call
            lora.LoraMapping.idle_groups = idle_groups

        return go

    return {
        "ops one by one": install(lambda self: None, one_by_one_add, idle),
        "one C call": install(prepared, add, idle),
        "one C call, reading idle slots": install(prepared, add, lambda self, *args: None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from bench.bench_lora import load_bench_adapters
    from bench.interleave import interleaved_step_times
    from bench.make_bench_model import build_bench_model
    from engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_dir(build_bench_model(), EngineConfig(dtype="bfloat16", max_num_seqs=8))
    ids = load_bench_adapters(engine, 16)
    installs = variants()
    interleaved_step_times(engine, installs, ids[:8], 4)  # warm-up; 8 slots filled
    for filled, used in ((8, ids[:8]), (16, ids[:8])):
        if filled == 16:
            interleaved_step_times(engine, installs, ids[8:], 4)  # the other 8 take slots
        for round_index in range(args.rounds):
            base = interleaved_step_times(engine, installs, [None] * 8, args.steps)
            lora = interleaved_step_times(engine, installs, used, args.steps)
            for name in installs:
                b, a = (statistics.median(t[name]) * 1e3 for t in (base, lora))
                print(
                    f"{filled} slots filled, 8 used, round {round_index}  {name:32s} "
                    f"no adapter {b:5.1f} ms, 8 adapters {a:5.1f} ms, ratio {b / a:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
