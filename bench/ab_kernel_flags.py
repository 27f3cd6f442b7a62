"""A/B two builds of a CPU kernel on a decode step's projections, switched round by round.

Builds kernels/csrc/cpu_linear.c (or sparse_linear.c; or a copy of it, `--a-source` and
`--b-source`) twice, with the flags kernels/ uses plus `--a` and `--b` (e.g.
`--b=-DPREFETCH_L2`), and times the 96 projections of one decode step of the benchmark model's
shapes (Qwen2.5-0.5B: 24 layers of qkv, o, gate_up, down; bf16, random
weights, 716 MB, more than the caches hold; or --layers copies of the --shapes given) at
--rows input rows, each build in turn in every
round, so both see the same drift of the machine's bandwidth. The weights sit in one huge-page
arena as the engine's loader places them (engine.huge_pages; --4k-pages: torch's allocator).
The sparse kernel gets W.T and TEAL thresholds keeping --keep of each row's channels. Prints
the median and best round of each build; asserts nothing.

    python bench/ab_kernel_flags.py --b=-DPREFETCH_L2 --rows 8
    python bench/ab_kernel_flags.py --kernel sparse --b=-DPREFETCH_HINT=_MM_HINT_T1
    git show HEAD:kernels/csrc/cpu_linear.c > /tmp/old.c  # a change against the last commit
    python bench/ab_kernel_flags.py --a-source /tmp/old.c --a=-DPREFETCH_L2 --b=-DPREFETCH_L2 \
        --rows 8
    python bench/ab_kernel_flags.py ... --shapes 4096x2048 --layers 24  # other projections: N x K
    python bench/ab_kernel_flags.py ... --rounds 1500 --spells  # B / A per bandwidth spell

--spells reads 1 GiB (torch.sum) at the start of every round and splits the rounds' B / A
ratios by that read: a VM whose read rate jumps between levels (the EPYC: about 34 and 60
GB/s) can rank two builds differently at each level.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# (out features, in features) of each projection of a layer.
SHAPES = ((1152, 896), (896, 896), (9728, 896), (896, 4864))
LAYERS = 24
FAST_SPELL = 0.8  # --spells: rounds whose read is at least this share of the fastest


def load(kernel: str, isa: str, extra: list[str], source_file: str | None = None, dtype="bf16"):
    """The `dtype` module's `linear` (bf16 or f32; f32 for the dense kernel only), built from
    its source (or `source_file`, a variant of it) with kernels/'s flags for instruction set
    `isa` (not its CPU-dependent ones) plus `extra`."""
    from kernels import cpu_linear, sparse
    from kernels.build import build_shared_library, load_extension

    suffix = "" if isa == "avx512" else f"_{isa}"
    if kernel == "dense":
        name, source = f"cpu_linear_{dtype}{suffix}", cpu_linear._SOURCE
        flags = (*cpu_linear._COMMON_FLAGS, *cpu_linear._ISA_FLAGS[isa])
    else:
        name, source = f"sparse_linear_bf16{suffix}", sparse._SOURCE
        flags = (*sparse._FLAGS, *sparse._ISA_FLAGS[isa])
        if isa == "avx512":
            flags = (*flags, "-mavx512bf16")
    source = Path(source_file) if source_file else source
    include = f"-I{sysconfig.get_paths()['include']}"
    path = build_shared_library(source, (*flags, f"-DTANDEM_{dtype.upper()}", include, *extra))
    return load_extension(name, path).linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=["dense", "sparse"], default="dense")
    parser.add_argument(
        "--isa", choices=["avx512", "avx2"], help="the instruction set (default: the best)"
    )
    parser.add_argument("--a", default="", help="extra flags of build A (space-separated)")
    parser.add_argument("--b", default="", help="extra flags of build B")
    parser.add_argument("--a-source", help="build A from this copy of the kernel's source")
    parser.add_argument("--b-source", help="build B from this copy of the kernel's source")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument(
        "--dtype", choices=["bf16", "f32"], default="bf16", help="weights and x (f32: dense only)"
    )
    parser.add_argument("--keep", type=float, default=0.5, help="sparse: channels kept per row")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--shapes", nargs="+", help="projections as OUTxIN (default: the benchmark model's)"
    )
    parser.add_argument("--layers", type=int, default=LAYERS, help="copies of the shapes")
    parser.add_argument("--spells", action="store_true", help="split B / A by bandwidth spell")
    parser.add_argument(
        "--4k-pages", dest="small_pages", action="store_true", help="weights from torch's allocator"
    )
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    if args.dtype == "f32" and args.kernel != "dense":
        parser.error("--dtype f32 times the dense kernel only")

    import torch

    from kernels.build import cpu_flags

    isa = args.isa or ("avx512" if "avx512_bf16" in cpu_flags() else "avx2")
    builds = {
        f"A {args.a_source or ''} {args.a}": load(
            args.kernel, isa, args.a.split(), args.a_source, args.dtype
        ),
        f"B {args.b_source or ''} {args.b}": load(
            args.kernel, isa, args.b.split(), args.b_source, args.dtype
        ),
    }
    from engine.huge_pages import HugePageArena

    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    arena = HugePageArena.for_sizes(
        [0 if args.small_pages else n * k * dtype.itemsize for n, k in shapes] * args.layers
    )
    steps, tensors = [], []  # each projection's call arguments; the tensors they point into
    for _ in range(args.layers):
        for n, k in shapes:
            x = torch.randn(args.rows, k, generator=generator).to(dtype)
            out = torch.empty(args.rows, n, dtype=dtype)
            if args.kernel == "dense":
                w = arena.copy_of(torch.randn(n, k, generator=generator) * 0.02, dtype)
                steps.append((x.data_ptr(), k, w.data_ptr(), 0, out.data_ptr(), args.rows, n, k))
                tensors.append((x, w, out))
                continue
            w = arena.copy_of(torch.randn(k, n, generator=generator) * 0.02, torch.bfloat16)
            thresholds = x.float().abs().quantile(1 - args.keep, dim=1).contiguous()
            steps.append((x.data_ptr(), k, w.data_ptr(), 0, thresholds.data_ptr(), 0,
                          out.data_ptr(), args.rows, n, k))  # fmt: skip
            tensors.append((x, w, out, thresholds))
    times: dict[str, list[float]] = {name: [] for name in builds}
    probe = torch.ones((1 << 30) // 4 // 4096, 4096) if args.spells else None
    reads: list[float] = []
    for round_ in range(args.rounds):
        if probe is not None:
            started = time.perf_counter()
            probe.sum()
            reads.append(probe.numel() * 4 / (time.perf_counter() - started))
        for name, linear in builds.items():
            started = time.perf_counter()
            for call in steps:
                linear(*call, args.threads)
            times[name].append(time.perf_counter() - started)
        if (round_ + 1) % 10 == 0:
            print(f"[ab] round {round_ + 1}/{args.rounds}", file=sys.stderr)
    kind = f"{args.kernel} kernel ({isa})"
    print(f"{kind}, {args.rows} rows, {args.layers} x {len(shapes)} projections ({args.dtype})")
    for name, values in times.items():
        median, best = statistics.median(values) * 1e3, min(values) * 1e3
        print(f"  {name:<40} median {median:6.2f} ms   best {best:6.2f} ms")
    a, b = times.values()
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    groups = {"all rounds": ratios}
    if reads:
        fast = [read >= FAST_SPELL * max(reads) for read in reads]
        groups["fast spell"] = [r for r, is_fast in zip(ratios, fast, strict=True) if is_fast]
        groups["slow spell"] = [r for r, is_fast in zip(ratios, fast, strict=True) if not is_fast]
        print(f"  spells: fast = a read at least {FAST_SPELL:.0%} of {max(reads) / 1e9:.1f} GB/s")
    for label, values in groups.items():
        if values:
            ordered = sorted(values)
            print(
                f"  B / A, {label} ({len(values)}): median {statistics.median(values):.3f}, "
                f"quartiles {ordered[len(values) // 4]:.3f} - {ordered[3 * len(values) // 4]:.3f}"
            )


if __name__ == "__main__":
    main()
