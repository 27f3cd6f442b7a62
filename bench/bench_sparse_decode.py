"""Sparse-activation decode benchmark: batch-1 decode tokens/s, dense against WINA (top-k) at
several sparsities, side by side in one run on the benchmark model (bench/make_bench_model.py).

    python bench/bench_sparse_decode.py [--quick] [--levels 0.4 0.5] [--rule wina|teal]
                                        [--adapter-rank R] [--variant avx2]

With --adapter-rank every request runs a random rank-R LoRA adapter on all seven projections
(bench/bench_lora.py's), which sees the sparse input too; dense then means dense with it.
With --variant avx2 the dense and the sparse kernels are their AVX2 variants, as on a CPU
without AVX-512 (kernels.cpu_linear.set_variant, kernels.sparse.set_variant).

One engine (bf16) is loaded once; the model is switched between dense and each sparsity
(`CausalLM.set_sparsity`) and every configuration is timed in every round, interleaved, so load
drift on a shared machine hits them alike; each figure is the best round, and beside each
speedup the median over rounds of the round's own ratio (a machine whose bandwidth swings
between rounds moves both sides of a round's ratio together). Decode is separated
from prefill as in bench/bench_decode.py: the time of an N-token call minus that of a 1-token
call on a same-length prompt covers N - 1 decode steps.

The bound printed beside each sparsity is 1 / (f + (1 - f)(1 - s)), f the dense fraction of
the bytes read per token: the LM head (the embeddings are read one row per token, nothing to
count; the KV cache at these lengths is a rounding error).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
FIRST_PROMPT_TOKEN = 3  # skip <unk>, <s>, </s>


def progress(message: str) -> None:
    print(f"[bench sparse] {message}", file=sys.stderr, flush=True)


def dense_fraction(model) -> float:
    """Bytes of the LM head over the bytes of the LM head and every sparse projection."""
    from engine.sparsity import GROUPS

    def nbytes(tensor) -> int:
        return tensor.numel() * tensor.element_size()

    head = nbytes(model.weights.lm_head)
    sparse = sum(nbytes(getattr(layer, g)) for layer in model.weights.layers for g in GROUPS)
    return head / (head + sparse)


def speedup_bound(f: float, s: float) -> float:
    return 1.0 / (f + (1.0 - f) * (1.0 - s))


class Runner:
    """Greedy generation of fixed lengths through one LLMEngine."""

    def __init__(
        self, model_dir: str, prompt_len: int, adapter_rank: int = 0, seed: int = 0
    ) -> None:
        from engine.llm_engine import EngineConfig, LLMEngine

        started = time.perf_counter()
        self.engine = LLMEngine.from_dir(model_dir, EngineConfig(dtype="bfloat16"))
        progress(f"loaded {model_dir} in {time.perf_counter() - started:.1f} s")
        self.adapters: tuple[tuple[str, float], ...] = ()
        if adapter_rank:
            from bench.bench_lora import load_bench_adapters

            self.adapters = ((load_bench_adapters(self.engine, 1, adapter_rank)[0], 1.0),)
        self.prompt_len = prompt_len
        self._ids = itertools.count()
        self._prompts = itertools.count(seed)

    def prompt(self) -> list[int]:
        # A fresh prompt per call: nothing may be answered from a cache.
        generator = random.Random(next(self._prompts))
        vocab = self.engine.model.config.vocab_size
        return [generator.randrange(FIRST_PROMPT_TOKEN, vocab) for _ in range(self.prompt_len)]

    def timed(self, max_new_tokens: int) -> float:
        from engine.types import Request, SamplingParams, StoppingCriteria

        request = Request(
            request_id=str(next(self._ids)),
            prompt_token_ids=self.prompt(),
            sampling=SamplingParams(temperature=0.0),
            stopping=StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
            adapters=self.adapters,
        )
        started = time.perf_counter()
        output = self.engine.generate([request])[request.request_id]
        elapsed = time.perf_counter() - started
        if len(output.token_ids) != max_new_tokens:
            raise RuntimeError(f"expected {max_new_tokens} tokens, got {len(output.token_ids)}")
        return elapsed

    def configure(self, level: float, rule: str, mode: str, sparsity_file: str | None) -> None:
        from engine.sparsity import SparsitySettings, apply_sparsity

        settings = None
        if level > 0:
            settings = SparsitySettings(level, rule, mode, sparsity_file or "")
        apply_sparsity(self.engine.model, settings)


def measure(opts: argparse.Namespace) -> dict:
    runner = Runner(opts.model, opts.prompt_len, opts.adapter_rank)
    configs = [0.0, *opts.levels]
    one: dict[float, list[float]] = {c: [] for c in configs}
    full: dict[float, list[float]] = {c: [] for c in configs}
    for round_ in range(opts.repeats):
        for level in configs:
            runner.configure(level, opts.rule, opts.mode, opts.sparsity_file)
            if round_ == 0:
                runner.timed(opts.max_new_tokens)  # warm-up: kernels built, pages touched
            one[level].append(runner.timed(1))
            full[level].append(runner.timed(opts.max_new_tokens))
            rate = (opts.max_new_tokens - 1) / (full[level][-1] - one[level][-1])
            progress(f"round {round_ + 1}/{opts.repeats}, sparsity {level:.0%}: {rate:.1f} tok/s")
    f = dense_fraction(runner.engine.model)
    results = {}
    for level in configs:
        decode_s = min(full[level]) - min(one[level])
        # Round r's decode seconds of this level over the dense one's: the inverse speedup.
        ratios = [
            (full[0.0][r] - one[0.0][r]) / (full[level][r] - one[level][r])
            for r in range(opts.repeats)
        ]
        results[f"{level:g}"] = {
            "sparsity": level,
            "decode_tok_s_b1": (opts.max_new_tokens - 1) / decode_s,
            "bound": speedup_bound(f, level),
            "round_speedups": ratios,
            "median_round_speedup": statistics.median(ratios),
        }
    dense = results["0"]["decode_tok_s_b1"]
    for entry in results.values():
        entry["speedup"] = entry["decode_tok_s_b1"] / dense
    return {"dense_fraction": f, "results": results}


def kernel_path() -> str:
    import torch

    from kernels import sparse

    if sparse.cpu_kernel_available(torch.bfloat16):
        return f"C kernel (kernels/csrc/sparse_linear.c), {sparse.current_variant()}"
    return "reference (dense matmul of the masked input)"


def choose_variant(name: str) -> None:
    """The dense and the sparse kernels' variant `name`, before the engine loads."""
    import torch

    from kernels import cpu_linear, sparse

    if name not in cpu_linear.variants(torch.bfloat16) or name not in sparse.variants():
        raise SystemExit(f"this CPU cannot run the {name} kernels")
    cpu_linear.set_variant(torch.bfloat16, name)
    sparse.set_variant(name)


def print_table(report: dict) -> None:
    lines = [
        "",
        f"model: {report['model']}",
        f"rule {report['rule']}, mode {report['mode']}, adapter rank "
        f"{report['adapter_rank'] or '-'}, {report['max_new_tokens']} new tokens, "
        f"prompt {report['prompt_len']}, best of {report['repeats']} interleaved rounds "
        "(paired: the median round's ratio)",
        f"sparse path: {report['kernel']}; dense fraction of bytes f = "
        f"{report['dense_fraction']:.3f} (LM head)",
        f"load average {report['loadavg_at_start'][0]:.2f} at start, "
        f"{report['loadavg_at_end'][0]:.2f} at end ({report['cpus']} CPUs)",
        "",
        f"{'':<14}{'decode b1 tok/s':>18}{'speedup':>10}{'paired':>10}{'bound':>10}",
    ]
    for entry in report["results"].values():
        label = "dense" if entry["sparsity"] == 0 else f"{report['rule']} {entry['sparsity']:.0%}"
        lines.append(
            f"{label:<14}{entry['decode_tok_s_b1']:>18.1f}{entry['speedup']:>9.2f}x"
            f"{entry['median_round_speedup']:>9.2f}x{entry['bound']:>9.2f}x"
        )
    print("\n".join(lines), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: build the benchmark model)")
    p.add_argument("--quick", action="store_true", help="smoke run: short lengths, one round")
    p.add_argument("--levels", type=float, nargs="+", default=[0.4, 0.5])
    p.add_argument("--rule", choices=("wina", "teal"), default="wina")
    p.add_argument("--mode", choices=("top-k", "threshold"), default="top-k")
    p.add_argument("--sparsity-file", help="the model's sidecar (threshold mode)")
    p.add_argument("--adapter-rank", type=int, default=0, help="a LoRA adapter of this rank")
    p.add_argument("--variant", choices=("avx512", "avx2"), help="the kernels' instruction set")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_path", default=str(CACHE_DIR / "bench_sparse_decode.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.max_new_tokens, args.repeats = 16, 1
    return args


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.model is None:
        from bench.make_bench_model import build_bench_model

        progress("building the benchmark model (cached under bench/.cache/)")
        opts.model = build_bench_model()
    if opts.variant:
        choose_variant(opts.variant)
    report = {
        "model": str(Path(opts.model).resolve()),
        "rule": opts.rule,
        "mode": opts.mode,
        "adapter_rank": opts.adapter_rank,
        "max_new_tokens": opts.max_new_tokens,
        "prompt_len": opts.prompt_len,
        "repeats": opts.repeats,
        "cpus": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_at_start": os.getloadavg(),
    }
    report.update(measure(opts))
    report["kernel"] = kernel_path()
    report["loadavg_at_end"] = os.getloadavg()
    Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json_path).write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nJSON: {opts.json_path}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # `bench` and `engine` when run as a script
    main()
