"""What the gRPC server keeps of the engine's tokens/s: paired, interleaved runs.

bench_decode.py measures each system in its own process, one after the other; on a machine whose
memory bandwidth drifts by 10-20% from minute to minute that confounds the gRPC/engine ratio with
the time of day. Here both stay loaded for the whole run: the server (`tandem serve`, its own
process) and a bare `LLMEngine` in this process; each repeat runs the same kind of workload on
one, then on the other (alternating which goes first), and the ratio of every adjacent pair is
reported with the best of each. Whichever side is not being measured is idle (the server's
stepping thread blocks on its inbox).

    python bench/bench_grpc.py [--model DIR] [--repeats 5] [--max-new-tokens 64] [--batch 1 8]
        [--server-env NAME=VALUE ...]

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.bench_decode import _free_port, _wait_for_serving, progress  # noqa: E402
from bench.make_bench_model import build_bench_model  # noqa: E402

PROMPT_LEN = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model directory (default: the bench model)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
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
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", str(port),
         "--dtype", "bfloat16"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **dict(item.split("=", 1) for item in args.server_env)},
    )  # fmt: skip
    try:
        progress("loading the engine in this process")
        engine = LLMEngine.from_dir(model, EngineConfig(dtype="bfloat16"))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        progress("waiting for the server to be SERVING")
        _wait_for_serving(channel, server.pid, 600.0)
        stub = tandem_pb2_grpc.GenerationStub(channel)
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

        def stream_one(tokens: list[int], n: int) -> int:
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

            def run_grpc(batch: int, n: int) -> int:
                prompts = [prompt() for _ in range(batch)]
                return sum(pool.map(lambda p: stream_one(p, n), prompts))

            systems = {"engine": run_engine, "grpc": run_grpc}
            for run in systems.values():  # warm-up, and the server's first requests
                run(max(args.batch), 8)
            for batch in args.batch:
                rates: dict[str, list[float]] = {name: [] for name in systems}
                for r in range(args.repeats):
                    order = list(systems) if r % 2 == 0 else list(reversed(systems))
                    for name in order:
                        progress(f"batch {batch}, repeat {r + 1}/{args.repeats}: {name}")
                        start = time.perf_counter()
                        tokens = systems[name](batch, args.max_new_tokens)
                        rates[name].append(tokens / (time.perf_counter() - start))
                pairs = [g / e for g, e in zip(rates["grpc"], rates["engine"], strict=True)]
                best_engine, best_grpc = max(rates["engine"]), max(rates["grpc"])
                print(
                    f"batch {batch}: engine best {best_engine:.1f} tok/s, gRPC best "
                    f"{best_grpc:.1f} tok/s, best/best {best_grpc / best_engine:.3f}; "
                    f"paired gRPC/engine median {statistics.median(pairs):.3f} "
                    f"(min {min(pairs):.3f}, max {max(pairs):.3f}, {len(pairs)} pairs)",
                    flush=True,
                )
        channel.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
