"""The Triton kernels on a CUDA GPU: achieved bandwidth and time against the PyTorch paths.

1. The device's memory bandwidth: its data-sheet peak (by name) and a device-to-device copy
   measured here (bytes read + written).
2. Sparse GEMV (kernels.sparse.sparse_linear_triton, WINA per-token top-k thresholds) for the
   four projections of Qwen2.5-0.5B, Llama-3-8B and Llama-3-70B, bf16, at several sparsities:
   GPU time, the bytes it must read (the kept rows of weight_t: the union of the rows' kept
   channels), achieved bandwidth as a fraction of the peak (issue 7's goal: >= 80%), speed-up
   over the dense layer (cuBLAS: F.linear on W [N, K]) and its bound 1 / union; then each
   model's four projections together, as a decode step's linear layers would be. --sweep times block
   sizes, warps and programs per SM of both kernels (one row, and 4 rows) on three shapes, to
   choose GEMV_BLOCKS, GEMV_LAUNCH, GPU_BLOCKS, GPU_LAUNCH and PROGRAMS_PER_SM.
3. Multi-LoRA (kernels.lora.lora_triton) for 8 rows with 8 distinct rank-16 adapters on
   Qwen2.5-0.5B's projections, against lora_ref on the same GPU and against the base layer.
4. Gumbel-top-k (kernels.gumbel.gumbel_topk_triton) against gumbel_topk_ref (torch.topk on the
   same GPU).

Times are GPU times per call: a CUDA graph of many calls (cycling through copies of the
weights that together exceed the L2 cache several times, so that every call streams from HBM)
is replayed, timed with CUDA events; the median of --repeats replays. Python's launch cost is
not in them. Prints figures, asserts nothing.

    python bench/bench_gpu_kernels.py [--sparsity 0 0.4 0.5 0.65 0.9] [--rows 1 4] [--sweep]
                                      [--repeats 20] [--skip-lora] [--skip-gumbel]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from kernels import gumbel, lora, sparse  # noqa: E402

# Data-sheet HBM bandwidth, bytes/s, by a word of the device's name.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
# (name, layers, K, N) of the four projections: q/k/v fused, o, gate/up fused, down.
MODELS = {
    "qwen2.5-0.5b": (
        24,
        [("qkv", 896, 1152), ("o", 896, 896), ("gate_up", 896, 9728), ("down", 4864, 896)],
    ),
    "llama-3-8b": (
        32,
        [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    ),
    "llama-3-70b": (
        80,
        [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192)],
    ),
}
SWEEP_SHAPES = [(896, 9728), (4096, 28672), (14336, 4096)]
# (rows, setting, [(blocks, warps, stages, programs per SM)]): the one-row kernel, and the
# tile-product kernel at 4 rows.
SWEEP = [
    (
        1,
        "gemv",
        [
            (blocks, warps, 2, per_sm)
            for blocks in [(16, 256), (32, 128), (32, 256), (64, 64), (64, 128)]
            for warps in (2, 4)
            for per_sm in (4, 8)
        ],
    ),
    (
        4,
        "tiles",
        [
            (blocks, warps, 2, per_sm)
            for blocks in [(64, 128), (128, 64)]
            for warps in (1, 2)
            for per_sm in (4, 8)
        ],
    ),
]


def graph_time(calls: list[Callable[[], object]], repeats: int) -> float:
    """Seconds per call: median over `repeats` replays of one CUDA graph of all the calls."""
    for call in calls:  # compiles, and allocates what the graph's pool will reuse
        call()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    """Copies of a weight whose total is at least 4 L2 caches (and at least 2)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-4 * l2 // max(nbytes, 1)))


def peak_bandwidth(repeats: int) -> tuple[float | None, float]:
    """(data-sheet peak or None, measured copy bandwidth), bytes/s."""
    name = torch.cuda.get_device_name()
    sheet = next((bw for word, bw in PEAK_BANDWIDTH.items() if word in name), None)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = graph_time([lambda: dst.copy_(src)] * 4, repeats)
    return sheet, 2 * src.numel() / seconds


class SparseLayer:
    """Copies of one random bf16 projection (W [N, K] for cuBLAS, weight_t [K, N] for the kernel)
    and rows of x with their WINA top-k thresholds."""

    def __init__(self, k: int, n: int, rows: int, seed: int = 0) -> None:
        generator = torch.Generator(device="cuda").manual_seed(seed)
        weight = torch.randn(n, k, device="cuda", generator=generator).mul_(0.02)
        weight = weight.to(torch.bfloat16)
        self.k, self.n, self.rows = k, n, rows
        self.weights = [weight] + [weight.clone() for _ in range(copies_for(weight.nbytes) - 1)]
        self.weights_t = [w.T.contiguous() for w in self.weights]
        self.norms = weight.float().norm(dim=0)
        self.x = torch.randn(rows, k, device="cuda", generator=generator).to(torch.bfloat16)
        self.scores = sparse.channel_scores(self.x, self.norms)

    def thresholds(self, sparsity: float) -> torch.Tensor:
        return sparse.top_k_thresholds(self.scores, round((1 - sparsity) * self.k))

    def union(self, thresholds: torch.Tensor) -> float:
        """Fraction of channels that some row keeps: the rows of weight_t the kernel reads."""
        return float((self.scores >= thresholds[:, None]).any(dim=0).float().mean())

    def dense_time(self, repeats: int) -> float:
        return graph_time([lambda w=w: F.linear(self.x, w) for w in self.weights], repeats)

    def sparse_time(self, thresholds: torch.Tensor, repeats: int) -> float:
        calls = [
            lambda w=w: sparse.sparse_linear_triton(self.x, w, self.norms, thresholds)
            for w in self.weights_t
        ]
        return graph_time(calls, repeats)


def use_config(kind: str, blocks: tuple, warps: int, stages: int, per_sm: int) -> None:
    launch = {"num_warps": warps, "num_stages": stages}
    if kind == "gemv":
        sparse.GEMV_BLOCKS, sparse.GEMV_LAUNCH = blocks, launch
    else:
        sparse.GPU_BLOCKS, sparse.GPU_LAUNCH = blocks, launch
    sparse.PROGRAMS_PER_SM = {**sparse.PROGRAMS_PER_SM, kind: per_sm}


def sweep(args, peak: float) -> None:
    saved = (sparse.GEMV_BLOCKS, sparse.GEMV_LAUNCH, sparse.GPU_BLOCKS, sparse.GPU_LAUNCH)
    saved_per_sm = dict(sparse.PROGRAMS_PER_SM)
    for rows, kind, configs in SWEEP:
        print(f"\n## Sweep: the {kind} kernel, {rows} row(s), s = 0.5 (GB/s of the rows read)")
        header = "".join(f"{f'{k}x{n}':>14}" for k, n in SWEEP_SHAPES)
        print(f"{'BLOCK_K,N':>10} {'warps':>5} {'stages':>6} {'per SM':>6} |{header} | % peak")
        layers = [SparseLayer(k, n, rows) for k, n in SWEEP_SHAPES]
        thresholds = [layer.thresholds(0.5) for layer in layers]
        results = []
        for config in configs:
            use_config(kind, *config)
            rates = []
            for layer, thr in zip(layers, thresholds, strict=True):
                seconds = layer.sparse_time(thr, args.repeats)
                rates.append(layer.union(thr) * layer.k * layer.n * 2 / seconds)
            results.append((statistics.mean(rates), config, rates))
        best = max(results)[1]
        for mean, (blocks, warps, stages, per_sm), rates in results:
            mark = "*" if (blocks, warps, stages, per_sm) == best else " "
            cells = "".join(f"{rate / 1e9:>14.0f}" for rate in rates)
            print(
                f"{blocks[0]:>4},{blocks[1]:<5} {warps:>5} {stages:>6} {per_sm:>6} |{cells} | "
                f"{100 * mean / peak:>5.1f}%{mark}"
            )
        del layers
        torch.cuda.empty_cache()
    sparse.GEMV_BLOCKS, sparse.GEMV_LAUNCH, sparse.GPU_BLOCKS, sparse.GPU_LAUNCH = saved
    sparse.PROGRAMS_PER_SM = saved_per_sm


def bench_sparse(args, peak: float, copy_bw: float) -> None:
    print(
        f"\n## Sparse GEMV, bf16, WINA top-k; one row: {sparse.GEMV_BLOCKS} {sparse.GEMV_LAUNCH}, "
        f"more: {sparse.GPU_BLOCKS} {sparse.GPU_LAUNCH}; per SM {sparse.PROGRAMS_PER_SM}"
    )
    print(
        f"{'model':>13} {'proj':>7} {'K x N':>12} {'rows':>4} {'s':>5} {'read':>5} | "
        f"{'dense us':>8} {'sparse us':>9} {'speed-up':>8} {'bound':>6} | "
        f"{'GB/s':>6} {'% peak':>6} {'% copy':>6}"
    )
    for model, (layers, projections) in MODELS.items():
        for rows in args.rows:
            totals = dict.fromkeys(args.sparsity, 0.0)
            dense_total, bytes_total = 0.0, dict.fromkeys(args.sparsity, 0.0)
            for name, k, n in projections:
                layer = SparseLayer(k, n, rows)
                dense = layer.dense_time(args.repeats)
                dense_total += dense
                for s in args.sparsity:
                    thr = layer.thresholds(s)
                    union = layer.union(thr)
                    seconds = layer.sparse_time(thr, args.repeats)
                    totals[s] += seconds
                    read = union * k * n * 2
                    bytes_total[s] += read
                    print(
                        f"{model:>13} {name:>7} {f'{k}x{n}':>12} {rows:>4} {s:>5.2f} "
                        f"{union:>5.2f} | {dense * 1e6:>8.1f} {seconds * 1e6:>9.1f} "
                        f"{dense / seconds:>7.2f}x {1 / max(union, 1e-9):>5.2f}x | "
                        f"{read / seconds / 1e9:>6.0f} {100 * read / seconds / peak:>5.1f}% "
                        f"{100 * read / seconds / copy_bw:>5.1f}%",
                        flush=True,
                    )
                del layer
                torch.cuda.empty_cache()
            for s in args.sparsity:
                print(
                    f"{model:>13} {f'all x{layers}':>7} {'':>12} {rows:>4} {s:>5.2f} {'':>5} | "
                    f"{dense_total * layers * 1e3:>7.2f}m {totals[s] * layers * 1e3:>8.2f}m "
                    f"{dense_total / totals[s]:>7.2f}x {'':>6} | "
                    f"{bytes_total[s] / totals[s] / 1e9:>6.0f} "
                    f"{100 * bytes_total[s] / totals[s] / peak:>5.1f}% "
                    f"{100 * bytes_total[s] / totals[s] / copy_bw:>5.1f}%"
                )


def bench_lora(args) -> None:
    rank, rows = 16, 8
    print(f"\n## Multi-LoRA, bf16, {rows} rows with {rows} distinct rank-{rank} adapters")
    print(
        f"{'proj':>7} {'K x N':>12} | {'base us':>8} {'triton us':>9} {'ref us':>8} "
        f"{'ref/triton':>10} {'(base+lora)/base':>16}"
    )
    generator = torch.Generator(device="cuda").manual_seed(0)
    _, projections = MODELS["qwen2.5-0.5b"]
    slices_of = {"qkv": ((0, 896), (896, 128), (1024, 128)), "gate_up": ((0, 4864), (4864, 4864))}
    for name, k, n in projections:
        slices = slices_of.get(name, ((0, n),))
        ranks = (rank,) * rows
        a = torch.randn(len(slices), rank * rows, k, device="cuda", generator=generator) / k**0.5
        b = torch.randn(n, rank * rows, device="cuda", generator=generator) * 0.01
        stack = lora.LoraStack(a.to(torch.bfloat16), b.to(torch.bfloat16), slices, ranks)
        mapping = lora.LoraMapping.build(
            rows, rows, [(i, 1, [(i, 1.0)]) for i in range(rows)], "cuda"
        )
        weight = torch.randn(n, k, device="cuda", generator=generator).to(torch.bfloat16)
        weights = [weight] + [weight.clone() for _ in range(copies_for(weight.nbytes) - 1)]
        x = torch.randn(rows, k, device="cuda", generator=generator).to(torch.bfloat16)
        y = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
        base = graph_time([partial(F.linear, x, w) for w in weights], args.repeats)
        calls = 8
        triton_s = graph_time(
            [partial(lora.lora_triton, y, x, stack, mapping)] * calls, args.repeats
        )
        ref_s = graph_time([partial(lora.lora_ref, y, x, stack, mapping)] * calls, args.repeats)
        print(
            f"{name:>7} {f'{k}x{n}':>12} | {base * 1e6:>8.1f} {triton_s * 1e6:>9.1f} "
            f"{ref_s * 1e6:>8.1f} {ref_s / triton_s:>9.2f}x {(base + triton_s) / base:>15.2f}x",
            flush=True,
        )


def bench_gumbel(args) -> None:
    print("\n## Gumbel-top-k, float32 logits")
    print(f"{'B':>3} {'V':>7} {'k':>4} | {'triton us':>9} {'ref us':>8} {'ref/triton':>10}")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (32768, 131072):
        for batch in (1, 8):
            logits = torch.randn(batch, vocab, device="cuda", generator=generator) * 3
            uniform = torch.rand(batch, vocab, device="cuda", generator=generator).clamp_min(1e-30)
            for k in (8, 16, 32, 64):
                calls = 8
                kernel = graph_time(
                    [partial(gumbel.gumbel_topk_triton, logits, uniform, k)] * calls, args.repeats
                )
                ref = graph_time(
                    [partial(gumbel.gumbel_topk_ref, logits, uniform, k)] * calls, args.repeats
                )
                print(
                    f"{batch:>3} {vocab:>7} {k:>4} | {kernel * 1e6:>9.1f} {ref * 1e6:>8.1f} "
                    f"{ref / kernel:>9.2f}x",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.4, 0.5, 0.65, 0.9])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--skip-sparse", action="store_true")
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--skip-gumbel", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_kernels needs a CUDA GPU")
    import triton

    sheet, copy_bw = peak_bandwidth(args.repeats)
    peak = sheet or copy_bw
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    sheet_text = f"{sheet / 1e9:.0f} GB/s" if sheet else "unknown (the copy is the peak)"
    print(f"bandwidth: data sheet {sheet_text}; device-to-device copy {copy_bw / 1e9:.0f} GB/s")
    if args.sweep:
        sweep(args, peak)
    if not args.skip_sparse:
        bench_sparse(args, peak, copy_bw)
    if not args.skip_lora:
        bench_lora(args)
    if not args.skip_gumbel:
        bench_gumbel(args)


if __name__ == "__main__":
    main()
