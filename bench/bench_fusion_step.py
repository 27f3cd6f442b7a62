"""Decode step time with logit fusion: the large model alone against the large model steered by
one expert whose small base is about 1/8 of its size (design.md section 6; the paper measured
2.76x).

Large: the benchmark model of make_bench_model.py (Qwen2.5-0.5B shapes, bf16). Small base:
the same family at hidden 512, 8 layers (about 1/8 of the parameters), random weights; experts:
a full model of the small base's shape (another seed), and a rank-16 LoRA adapter on the small
base (all seven projections). All cached in bench/.cache/. Times the decode-only steps of a
batch (median step), runs alternating, best of --repeats; beside each ratio of best times, the
median over rounds of the round's own ratio (a machine whose speed drifts between rounds moves
both sides of a round's ratio together). Prints figures, asserts nothing.

With --spell-pairs N, instead: N pairs per fused configuration, each the large model alone
then fused (--new-tokens each) between two streaming reads of 2 GiB (bench_decode.read_rates);
a pair whose reads differ by more than 15% saw the machine's bandwidth jump and is left out,
the rest are split by their read (at least 80% of the fastest read: the fast spell), and each
spell's median ratio is printed (bench/bench_bound.py does the same for the bound).

    python bench/bench_fusion_step.py [--batch 1 8] [--new-tokens 32] [--repeats 3]
    python bench/bench_fusion_step.py --batch 1 --new-tokens 16 --spell-pairs 20
    python bench/bench_fusion_step.py --breakdown --new-tokens 60 --repeats 4

With --breakdown, each configuration's decode step is split into its models' C calls (the
one-call decode of the large and the small models), its fusion's C calls and the rest (the
step's Python and torch ops), medians over the rounds; the rest beyond the large model alone's
is what fusion adds outside the kernels.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / "bench" / ".cache"


def small_config():
    from bench.make_bench_model import qwen25_05b_config

    config = qwen25_05b_config()
    config.update(
        {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "layer_types": ["full_attention"] * 8,
        }
    )
    return config


def write_small(out: Path, seed: int) -> str:
    """A random small model of small_config() with the SentencePiece tokenizer (cached)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from engine.tokenizer import build_sentencepiece_tokenizer_dir

    if (out / "model.safetensors").is_file():
        return str(out)
    build_sentencepiece_tokenizer_dir(out)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(small_config()).to(torch.bfloat16).save_pretrained(str(out))
    return str(out)


def num_params(engine_model) -> int:
    w = engine_model.weights
    tensors = [w.embed, w.final_norm, *(t for layer in w.layers for t in vars(layer).values())]
    if w.lm_head is not w.embed:
        tensors.append(w.lm_head)
    return sum(t.numel() for t in tensors if t is not None)


# The C calls CallTimer times, by kind.
TIMED_CALLS = {"decode_layers": "models", "fusion_dynamic": "fusion", "fusion_apply": "fusion"}


class CallTimer:
    """Wall time of the engine's C calls within a step, by kind: the models' passes (the
    one-call decode) and the fusion's passes. kernels.cpu_ops' module is wrapped: both reach
    it through cpu_ops._kernels() at every call."""

    def __init__(self) -> None:
        from kernels import cpu_ops

        self.spent: dict[str, float] = collections.defaultdict(float)
        real, timer = cpu_ops._kernels(), self

        class Module:
            def __getattr__(self, name: str):
                function, kind = getattr(real, name), TIMED_CALLS.get(name)
                if kind is None:
                    return function

                def timed(*args):
                    started = time.perf_counter()
                    try:
                        return function(*args)
                    finally:
                        timer.spent[kind] += time.perf_counter() - started

                return timed

        module = Module()
        cpu_ops._kernels = lambda: module


def step_time(
    engine,
    batch: int,
    experts: tuple,
    mode,
    new_tokens: int,
    prompt_len: int,
    timer: CallTimer | None = None,
) -> float | dict[str, float]:
    """Median seconds of the decode-only steps of one batch of `batch` requests; with a
    timer, the medians of the step, its models' C calls, its fusion's and the rest."""
    import torch

    from engine.types import Request, SamplingParams, StoppingCriteria

    generator = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(
            Request(
                request_id=f"r{i}-{time.monotonic_ns()}",
                prompt_token_ids=torch.randint(
                    3, 30000, (prompt_len,), generator=generator
                ).tolist(),
                sampling=SamplingParams(temperature=0.0),
                stopping=StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
                experts=experts,
                fusion_mode=mode,
            )
        )
    times, parts = [], []
    while engine.has_unfinished():
        decoding = not engine.scheduler.waiting and all(
            s.num_uncomputed == 1 for s in engine.scheduler.running
        )
        if timer is not None:
            timer.spent.clear()
        started = time.perf_counter()
        engine.step()
        if decoding and len(engine.scheduler.running) == batch:
            times.append(time.perf_counter() - started)
            if timer is not None:
                models, fusion = timer.spent["models"], timer.spent["fusion"]
                parts.append((times[-1], models, fusion, times[-1] - models - fusion))
    if timer is None:
        return statistics.median(times)
    names = ("step", "models", "fusion", "rest")
    return {name: statistics.median(p[i] for p in parts) for i, name in enumerate(names)}


def breakdown(engine, batch: int, runs: dict, args) -> None:
    """--breakdown: each configuration's step split into its models' C calls, its fusion's C
    calls and the rest (Python, torch), medians over --repeats alternating rounds."""
    timer = CallTimer()
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (experts, mode) in runs.items():
            parts = step_time(engine, batch, experts, mode, args.new_tokens, args.prompt_len, timer)
            rounds[name].append(parts)

    def median(name: str, part: str) -> float:
        return statistics.median(r[part] for r in rounds[name]) * 1e3

    for name in runs:
        print(
            f"batch {batch}: {name:<22} step {median(name, 'step'):6.2f} ms  models' C "
            f"{median(name, 'models'):6.2f}  fusion's C {median(name, 'fusion'):5.2f}  the rest "
            f"{median(name, 'rest'):5.2f} ({median(name, 'rest') - median('alone', 'rest'):+.2f} "
            "against alone)",
            flush=True,
        )


SPELL_CHANGE = 0.15  # reads before and after a pair further apart: the pair is left out
FAST_SPELL = 0.8


def spell_pairs(engine, batch: int, runs: dict, args) -> None:
    """--spell-pairs: each fused configuration against the large model alone, pair by pair,
    split by the machine's bandwidth spell (see the module's docstring)."""
    import torch

    from bench.bench_decode import read_rates

    matrix = torch.ones((2 << 30) // 4 // 4096, 4096, dtype=torch.float32)
    alone = runs["alone"]
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in runs if name != "alone"}
    fastest, left_out = 0.0, 0
    for _ in range(args.spell_pairs):
        for name in pairs:
            before = max(read_rates(matrix, 2, "read").values())
            base = step_time(engine, batch, *alone, args.new_tokens, args.prompt_len)
            fused = step_time(engine, batch, *runs[name], args.new_tokens, args.prompt_len)
            after = max(read_rates(matrix, 2, "read").values())
            fastest = max(fastest, before, after)
            if abs(before - after) > SPELL_CHANGE * min(before, after):
                left_out += 1
                continue
            pairs[name].append(((before + after) / 2, fused / base))
    print(
        f"batch {batch}: {left_out} pairs left out (the bandwidth jumped); fast spell: reads at "
        f"least {FAST_SPELL:.0%} of the fastest ({fastest / 1e9:.1f} GB/s)",
        flush=True,
    )
    for name, kept in pairs.items():
        parts = []
        for spell, chosen in (
            ("fast", [r for bw, r in kept if bw >= FAST_SPELL * fastest]),
            ("slow", [r for bw, r in kept if bw < FAST_SPELL * fastest]),
        ):
            if chosen:
                parts.append(
                    f"{spell} {statistics.median(chosen):.2f}x ({len(chosen)} pairs, "
                    f"{min(chosen):.2f}-{max(chosen):.2f})"
                )
        print(f"batch {batch}: {name:<22} " + ", ".join(parts or ["no pairs"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spell-pairs", type=int, default=0, help="pairs split by spell")
    parser.add_argument(
        "--breakdown", action="store_true", help="each step split into C calls and the rest"
    )
    args = parser.parse_args()

    from bench.bench_lora import write_adapter
    from bench.make_bench_model import build_bench_model
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.model import CausalLM
    from engine.types import FusionMode

    engine = LLMEngine.from_dir(build_bench_model(), EngineConfig(dtype="bfloat16", max_num_seqs=8))
    small = write_small(CACHE / "fusion-small-base", seed=1)
    expert = write_small(CACHE / "fusion-expert", seed=2)
    small_model = CausalLM.from_dir(small)
    lora = write_adapter(CACHE / "fusion-lora-r16", small_model.config, 16, seed=3)
    engine.load_expert("full", expert, small)
    engine.load_expert("lora", lora, small)
    large_n, small_n = num_params(engine.model), num_params(small_model)
    print(
        f"large {large_n / 1e6:.0f}M params, small base {small_n / 1e6:.0f}M "
        f"({small_n / large_n:.3f} of it), bf16, {args.new_tokens} new tokens"
    )
    runs = {
        "alone": ((), FusionMode.DYNAMIC),
        "full expert, static": ((("full", None),), FusionMode.STATIC),
        "full expert, dynamic": ((("full", None),), FusionMode.DYNAMIC),
        "LoRA expert, dynamic": ((("lora", None),), FusionMode.DYNAMIC),
    }
    for batch in args.batch:
        step_time(engine, batch, runs["full expert, dynamic"][0], FusionMode.DYNAMIC, 4, 8)
        if args.spell_pairs:
            spell_pairs(engine, batch, runs, args)
            continue
        if args.breakdown:
            breakdown(engine, batch, runs, args)
            continue
        rounds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, (experts, mode) in runs.items():
                seconds = step_time(engine, batch, experts, mode, args.new_tokens, args.prompt_len)
                rounds[name].append(seconds)
        alone = min(rounds["alone"])
        for name, times in rounds.items():
            paired = statistics.median(t / a for t, a in zip(times, rounds["alone"], strict=True))
            print(
                f"batch {batch}: {name:<22} {min(times) * 1e3:7.1f} ms/step  "
                f"{min(times) / alone:5.2f}x the large model alone (rounds' median {paired:.2f}x)",
                flush=True,
            )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
