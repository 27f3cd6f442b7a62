"""A/B two builds of the multi-LoRA kernel on the LoRA calls of one batch-8 decode step.

Builds kernels/csrc/cpu_linear.c (or the copies given) twice with the flags kernels/ uses on
this CPU (AVX-512, bf16), and times the 96 LoRA calls of a decode step of the benchmark model's
shapes (Qwen2.5-0.5B: 24 layers of qkv, o, gate_up and down), each row of the batch with its
own rank-16 adapter (the segmented form), --slots slots in the stacks (more slots than rows: a
server whose slots hold adapters this batch does not use). The weights exceed the caches
(`--hot`: one layer's, repeated). The two builds alternate round by round and must give the
same bits. Prints each build's median and best; asserts nothing else.

    git show HEAD~1:kernels/csrc/cpu_linear.c > /tmp/old.c
    python bench/ab_lora_calls.py --a-source /tmp/old.c [--slots 16] [--rounds 16] [--hot]
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

ROWS, RANK, LAYERS = 8, 16, 24
# (in features, slices (first output column, width)) of each projection group of a layer.
GROUPS = (
    (896, ((0, 896), (896, 128), (1024, 128))),
    (896, ((0, 896),)),
    (896, ((0, 4864), (4864, 4864))),
    (4864, ((0, 896),)),
)


def load(source: Path):
    """The bf16 AVX-512 module built from `source` with kernels/'s flags for this CPU."""
    from kernels import cpu_linear
    from kernels.build import build_shared_library, cpu_vendor, load_extension

    flags = [*cpu_linear._COMMON_FLAGS, *cpu_linear._ISA_FLAGS["avx512"], "-DTANDEM_BF16"]
    flags.append(f"-I{sysconfig.get_paths()['include']}")
    if cpu_vendor() == "AuthenticAMD":
        flags.append("-DPREFETCH_L2")
    return load_extension("cpu_linear_bf16", build_shared_library(source, tuple(flags)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-source", type=Path, help="build A from this copy of the source")
    parser.add_argument("--b-source", type=Path, help="build B from this copy of the source")
    parser.add_argument("--slots", type=int, default=ROWS, help=f"at least {ROWS}")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--hot", action="store_true", help="one layer's weights, repeated")
    args = parser.parse_args()

    import torch

    from kernels import cpu_linear
    from kernels.build import cpu_flags

    if "avx512_bf16" not in cpu_flags():
        sys.exit("this benchmark builds the AVX-512 BF16 kernel, which this CPU cannot run")
    default = cpu_linear._SOURCE
    builds = {"A": load(args.a_source or default), "B": load(args.b_source or default)}
    columns = args.slots * RANK
    mask = torch.zeros(ROWS, columns, dtype=torch.int16)  # row i: slot i, weight 1
    for i in range(ROWS):
        mask[i, i * RANK : (i + 1) * RANK] = -1
    generator = torch.Generator().manual_seed(0)
    calls, tensors = [], []
    for _ in range(1 if args.hot else LAYERS):
        for k, slices in GROUPS:
            a = (torch.randn(len(slices) * columns, k, generator=generator) * 0.05).bfloat16()
            b = (
                torch.randn(sum(w for _, w in slices), columns, generator=generator) * 0.05
            ).bfloat16()
            x = torch.randn(ROWS, k, generator=generator).bfloat16()
            width = max(start + w for start, w in slices)
            y = torch.zeros(ROWS, width, dtype=torch.bfloat16)
            layout = cpu_linear._slice_layout(slices)
            tensors.append((a, b, x, y, layout))
            calls.append((x.data_ptr(), k, a.data_ptr(), 0, mask.data_ptr(), 1, b.data_ptr(),
                          y.data_ptr(), width, layout.data_ptr(),
                          layout.data_ptr() + 8 * len(slices), len(slices), columns, ROWS, k,
                          0, 2, 0))  # fmt: skip
    calls *= LAYERS if args.hot else 1
    results = {}
    for name, module in builds.items():
        for *_, y, _ in tensors:
            y.zero_()
        for call in calls[: len(tensors)]:
            module.lora_dense(*call)
        results[name] = [y.clone() for *_, y, _ in tensors]
    for got, want in zip(results["A"], results["B"], strict=True):
        if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
            sys.exit("the two builds give different bits")
    times: dict[str, list[float]] = {name: [] for name in builds}
    for round_ in range(args.rounds):
        order = list(builds) if round_ % 2 == 0 else list(reversed(builds))
        for name in order:
            started = time.perf_counter()
            for call in calls:
                builds[name].lora_dense(*call)
            times[name].append(time.perf_counter() - started)
    where = "one layer's weights, hot" if args.hot else "weights from memory"
    print(f"{len(calls)} LoRA calls, {ROWS} rows, rank {RANK}, {args.slots} slots ({where})")
    for name, source in (("A", args.a_source or default), ("B", args.b_source or default)):
        median, best = statistics.median(times[name]) * 1e3, min(times[name]) * 1e3
        print(f"  {name} {source}: median {median:6.2f} ms   best {best:6.2f} ms")


if __name__ == "__main__":
    main()
