"""Median decode step time of the benchmark model (or --model DIR) in this process, as the
environment sets it up: to compare OpenMP wait policies or versions of the code, run it under
each, alternating.

    python bench/decode_step_time.py [--batch 1] [--new-tokens 48] [--repeats 3] [--model DIR]
    OMP_WAIT_POLICY=PASSIVE python bench/decode_step_time.py --batch 8

Greedy, EOS ignored, 32-token prompts; the median over --repeats batches of each batch's median
step (its first two steps, the prefill and the first decode, left out). Prints milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="a model directory (default: the benchmark model)")
    args = parser.parse_args()

    from bench.make_bench_model import build_bench_model
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.types import Request, SamplingParams, StoppingCriteria

    model = args.model or build_bench_model()
    engine = LLMEngine.from_dir(model, EngineConfig(dtype="bfloat16"))

    def median_step(new_tokens: int) -> float:
        for i in range(args.batch):
            engine.add_request(
                Request(
                    request_id=f"r{i}-{time.monotonic_ns()}",
                    prompt_token_ids=list(range(3 + i, 35 + i)),
                    sampling=SamplingParams(temperature=0.0),
                    stopping=StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
                )
            )
        times = []
        while engine.has_unfinished():
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        return statistics.median(times[2:])

    median_step(4)  # warm-up
    steps = []
    for repeat in range(args.repeats):
        steps.append(median_step(args.new_tokens))
        print(
            f"[bench] repeat {repeat + 1}/{args.repeats}: {steps[-1] * 1e3:.1f} ms", file=sys.stderr
        )
    print(f"batch {args.batch}: median decode step {statistics.median(steps) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
