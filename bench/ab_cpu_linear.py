"""A/B two versions of kernels/csrc/cpu_linear.c on whole decode steps, interleaved step by step.

On a shared machine the memory bandwidth drifts by 10-20% within minutes, so two runs one after
the other cannot resolve a few percent. This compiles the current source and a second one (for
example the previous commit's: `git show HEAD~1:kernels/csrc/cpu_linear.c > /tmp/old.c`) into
two modules, then runs batch-8 decode on the benchmark model (bench/make_bench_model.py), with
no adapter and with 8 distinct rank-16 LoRA adapters (bench/bench_lora.py's), switching the
bf16 kernel between the two versions at every step. Prints the median step time of each version;
both see the same drift. Nothing is asserted. The other version must take the 11-argument call
(output row stride, accumulate) that kernels.cpu_linear.linear_add_ makes: sources from before
it (commit 9898dc5) fail on the adapter steps.

    python bench/ab_cpu_linear.py --other /tmp/old.c [--steps 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def load_amx_kernel(source: Path):
    """The bf16 `linear_amx` of `source`, compiled with the flags kernels.cpu_linear uses."""
    from kernels import cpu_linear
    from kernels.build import build_shared_library

    flags = (*cpu_linear._COMMON_FLAGS, "-DTANDEM_BF16", f"-I{sysconfig.get_paths()['include']}")
    path = build_shared_library(source, flags)
    loader = importlib.machinery.ExtensionFileLoader("cpu_linear_bf16", str(path))
    spec = importlib.util.spec_from_file_location("cpu_linear_bf16", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    if not module.enable_amx():
        raise SystemExit("this machine grants no AMX state: nothing to compare")
    return module.linear_amx


def kernel_installers(kernels: dict) -> dict:
    """Per version, the function that makes it the bf16 kernel of kernels.cpu_linear."""
    import torch

    from kernels import cpu_linear

    def installer(kernel):
        return lambda: cpu_linear._kernels.__setitem__(torch.bfloat16, kernel)

    return {name: installer(kernel) for name, kernel in kernels.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="the other cpu_linear.c")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from bench.bench_lora import load_bench_adapters
    from bench.interleave import interleaved_step_times
    from bench.make_bench_model import build_bench_model
    from engine.llm_engine import EngineConfig, LLMEngine
    from kernels.build import CSRC_DIR
    from kernels.cpu_linear import variants

    if "amx" not in variants(torch.bfloat16):
        raise SystemExit("no AMX kernel on this machine: nothing to compare")
    kernels = {
        "current": load_amx_kernel(CSRC_DIR / "cpu_linear.c"),
        "other": load_amx_kernel(args.other),
    }
    installers = kernel_installers(kernels)
    engine = LLMEngine.from_dir(build_bench_model(), EngineConfig(dtype="bfloat16", max_num_seqs=8))
    ids = load_bench_adapters(engine, 8)
    interleaved_step_times(engine, installers, ids, 4)  # warm-up
    for round_index in range(args.rounds):
        base = interleaved_step_times(engine, installers, [None] * 8, args.steps)
        lora = interleaved_step_times(engine, installers, ids, args.steps)
        for name in kernels:
            base_ms = statistics.median(base[name]) * 1e3
            lora_ms = statistics.median(lora[name]) * 1e3
            print(
                f"round {round_index}  {name:8s} batch-8 step: no adapter {base_ms:.1f} ms, "
                f"8 adapters {lora_ms:.1f} ms (ratio {base_ms / lora_ms:.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
