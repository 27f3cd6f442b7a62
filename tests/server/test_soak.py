"""Chaos over real gRPC: clients at once mixing every kind of request against one server whose KV
cache is too small for them (so running requests are preempted and recomputed), while adapters
are loaded and unloaded. What must hold throughout: every greedy stream equals transformers'
(PEFT's with the adapter), fused and seeded streams equal the same request run alone, constrained
outputs are valid and complete, cancels, deadlines, aborts and bad requests get their status
codes; and afterwards nothing is left running, every KV block is free, the server is SERVING,
logged no traceback, and exits 0 on SIGTERM.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jsonschema
import pytest
import torch
import transformers
from grpc_health.v1 import health_pb2
from peft import LoraConfig, get_peft_model

from tandem.v1 import tandem_pb2 as pb

SOAK_SECONDS = 20.0
CLIENTS = 8  # with --max-num-seqs 4 and --max-queue 8 no request is ever refused for room
NEW_TOKENS = 12
LONG_TOKENS = 700  # four of these fill the 1 MB cache (2048 tokens) on their own
GREEDY = pb.SamplingParams(temperature=0.0)
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}
# A shared 40-token system prompt, so that the prefix cache serves most prompts' blocks.
_SYSTEM = torch.randint(3, 32000, (40,), generator=torch.Generator().manual_seed(7)).tolist()
PROMPTS = [[1, *_SYSTEM, 100 + i, 200 + i, 300 + i] for i in range(4)]
Failures = list[str]


@pytest.fixture(scope="module")
def peft_model(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A random rank-4 adapter on every projection, saved for the server: (model, directory)."""
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # PEFT zeroes lora_B: random factors that change the tokens
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    out = tmp_path_factory.mktemp("soak-adapter")
    model.save_pretrained(out)
    return model.eval(), out


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


def stream(server, timeout: float = 60, **fields: object) -> tuple[list[int], str, pb.Final]:
    deltas, final = server.generate(timeout=timeout, **fields)
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), final


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


class Soak:
    """The request kinds; each checks its own outcome and returns what went wrong."""

    def __init__(self, server, expected: dict, adapter_dir: Path) -> None:
        self.server = server
        self.expected = expected  # (kind, key...) -> tokens
        self.adapter_dir = adapter_dir

    def greedy(self, rng: random.Random) -> str | None:
        prompt, adapter = rng.randrange(len(PROMPTS)), rng.choice([None, "soak"])
        tokens, _, _ = stream(
            self.server,
            token_ids=PROMPTS[prompt],
            adapter_id=adapter,
            sampling=GREEDY,
            stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        )
        if tokens != self.expected["greedy", prompt, adapter]:
            return f"greedy prompt {prompt} adapter {adapter}: {tokens}"
        return None

    def long(self, rng: random.Random) -> str | None:
        tokens, _, _ = stream(
            self.server,
            token_ids=PROMPTS[0],
            sampling=GREEDY,
            stopping=pb.StoppingCriteria(max_new_tokens=LONG_TOKENS, ignore_eos=True),
        )
        return None if tokens == self.expected["long"] else "long greedy stream differs"

    def fused(self, rng: random.Random) -> str | None:
        prompt = rng.randrange(len(PROMPTS))
        tokens, _, _ = stream(self.server, **fused_request(prompt))
        return None if tokens == self.expected["fused", prompt] else f"fused prompt {prompt}"

    def seeded(self, rng: random.Random) -> str | None:
        seed = rng.randrange(3)
        tokens, _, _ = stream(self.server, **seeded_request(seed))
        return None if tokens == self.expected["seeded", seed] else f"seeded {seed}: {tokens}"

    def constrained(self, rng: random.Random) -> str | None:
        method = rng.choice(
            [pb.CONSTRAINT_METHOD_AWRS, pb.CONSTRAINT_METHOD_MASK, pb.CONSTRAINT_METHOD_SMC]
        )
        constraint = pb.Constraint(json_schema=json.dumps(SCHEMA), method=method)
        if method == pb.CONSTRAINT_METHOD_SMC:
            constraint.particles = 3
        _, text, final = stream(
            self.server,
            token_ids=PROMPTS[rng.randrange(len(PROMPTS))],
            adapter_id=rng.choice([None, "soak"]),
            sampling=pb.SamplingParams(temperature=1.0, seed=rng.randrange(1000)),
            stopping=pb.StoppingCriteria(max_new_tokens=64),
            constraint=constraint,
        )
        if final.finish_reason != pb.FINISH_REASON_EOS:
            return f"constrained ({method}) ended {final.finish_reason}: {text!r}"
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError) as error:
            return f"constrained ({method}) {text!r}: {error}"
        return None

    def cancel(self, rng: random.Random) -> str | None:
        call = self.server.generation.Generate(long_request(), timeout=60)
        for seen, _ in enumerate(call):
            if seen >= rng.randrange(8):
                break
        call.cancel()
        return None

    def deadline(self, rng: random.Random) -> str | None:
        code = code_of(lambda: stream(self.server, rng.uniform(0.02, 0.3), **long_fields()))
        return None if code == grpc.StatusCode.DEADLINE_EXCEEDED else f"deadline: {code}"

    def abort(self, rng: random.Random) -> str | None:
        """Abort RPC from another thread, maybe before the stream starts or after it ends."""
        request_id = f"soak-abort-{rng.random()}"
        abort = pb.AbortRequest(request_id=request_id)
        codes = []
        timer = threading.Timer(
            rng.uniform(0, 0.3), lambda: codes.append(code_of(lambda: self._abort(abort)))
        )
        timer.start()
        _, _, final = stream(self.server, request_id=request_id, **long_fields())
        timer.join()
        if codes[0] not in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND):
            return f"abort RPC: {codes[0]}"
        if final.finish_reason not in (pb.FINISH_REASON_ABORTED, pb.FINISH_REASON_LENGTH):
            return f"aborted stream ended {final.finish_reason}"
        return None

    def _abort(self, request: pb.AbortRequest) -> None:
        self.server.generation.Abort(request, timeout=10)

    def bad(self, rng: random.Random) -> str | None:
        fields, expected = rng.choice(BAD_REQUESTS)
        code = code_of(lambda: stream(self.server, **fields))
        return None if code == expected else f"bad {fields}: {code}, expected {expected}"

    def hot_adapter(self, rng: random.Random) -> str | None:
        """Load, use and unload an adapter whose id other clients load and unload too."""
        adapter_id = f"hot{rng.randrange(2)}"
        registry = self.server.registry
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, path=str(self.adapter_dir))
        codes = [code_of(lambda: registry.LoadAdapter(request))]
        tokens: list[int] = []
        fields = {
            "token_ids": PROMPTS[0],
            "adapter_id": adapter_id,
            "sampling": GREEDY,
            "stopping": pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        }
        codes.append(code_of(lambda: tokens.extend(stream(self.server, **fields)[0])))
        unload = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        codes.append(code_of(lambda: registry.UnloadAdapter(unload)))
        allowed = [
            {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS},
            {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND},
            {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND},
        ]
        if any(code not in ok for code, ok in zip(codes, allowed, strict=True)):
            return f"hot adapter: {codes}"
        if codes[1] == grpc.StatusCode.OK and tokens != self.expected["greedy", 0, "soak"]:
            return f"hot adapter tokens {tokens}"
        return None


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
BAD_REQUESTS = [
    ({"text": "x", "sampling": pb.SamplingParams(temperature=-1)}, INVALID),
    ({"text": "x", "adapter_id": "missing"}, NOT_FOUND),
    ({"text": "x", "token_ids": [1, 2]}, INVALID),
    ({"model": "missing", "text": "x"}, NOT_FOUND),
    ({"text": "x", "constraint": pb.Constraint(regex="(")}, INVALID),
    ({"text": "x", "experts": [pb.ExpertRef(expert_id="missing")]}, NOT_FOUND),
    ({"token_ids": [1, 999999]}, INVALID),
]
KINDS = {  # kind -> weight
    "greedy": 6,
    "long": 1,
    "fused": 2,
    "seeded": 2,
    "constrained": 3,
    "cancel": 2,
    "deadline": 1,
    "abort": 1,
    "bad": 2,
    "hot_adapter": 1,
}


def long_fields() -> dict:
    return {
        "token_ids": PROMPTS[1],
        "sampling": pb.SamplingParams(temperature=1.0),
        "stopping": pb.StoppingCriteria(max_new_tokens=LONG_TOKENS, ignore_eos=True),
    }


def long_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(**long_fields())


def fused_request(prompt: int) -> dict:
    return {
        "token_ids": PROMPTS[prompt],
        "experts": [pb.ExpertRef(expert_id="full")],
        "sampling": GREEDY,
        "stopping": pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
    }


def seeded_request(seed: int) -> dict:
    return {
        "token_ids": PROMPTS[2],
        "sampling": pb.SamplingParams(temperature=1.0, top_p=0.9, seed=seed),
        "stopping": pb.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
    }


def expectations(server, hf_model, peft_model) -> dict:
    """Greedy tokens from transformers and PEFT; fused and seeded ones from the server, each
    request alone, before the soak."""
    expected: dict = {}
    for prompt in range(len(PROMPTS)):
        expected["greedy", prompt, None] = hf_greedy(hf_model, PROMPTS[prompt], NEW_TOKENS)
        expected["greedy", prompt, "soak"] = hf_greedy(peft_model, PROMPTS[prompt], NEW_TOKENS)
        expected["fused", prompt] = stream(server, **fused_request(prompt))[0]
    expected["long"] = hf_greedy(hf_model, PROMPTS[0], LONG_TOKENS)
    for seed in range(3):
        expected["seeded", seed] = stream(server, **seeded_request(seed))[0]
    return expected


def run_client(soak: Soak, seed: int, until: float, ran: Counter, failures: Failures) -> None:
    rng = random.Random(seed)
    kinds = [kind for kind, weight in KINDS.items() for _ in range(weight)]
    while time.monotonic() < until:
        kind = rng.choice(kinds)
        try:
            problem = getattr(soak, kind)(rng)
        except grpc.RpcError as error:
            problem = f"{kind}: {error.code()} {error.details()}"
        except Exception as error:  # every failure is reported at the end
            problem = f"{kind}: {type(error).__name__}: {error}"
        ran[kind] += 1
        if problem:
            failures.append(problem)


def test_chaos_keeps_every_stream_right_and_the_server_healthy(
    server_factory, hf_model, peft_model, tiny_small_dir, tiny_expert_dir
) -> None:
    model, adapter_dir = peft_model
    server = server_factory(
        "--adapter",
        f"soak={adapter_dir}",
        "--expert",
        f"full={tiny_expert_dir}@{tiny_small_dir}",
        "--kv-cache-mb",
        "1",
        "--max-num-seqs",
        "4",
        "--max-queue",
        "8",
    )
    server.wait_until_serving()
    soak = Soak(server, expectations(server, hf_model, model), adapter_dir)
    assert len(soak.expected["long"]) == LONG_TOKENS
    ran, failures = Counter(), []
    until = time.monotonic() + SOAK_SECONDS
    with ThreadPoolExecutor(CLIENTS) as pool:
        for client in range(CLIENTS):
            pool.submit(run_client, soak, client, until, ran, failures)
    assert not failures, "\n".join(failures[:20])
    assert set(ran) == set(KINDS), ran

    label = {"model_name": "tiny-llama"}
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        server.wait_for_metric(f"tandem:{gauge}", 0.0, **label)
    assert server.metric("tandem:num_preemptions_total", **label) > 0
    assert server.metric("tandem:prefix_cache_hits_total", **label) > 0
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.stop() == 0
    assert "Traceback" not in server.log(), server.log()
