"""Time to first token with a shared prompt prefix: prefix caching on against off, one run.

Every request is a long shared prefix (a system prompt, few-shot examples) plus a short suffix
of its own, so prefix caching can take the prefix's KV blocks and prefill only the suffix. Two
engines of the same model stay loaded (caching on, caching off); each round times, on each,
alternating which goes first:
- warm: one request whose prefix was cached before timing (as it is after a server's first
  such request);
- burst: --burst requests sent together with a prefix never seen before; the time until every
  one has its first token (the first computes the prefix, the others take its blocks).
Prints the medians and their ratios; asserts nothing.

    python bench/bench_prefix_cache.py [--model DIR] [--prefix-len 480] [--suffix-len 32]
        [--burst 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.bench_decode import progress  # noqa: E402
from bench.make_bench_model import build_bench_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model directory (default: the bench model)")
    parser.add_argument("--prefix-len", type=int, default=480)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.types import Request, SamplingParams, StoppingCriteria

    model = args.model or build_bench_model()
    engines = {}
    for name, caching in (("caching on", True), ("caching off", False)):
        progress(f"loading {model} ({name})")
        engines[name] = LLMEngine.from_dir(
            model, EngineConfig(dtype="bfloat16", prefix_caching=caching)
        )
    vocab = next(iter(engines.values())).model.config.vocab_size
    rng = random.Random(0)
    prefix = [rng.randrange(3, vocab) for _ in range(args.prefix_len)]
    ids = iter(range(1 << 30))

    def one_token(prompt: list[int]) -> Request:
        return Request(
            f"r{next(ids)}",
            prompt,
            SamplingParams(temperature=0.0),
            StoppingCriteria(max_new_tokens=1, ignore_eos=True),
        )

    def fresh(length: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(length)]

    def warm(engine: LLMEngine) -> tuple[float, int]:
        """TTFT of one request with the cached prefix and a fresh suffix, and how many of its
        prompt tokens were cached."""
        request = one_token(prefix + fresh(args.suffix_len))
        start = time.perf_counter()
        out = engine.generate([request])[request.request_id]
        return time.perf_counter() - start, out.cached_prompt_tokens

    def burst(engine: LLMEngine) -> tuple[float, int]:
        """Seconds until every request of a burst with a new prefix has its first token, and
        their cached prompt tokens in all."""
        shared = fresh(args.prefix_len)
        requests = [one_token(shared + fresh(args.suffix_len)) for _ in range(args.burst)]
        start = time.perf_counter()
        outputs = engine.generate(requests)
        return time.perf_counter() - start, sum(o.cached_prompt_tokens for o in outputs.values())

    for engine in engines.values():  # warm-up; caches the prefix on the caching engine
        warm(engine)
    names = list(engines)
    prompt_len = args.prefix_len + args.suffix_len
    for label, run, tokens in (
        ("warm", warm, prompt_len),
        (f"burst of {args.burst}", burst, args.burst * prompt_len),
    ):
        times: dict[str, list[float]] = {name: [] for name in engines}
        cached: dict[str, int] = {}
        for r in range(args.rounds):
            for name in names[r % 2 :] + names[: r % 2]:
                progress(f"{label}, round {r + 1}/{args.rounds}: {name}")
                seconds, cached[name] = run(engines[name])
                times[name].append(seconds)
        for name in names:
            print(
                f"{label}, {name}: TTFT median {statistics.median(times[name]) * 1e3:.1f} ms "
                f"(best {min(times[name]) * 1e3:.1f}), {cached[name]} of {tokens} prompt "
                f"tokens cached",
                flush=True,
            )
        ratio = statistics.median(times["caching off"]) / statistics.median(times["caching on"])
        print(f"{label}: TTFT caching off / on {ratio:.2f}x (medians of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
