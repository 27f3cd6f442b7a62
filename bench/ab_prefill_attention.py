"""A/B the prefill attention kernel (kernels/csrc/prefill_attention.c) against torch's SDPA
(kernels.cpu_attention.enable_kernel) on whole prefill passes of the benchmark model
(Qwen2.5-0.5B's shapes, bf16: 24 layers, 14 query and 2 KV heads of 64), the two alternating
round by round so both see the same drift of the machine. A prompt of each --lengths runs
alone (TTFT's forward pass, without sampling or request overhead); --prefix N first caches N
tokens, so the timed pass is a chunk over a cached prefix. Prints the median and best of each
and their ratio; asserts nothing.

--mixed times one layer's attention of a step that mixes decode rows with a prompt chunk, as
the engine runs it (engine.attention.paged_attention: decode rows to the decode kernel, the
chunk to the prefill kernel) against torch's SDPA per sequence (what it ran before).

    python bench/ab_prefill_attention.py                      # 128, 512 and 2048 tokens
    python bench/ab_prefill_attention.py --lengths 512 --prefix 1536 --rounds 5
    python bench/ab_prefill_attention.py --mixed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BLOCK_SIZE = 16


def prefill_seconds(model, kv, prompt: list[int], prefix: int) -> float:
    """Time of the forward pass of prompt[prefix:], its first `prefix` tokens cached first."""
    from engine.batch import ForwardBatch

    table = list(range(-(-len(prompt) // BLOCK_SIZE)))
    if prefix:
        model.forward(ForwardBatch.build([prompt[:prefix]], [prefix], [table], BLOCK_SIZE), kv)
    batch = ForwardBatch.build([prompt[prefix:]], [len(prompt)], [table], BLOCK_SIZE)
    started = time.perf_counter()
    model.forward(batch, kv)
    return time.perf_counter() - started


# (decode rows, their context, prompt chunk) of the --mixed steps.
MIXED_STEPS = ((8, 1000, 256), (8, 2000, 64), (32, 500, 128), (4, 4000, 512))


def mixed_steps(rounds: int) -> None:
    """One layer's attention (the benchmark model's heads) of each of MIXED_STEPS."""
    import torch

    from engine.attention import AttentionMetadata, paged_attention
    from engine.batch import ForwardBatch
    from kernels import cpu_attention

    heads, kv_heads, dim = 14, 2, 64
    scale = dim**-0.5

    def engine(q, caches, batch: ForwardBatch):
        return paged_attention(q, *caches, AttentionMetadata.from_batch(batch), scale, None)

    def torch_per_sequence(q, caches, batch: ForwardBatch):
        return cpu_attention.prefill_attention_ref(
            q, *caches, batch.slot_table, batch.query_lens, batch.context_lens, scale, None
        )

    for decodes, context, chunk in MIXED_STEPS:
        query_lens, context_lens = [chunk] + [1] * decodes, [chunk] + [context] * decodes
        spans = [-(-n // BLOCK_SIZE) for n in context_lens]
        tables = [list(range(sum(spans[:s]), sum(spans[: s + 1]))) for s in range(len(spans))]
        tokens = [[1] * n for n in query_lens]
        batch = ForwardBatch.build(tokens, context_lens, tables, BLOCK_SIZE)
        caches = [torch.randn(sum(spans) * BLOCK_SIZE, kv_heads, dim).bfloat16() for _ in "kv"]
        q = torch.randn(sum(query_lens), heads, dim).bfloat16()
        times: dict[str, list[float]] = {"engine": [], "torch": []}
        for _ in range(rounds + 1):  # the first round warms up
            for name, run in (("engine", engine), ("torch", torch_per_sequence)):
                started = time.perf_counter()
                run(q, caches, batch)
                times[name].append(time.perf_counter() - started)
        ours, theirs = (statistics.median(times[n][1:]) * 1e3 for n in ("engine", "torch"))
        print(
            f"{decodes} decode rows at {context} tokens + a {chunk}-token chunk: engine "
            f"{ours:.2f} ms, torch SDPA per sequence {theirs:.2f} ms; {theirs / ours:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--prefix", type=int, default=0, help="tokens cached before each prompt")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mixed", action="store_true", help="mixed steps' attention instead")
    args = parser.parse_args()
    if args.mixed:
        mixed_steps(max(args.rounds, 15))
        return

    import torch

    from bench.make_bench_model import build_bench_model
    from engine.model import CausalLM
    from kernels import cpu_attention

    if not cpu_attention.kernel_available():
        sys.exit("this CPU has no AVX-512 BF16: the kernel does not run here")
    model = CausalLM.from_dir(build_bench_model())
    longest = max(args.lengths) + args.prefix
    kv = model.new_kv_cache(-(-longest // BLOCK_SIZE), BLOCK_SIZE)
    generator = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads; prefix {args.prefix} tokens")
    for length in args.lengths:
        prompt = torch.randint(3, 30000, (args.prefix + length,), generator=generator).tolist()
        times: dict[str, list[float]] = {"kernel": [], "torch": []}
        for name in times:  # warm-up: oneDNN primitives, the kernel's build
            cpu_attention.enable_kernel(name == "kernel")
            prefill_seconds(model, kv, prompt, args.prefix)
        for r in range(args.rounds):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for name in order:
                cpu_attention.enable_kernel(name == "kernel")
                times[name].append(prefill_seconds(model, kv, prompt, args.prefix))
            print(f"  {length} tokens: round {r + 1}/{args.rounds}", file=sys.stderr)
        cpu_attention.enable_kernel(True)
        kernel, theirs = (statistics.median(times[n]) * 1e3 for n in ("kernel", "torch"))
        print(
            f"{length:5d} tokens: kernel {kernel:7.1f} ms (best {min(times['kernel']) * 1e3:.1f})"
            f", torch SDPA {theirs:7.1f} ms (best {min(times['torch']) * 1e3:.1f}); "
            f"torch / kernel {theirs / kernel:.3f}"
        )


if __name__ == "__main__":
    main()
