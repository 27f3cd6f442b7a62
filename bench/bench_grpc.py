"""What the gRPC server keeps of the engine's tokens/s: paired, interleaved runs.

bench_decode.py measures each system in its own process, one after the other; on a machine whose
memory bandwidth drifts by 10-20% from minute to minute that confounds the gRPC/engine ratio with
the time of day. Here both stay loaded for the whole run: the server (`tandem serve`, its own
process) and a bare `LLMEngine` in this process; each repeat runs the same kind of workload on
one, then on the other (alternating which goes first), and the ratio of every adjacent pair is
reported with the best of each. Whichever side is not being measured is idle (the server's
stepping thread blocks on its inbox).

    python bench/bench_grpc.py [--model DIR] [--repeats 5] [--max-new-tokens 64] [--batch 1 8]
        [--servers process thread] [--server-env NAME=VALUE ...] [--server-arg=ARG ...]

`--servers`: the server's engine in a process of its own (`tandem serve`'s default) and/or on a
thread of the server's process (`--engine-in-process`); each is a server of its own, all
alternated with the bare engine in every repeat. `--client`: blocking stubs, one thread per
stream (the default), or `aio`: grpc.aio stubs, every stream on one event loop, which costs
this process less CPU per message (the client shares the machine's cores with the engines;
a production client runs elsewhere).

Prints figures, asserts nothing. Greedy, EOS ignored, 32-token random prompts, a fresh prompt
for every call.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.bench_decode import _free_port, _wait_for_serving, progress  # noqa: E402
from bench.make_bench_model import build_bench_model  # noqa: E402

PROMPT_LEN = 32
# Server command-line flags per --servers choice.
SERVER_FLAGS = {"process": [], "thread": ["--engine-in-process"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model directory (default: the bench model)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=sorted(SERVER_FLAGS),
        default=["process"],
        help="where each server runs its engine (default: process, tandem serve's default)",
    )
    parser.add_argument(
        "--engine-threads",
        type=int,
        help="threads of every engine (torch's and the C kernels' team; default: one per "
        "core): fewer than the cores leaves the servers' event loops and the client a core",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="append to every server's command line (e.g. --server-arg=--stream-interval "
        "--server-arg=4), repeatable",
    )
    parser.add_argument(
        "--client",
        choices=["threads", "aio"],
        default="threads",
        help="blocking stubs on a thread per stream, or grpc.aio on one event loop",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the server's environment only (e.g. OpenMP's wait policy), repeatable",
    )
    args = parser.parse_args()

    import grpc

    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.types import Request, SamplingParams, StoppingCriteria
    from tandem.v1 import tandem_pb2, tandem_pb2_grpc

    model = args.model or build_bench_model()
    env = {**os.environ, **dict(item.split("=", 1) for item in args.server_env)}
    if args.engine_threads:
        import torch

        torch.set_num_threads(args.engine_threads)
        env["OMP_NUM_THREADS"] = str(args.engine_threads)
    ports = {name: _free_port() for name in args.servers}
    servers = {}
    for name in args.servers:
        command = [sys.executable, "-m", "server.cli", "serve", "--model", model]
        command += ["--port", str(ports[name]), "--dtype", "bfloat16", *SERVER_FLAGS[name]]
        command += args.server_arg
        servers[name] = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
    try:
        progress("loading the engine in this process")
        engine = LLMEngine.from_dir(model, EngineConfig(dtype="bfloat16"))
        channels = {name: grpc.insecure_channel(f"127.0.0.1:{ports[name]}") for name in servers}
        for name, channel in channels.items():
            progress(f"waiting for the server ({name}) to be SERVING")
            _wait_for_serving(channel, servers[name].pid, 600.0)
        stubs = {name: tandem_pb2_grpc.GenerationStub(ch) for name, ch in channels.items()}
        model_id = Path(model).name
        rng = random.Random(0)
        ids = itertools.count()
        vocab = engine.model.config.vocab_size

        def prompt() -> list[int]:
            return [rng.randrange(3, vocab) for _ in range(PROMPT_LEN)]

        def run_engine(batch: int, n: int) -> int:
            requests = [
                Request(
                    request_id=f"e{next(ids)}",
                    prompt_token_ids=prompt(),
                    sampling=SamplingParams(temperature=0.0),
                    stopping=StoppingCriteria(max_new_tokens=n, ignore_eos=True),
                )
                for _ in range(batch)
            ]
            outputs = engine.generate(requests)
            return sum(len(out.token_ids) for out in outputs.values())

        def stream_one(stub, tokens: list[int], n: int) -> int:
            request = tandem_pb2.GenerateRequest(
                model=model_id,
                token_ids=tokens,
                sampling=tandem_pb2.SamplingParams(temperature=0.0),
                stopping=tandem_pb2.StoppingCriteria(max_new_tokens=n, ignore_eos=True),
            )
            return sum(
                len(r.delta.token_ids) for r in stub.Generate(request) if r.HasField("delta")
            )

        with ThreadPoolExecutor(max_workers=max(args.batch)) as pool:

            def grpc_runner(stub) -> Callable[[int, int], int]:
                def run_grpc(batch: int, n: int) -> int:
                    prompts = [prompt() for _ in range(batch)]
                    return sum(pool.map(lambda p: stream_one(stub, p, n), prompts))

                return run_grpc

            if args.client == "aio":
                addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
                client = AioClient(addresses, model_id, prompt)
                runners = {name: client.runner(name) for name in stubs}
            else:
                runners = {name: grpc_runner(stub) for name, stub in stubs.items()}
            systems = {"engine": run_engine}
            systems.update({f"grpc-{name}": run for name, run in runners.items()})
            pids = {f"grpc-{name}": server.pid for name, server in servers.items()}
            for run in systems.values():  # warm-up, and the servers' first requests
                run(max(args.batch), 8)
            for batch in args.batch:
                rates: dict[str, list[float]] = {name: [] for name in systems}
                # Per streamed token, microseconds of CPU: the server's own process (its event
                # loop and gRPC's threads, not an engine process) and this client's.
                server_cpu: dict[str, list[float]] = {name: [] for name in pids}
                client_cpu: dict[str, list[float]] = {name: [] for name in pids}
                for r in range(args.repeats):
                    order = list(systems)[r % len(systems) :] + list(systems)[: r % len(systems)]
                    for name in order:
                        progress(f"batch {batch}, repeat {r + 1}/{args.repeats}: {name}")
                        server_start = _cpu_seconds(pids[name]) if name in pids else 0.0
                        client_start = time.process_time()
                        start = time.perf_counter()
                        tokens = systems[name](batch, args.max_new_tokens)
                        rates[name].append(tokens / (time.perf_counter() - start))
                        if name in pids:
                            server = _cpu_seconds(pids[name]) - server_start
                            server_cpu[name].append(server / tokens * 1e6)
                            client = time.process_time() - client_start
                            client_cpu[name].append(client / tokens * 1e6)
                best_engine = max(rates["engine"])
                for name in systems:
                    if name == "engine":
                        continue
                    pairs = [g / e for g, e in zip(rates[name], rates["engine"], strict=True)]
                    best = max(rates[name])
                    print(
                        f"batch {batch}: engine best {best_engine:.1f} tok/s, {name} best "
                        f"{best:.1f} tok/s, best/best {best / best_engine:.3f}; "
                        f"paired {name}/engine median {statistics.median(pairs):.3f} "
                        f"(min {min(pairs):.3f}, max {max(pairs):.3f}, {len(pairs)} pairs); "
                        f"CPU per token: server {statistics.median(server_cpu[name]):.0f} us, "
                        f"client {statistics.median(client_cpu[name]):.0f} us (medians)",
                        flush=True,
                    )
        for channel in channels.values():
            channel.close()
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(timeout=60)


class AioClient:
    """grpc.aio stubs on one event loop, run by a thread of its own: a batch's streams are
    coroutines of that loop, not threads."""

    def __init__(self, addresses: dict[str, str], model_id: str, prompt: Callable) -> None:
        import asyncio
        import threading

        self._asyncio = asyncio
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self._model_id, self._prompt = model_id, prompt
        self._stubs = self._call(self._make_stubs(addresses))

    def _call(self, coroutine):
        return self._asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _make_stubs(self, addresses: dict[str, str]) -> dict:
        import grpc

        from tandem.v1 import tandem_pb2_grpc

        return {
            name: tandem_pb2_grpc.GenerationStub(grpc.aio.insecure_channel(address))
            for name, address in addresses.items()
        }

    async def _stream_one(self, stub, tokens: list[int], n: int) -> int:
        from tandem.v1 import tandem_pb2

        request = tandem_pb2.GenerateRequest(
            model=self._model_id,
            token_ids=tokens,
            sampling=tandem_pb2.SamplingParams(temperature=0.0),
            stopping=tandem_pb2.StoppingCriteria(max_new_tokens=n, ignore_eos=True),
        )
        received = 0
        async for response in stub.Generate(request):
            if response.HasField("delta"):
                received += len(response.delta.token_ids)
        return received

    async def _batch(self, stub, prompts: list[list[int]], n: int) -> int:
        streams = [self._stream_one(stub, tokens, n) for tokens in prompts]
        return sum(await self._asyncio.gather(*streams))

    def runner(self, name: str) -> Callable[[int, int], int]:
        def run_grpc(batch: int, n: int) -> int:
            prompts = [self._prompt() for _ in range(batch)]
            return self._call(self._batch(self._stubs[name], prompts, n))

        return run_grpc


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of process `pid` so far (Linux schedstat, nanoseconds)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
    return total / 1e9


if __name__ == "__main__":
    main()
