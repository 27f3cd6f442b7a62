"""Small experts and logit fusion over real gRPC: loading and listing experts (full models and
LoRA adapters on a small base), static and dynamic fusion against an in-process oracle, hot
unloading under a running stream, every refusal's status code, `tandem serve --expert` and the
CLI.

The oracle is transformers in this process: the large model, the small base and the experts
run as Hugging Face models, and their logits fused as design.md section 6 says (in float64)
must give the tokens the server streams.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
import transformers
from grpc_health.v1 import health_pb2
from peft import PeftModel

from tandem.v1 import tandem_pb2 as pb

NEW_TOKENS = 12
PROMPT = [1, 1139, 7045, 1164, 4366, 29491]
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
STATIC, DYNAMIC = pb.FUSION_MODE_STATIC, pb.FUSION_MODE_DYNAMIC
# Dynamic fusion's alphas lie in [0, 2] (design.md: the paper's grid 0.0, 0.1, ..., 2.0).
GRID = [step / 10 for step in range(21)]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models run ten times faster on one thread than on two on this loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class Oracle:
    """tiny-llama, tiny-small and the experts `full` and `lora` as transformers runs them."""

    def __init__(self, large, small_dir: Path, expert_dir: Path, adapter_dir: Path) -> None:
        self.large = large
        self.small = _load(small_dir)
        self.experts = {
            "full": _load(expert_dir),
            "lora": PeftModel.from_pretrained(_load(small_dir), adapter_dir).eval(),
        }
        self._logits: dict[tuple[int, ...], tuple] = {}

    def logits(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token logits (float64) of the large model, the small base and each expert."""
        key = tuple(ids)
        if key not in self._logits:
            with torch.no_grad(), one_torch_thread():
                batch = torch.tensor([ids])
                last = [
                    model(batch).logits[0, -1].double()
                    for model in (self.large, self.small, *self.experts.values())
                ]
            self._logits[key] = (last[0], last[1], dict(zip(self.experts, last[2:], strict=True)))
        return self._logits[key]

    def fused(self, ids: list[int], alphas: dict[str, float]) -> torch.Tensor:
        """z_L + sum_t alpha_t (z_Et - z_S)."""
        large, small, experts = self.logits(ids)
        return large + sum(alpha * (experts[name] - small) for name, alpha in alphas.items())

    def static_greedy(self, ids: list[int], alphas: dict[str, float], new_tokens: int) -> list[int]:
        tokens: list[int] = []
        for _ in range(new_tokens):
            tokens.append(int(self.fused(ids + tokens, alphas).argmax()))
        return tokens

    def dynamic_cost(self, ids: list[int], name: str, alpha: float) -> float:
        """design.md's KL matching cost of `alpha` for expert `name` after `ids`."""
        large, small, experts = self.logits(ids)
        p, q, q_t = (torch.log_softmax(z, -1) for z in (large, small, experts[name]))
        fused = torch.log_softmax(large + alpha * (experts[name] - small), -1)
        return float((_kl(fused, p) - _kl(q_t, q)) ** 2 + (_kl(p, fused) - _kl(q, q_t)) ** 2)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum()


@pytest.fixture(scope="module")
def oracle(hf_model, tiny_small_dir, tiny_expert_dir, tiny_expert_adapter_dir) -> Oracle:
    return Oracle(hf_model, tiny_small_dir, tiny_expert_dir, tiny_expert_adapter_dir)


@pytest.fixture(scope="module")
def expert_server(server_factory, tiny_small_dir, tiny_expert_dir, tiny_expert_adapter_dir):
    """The tiny model with the experts `full` (a full model) and `lora` (an adapter), both on
    tiny-small, loaded at start by `tandem serve --expert`."""
    server = server_factory(
        "--expert",
        f"full={tiny_expert_dir}@{tiny_small_dir}",
        "--expert",
        f"tiny-llama:lora={tiny_expert_adapter_dir}@{tiny_small_dir}",
        "--max-num-seqs",
        "8",
        "--max-queue",
        "16",
    )
    server.wait_until_serving()
    return server


def generate(server, experts=(), mode=None, new_tokens=NEW_TOKENS, weights=True, **fields):
    """Greedy (unless `sampling` is given), `new_tokens` long: (tokens, fusion alphas per token
    or [] when not asked for, final). `experts` are ids or (id, weight) pairs."""
    refs = [
        pb.ExpertRef(expert_id=e)
        if isinstance(e, str)
        else pb.ExpertRef(expert_id=e[0], weight=e[1])
        for e in experts
    ]
    fields.setdefault("token_ids", PROMPT)
    fields.setdefault("sampling", pb.SamplingParams(temperature=0.0))
    deltas, final = server.generate(
        experts=refs,
        fusion=pb.FusionOptions(mode=mode or pb.FUSION_MODE_UNSPECIFIED),
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        output=pb.OutputOptions(fusion_weights=weights),
        **fields,
    )
    for delta in deltas:
        assert len(delta.fusion) == (len(delta.token_ids) if weights and experts else 0)
    tokens = [token for delta in deltas for token in delta.token_ids]
    alphas = [list(weights.alphas) for delta in deltas for weights in delta.fusion]
    return tokens, alphas, final


def experts_of(server, model: str = "tiny-llama") -> dict[str, pb.ExpertInfo]:
    models = server.registry.ListModels(pb.ListModelsRequest()).models
    (info,) = [m for m in models if m.id == model]
    return {expert.expert_id: expert for expert in info.experts}


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    return OK, ""


def _assert_healthy(server, oracle: Oracle) -> None:
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    tokens, _, _ = generate(server, [("full", 0.5)], STATIC, new_tokens=4)
    assert tokens == oracle.static_greedy(PROMPT, {"full": 0.5}, 4)


# ---- registry --------------------------------------------------------------------------------


def test_experts_are_listed_and_loaded_over_grpc(
    expert_server, tiny_small_dir, tiny_expert_dir, tiny_expert_adapter_dir
) -> None:
    listed = experts_of(expert_server)
    assert set(listed) == {"full", "lora"}
    full, lora = listed["full"], listed["lora"]
    assert (full.path, full.small_base, full.is_adapter) == (
        str(tiny_expert_dir),
        str(tiny_small_dir),
        False,
    )
    assert (lora.path, lora.small_base, lora.is_adapter) == (
        str(tiny_expert_adapter_dir),
        str(tiny_small_dir),
        True,
    )
    assert full.num_requests == lora.num_requests == 0
    registry = expert_server.registry
    for expert_id, path, is_adapter in [
        ("full2", tiny_expert_dir, False),
        ("lora2", tiny_expert_adapter_dir, True),
    ]:
        info = registry.LoadExpert(
            pb.LoadExpertRequest(
                expert_id=expert_id, path=str(path), small_base=str(tiny_small_dir)
            )
        ).expert
        assert (info.expert_id, info.path, info.small_base) == (
            expert_id,
            str(path),
            str(tiny_small_dir),
        )
        assert info.is_adapter == is_adapter and info.num_requests == 0
        assert experts_of(expert_server)[expert_id] == info
    # The same files under another id are the same expert.
    assert (
        generate(expert_server, ["full2", "lora2"])[:2]
        == generate(expert_server, ["full", "lora"])[:2]
    )
    for expert_id in ("full2", "lora2"):
        registry.UnloadExpert(pb.UnloadExpertRequest(expert_id=expert_id, model="tiny-llama"))
    assert set(experts_of(expert_server)) == {"full", "lora"}


# ---- fusion ----------------------------------------------------------------------------------


def test_static_fusion_is_the_weighted_sum_of_logits(expert_server, oracle: Oracle) -> None:
    tokens, alphas, final = generate(expert_server, [("full", 0.5), "lora"], STATIC)
    # The weights as given, an unset one 1.0, for every token.
    assert len(tokens) == len(alphas) == NEW_TOKENS
    assert alphas == [pytest.approx([0.5, 1.0])] * NEW_TOKENS
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == NEW_TOKENS
    assert tokens == oracle.static_greedy(PROMPT, {"full": 0.5, "lora": 1.0}, NEW_TOKENS)
    # The experts change the tokens (else the check above would prove little).
    assert tokens != oracle.static_greedy(PROMPT, {}, NEW_TOKENS)
    one, alphas, _ = generate(expert_server, [("lora", 1.5)], STATIC)
    assert alphas == [pytest.approx([1.5])] * NEW_TOKENS
    assert one == oracle.static_greedy(PROMPT, {"lora": 1.5}, NEW_TOKENS)
    # Without output.fusion_weights, no alphas.
    again, alphas, _ = generate(expert_server, [("full", 0.5), "lora"], STATIC, weights=False)
    assert again == tokens and alphas == []


def test_constraint_applies_to_the_fused_distribution(
    expert_server, oracle: Oracle, tiny_llama_dir
) -> None:
    """Greedy AWRS over static fusion: each token is the best fused logit among the tokens the
    regex allows (xgrammar's mask, asked directly), EOS where the regex is complete."""
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    pattern = "[a-z]{2,4}[0-9]{2}"
    deltas, final = expert_server.generate(
        token_ids=PROMPT,
        experts=[pb.ExpertRef(expert_id="full", weight=0.5)],
        fusion=pb.FusionOptions(mode=STATIC),
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=20),
        constraint=pb.Constraint(regex=pattern, engine=pb.GRAMMAR_ENGINE_XGRAMMAR),
    )
    tokens = [token for delta in deltas for token in delta.token_ids]
    assert final.finish_reason == pb.FINISH_REASON_EOS
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tiny_llama_dir / "tokenizer.json"))
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=oracle.large.config.vocab_size, stop_token_ids=[2]
    )
    matcher = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(info).compile_regex(pattern))
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    expected: list[int] = []
    while not matcher.is_terminated():
        fused = oracle.fused(PROMPT + expected, {"full": 0.5})
        matcher.fill_next_token_bitmask(bitmask)
        bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.flatten()[: info.vocab_size].bool()
        expected.append(int(fused.masked_fill(~allowed, -math.inf).argmax()))
        assert matcher.accept_token(expected[-1])
    assert tokens == expected
    assert tokens != oracle.static_greedy(PROMPT, {"full": 0.5}, len(tokens))


def test_smc_over_the_fused_distribution(expert_server, oracle: Oracle) -> None:
    """SMC particles over static fusion (a full expert and a LoRA one) over real gRPC: the
    streamed answer and every complete particle match the regex, the weights are reported, the
    same seed gives the same answer, and the server stays healthy (the particles' blocks in both
    KV pools come back: tests/engine/test_fusion.py checks them and the fused log-probabilities)."""
    pattern = "[a-z]{2,4}[0-9]{2}"

    def run():
        return expert_server.generate(
            token_ids=PROMPT,
            experts=[pb.ExpertRef(expert_id="full", weight=0.5), pb.ExpertRef(expert_id="lora")],
            fusion=pb.FusionOptions(mode=STATIC),
            sampling=pb.SamplingParams(temperature=1.0, seed=11),
            stopping=pb.StoppingCriteria(max_new_tokens=20),
            output=pb.OutputOptions(particles=True),
            constraint=pb.Constraint(
                regex=pattern, method=pb.CONSTRAINT_METHOD_SMC, particles=4, ess_threshold=1.0
            ),
        )

    deltas, final = run()
    text = "".join(delta.text for delta in deltas)
    assert final.finish_reason == pb.FINISH_REASON_EOS and re.fullmatch(pattern, text)
    assert len(final.particles) == 4 and math.isfinite(final.log_weight)
    assert text in [particle.text for particle in final.particles]
    for particle in final.particles:
        assert re.fullmatch(pattern, particle.text) or particle.log_weight == -math.inf
    again_deltas, again = run()
    assert "".join(delta.text for delta in again_deltas) == text
    assert [p.text for p in again.particles] == [p.text for p in final.particles]
    assert experts_of(expert_server)["full"].num_requests == 0
    _assert_healthy(expert_server, oracle)


def test_static_weight_zero_is_the_plain_model(expert_server, hf_model) -> None:
    plain, alphas, _ = generate(expert_server)
    assert alphas == []
    with torch.no_grad(), one_torch_thread():
        out = hf_model.generate(
            torch.tensor([PROMPT]),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
        )
    assert plain == out[0, len(PROMPT) :].tolist()
    zero, alphas, _ = generate(expert_server, [("full", 0.0), ("lora", 0.0)], STATIC)
    assert zero == plain
    assert alphas == [[0.0, 0.0]] * NEW_TOKENS


def test_dynamic_fusion_alphas(expert_server, oracle: Oracle) -> None:
    tokens, alphas, final = generate(expert_server, ["full", "lora"], DYNAMIC)
    assert len(tokens) == len(alphas) == NEW_TOKENS
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    for step, (token, weights) in enumerate(zip(tokens, alphas, strict=True)):
        assert len(weights) == 2
        assert sum(alpha != 0 for alpha in weights) <= 1, (step, weights)
        assert all(0.0 <= alpha <= 2.0 for alpha in weights), (step, weights)
        ids = PROMPT + tokens[:step]
        # The token is the argmax of the logits fused with the alphas reported for it.
        fused = oracle.fused(ids, dict(zip(("full", "lora"), weights, strict=True)))
        assert token == int(fused.argmax()), step
        # The alpha matches KL best on its expert's grid (which expert steers is the engine's
        # routing; with all alphas 0, 0 is the best alpha of one of them).
        steering = [i for i, alpha in enumerate(weights) if alpha] or [0, 1]
        assert any(_best_on_grid(oracle, ids, ("full", "lora")[i], weights[i]) for i in steering)
    assert any(any(weights) for weights in alphas), "dynamic fusion never used an expert"
    # Deterministic, and an unspecified mode is dynamic.
    assert generate(expert_server, ["full", "lora"], DYNAMIC)[:2] == (tokens, alphas)
    assert generate(expert_server, ["full", "lora"])[:2] == (tokens, alphas)
    # Weights are ignored in dynamic mode.
    assert generate(expert_server, [("full", 0.0), ("lora", 0.0)])[:2] == (tokens, alphas)


def _best_on_grid(oracle: Oracle, ids: list[int], name: str, alpha: float) -> bool:
    costs = [oracle.dynamic_cost(ids, name, candidate) for candidate in GRID]
    chosen = oracle.dynamic_cost(ids, name, alpha)
    return chosen <= min(costs) + 1e-6 + 1e-4 * min(costs)


def test_sampled_fusion_streams_and_repeats_with_a_seed(expert_server) -> None:
    sampling = pb.SamplingParams(temperature=1.0, seed=7)
    for mode, experts in [(DYNAMIC, ["lora", "full"]), (STATIC, [("full", 0.3)])]:
        tokens, alphas, final = generate(expert_server, experts, mode, sampling=sampling)
        assert len(tokens) == len(alphas) == final.usage.completion_tokens == NEW_TOKENS
        assert all(len(weights) == len(experts) for weights in alphas)
        assert generate(expert_server, experts, mode, sampling=sampling)[:2] == (tokens, alphas)


def test_mixed_batch_gives_each_stream_its_tokens_alone(expert_server) -> None:
    """Plain, static and dynamic requests with different experts share batches; each gets what
    it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    choices = [
        {},
        {"experts": [("full", 0.7)], "mode": STATIC},
        {"experts": ["full", "lora"], "mode": DYNAMIC},
        {"experts": [("lora", 1.2), ("full", 0.4)], "mode": STATIC},
        {"experts": ["lora"]},
    ]
    requests = [
        {**choices[i % len(choices)], "token_ids": [1, 300 + 17 * i, 4000 + i, 29491]}
        for i in range(10)
    ]

    def run(request: dict) -> tuple[list[int], list[list[float]]]:
        return generate(expert_server, new_tokens=16, **request)[:2]

    alone = [run(request) for request in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(run, requests))
    assert together == alone


# ---- hot unloading ---------------------------------------------------------------------------


def test_unloading_lets_running_streams_finish(
    expert_server, tiny_small_dir, tiny_expert_adapter_dir
) -> None:
    registry = expert_server.registry
    load = pb.LoadExpertRequest(
        expert_id="leaving", path=str(tiny_expert_adapter_dir), small_base=str(tiny_small_dir)
    )
    registry.LoadExpert(load)
    new_tokens = 200
    request = pb.GenerateRequest(
        token_ids=PROMPT,
        experts=[pb.ExpertRef(expert_id="full"), pb.ExpertRef(expert_id="leaving")],
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        output=pb.OutputOptions(fusion_weights=True),
    )
    tokens, alphas, after_unload, final = [], [], 0, None
    for response in expert_server.generation.Generate(request, timeout=120):
        if response.HasField("final"):
            final = response.final
            continue
        if not tokens:  # the first delta: the request runs; unload its expert now
            assert experts_of(expert_server)["leaving"].num_requests == 1
            registry.UnloadExpert(pb.UnloadExpertRequest(expert_id="leaving"))
            assert "leaving" not in experts_of(expert_server)
            refused, details = status_of(lambda: generate(expert_server, ["leaving"]))
            assert (refused, "leaving" in details) == (NOT_FOUND, True)
        else:
            after_unload += 1
        tokens += response.delta.token_ids
        alphas += [list(weights.alphas) for weights in response.delta.fusion]
    assert final is not None and final.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(tokens) == len(alphas) == final.usage.completion_tokens == new_tokens
    assert after_unload > 1
    assert experts_of(expert_server)["full"].num_requests == 0
    # Loaded again under the same id: the same expert, the same stream as the one undisturbed.
    registry.LoadExpert(load)
    assert generate(expert_server, ["full", "leaving"], new_tokens=new_tokens)[:2] == (
        tokens,
        alphas,
    )
    registry.UnloadExpert(pb.UnloadExpertRequest(expert_id="leaving"))


# ---- refusals --------------------------------------------------------------------------------


def test_generate_refusals(expert_server, oracle: Oracle, tiny_small_dir, tiny_expert_dir) -> None:
    # An expert on another small base (tiny-expert as the base of tiny-small's weights).
    expert_server.registry.LoadExpert(
        pb.LoadExpertRequest(
            expert_id="other-base", path=str(tiny_small_dir), small_base=str(tiny_expert_dir)
        )
    )
    nan = float("nan")
    cases = {
        "unknown expert": ([("full", 1.0), ("nope", 1.0)], STATIC, NOT_FOUND, "nope"),
        "unknown, dynamic": (["nope"], DYNAMIC, NOT_FOUND, "nope"),
        "empty expert_id": ([("", 1.0)], STATIC, INVALID, "expert_id"),
        "different small bases": (["full", "other-base"], DYNAMIC, INVALID, "small base"),
        "named twice": (["lora", "lora"], DYNAMIC, INVALID, "twice"),
        "weight not finite": ([("full", math.inf)], STATIC, INVALID, "not finite"),
        "weight nan": ([("full", 0.5), ("lora", nan)], STATIC, INVALID, "not finite"),
    }
    for case, (experts, mode, code, message) in cases.items():
        got, details = status_of(lambda e=experts, m=mode: generate(expert_server, e, m))
        assert (got, message in details) == (code, True), (case, got, details)
    # The other base on its own works, then goes.
    tokens, _, _ = generate(expert_server, ["other-base"], new_tokens=3)
    assert len(tokens) == 3
    expert_server.registry.UnloadExpert(pb.UnloadExpertRequest(expert_id="other-base"))
    _assert_healthy(expert_server, oracle)


def test_load_expert_refusals(
    expert_server,
    oracle: Oracle,
    tiny_llama_dir,
    tiny_small_dir,
    tiny_expert_dir,
    tekken_small_dir,
    tmp_path: Path,
) -> None:
    registry = expert_server.registry
    small, expert = str(tiny_small_dir), str(tiny_expert_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    # A copy of tiny-small's weights with the Tekken tokenizer files instead of its own.
    relabelled = tmp_path / "relabelled"
    shutil.copytree(tiny_small_dir, relabelled)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tekken_small_dir / name).is_file():
            shutil.copyfile(tekken_small_dir / name, relabelled / name)

    def load(**fields: str) -> tuple[grpc.StatusCode, str]:
        request = pb.LoadExpertRequest(
            **{"expert_id": "x", "path": expert, "small_base": small, **fields}
        )
        return status_of(lambda: registry.LoadExpert(request))

    exists = grpc.StatusCode.ALREADY_EXISTS
    cases = {
        "empty id": ({"expert_id": ""}, INVALID, "expert_id is required"),
        "empty path": ({"path": ""}, INVALID, "path is required"),
        "empty small base": ({"small_base": ""}, INVALID, "small_base is required"),
        "unknown model": ({"model": "nope"}, NOT_FOUND, "nope"),
        "already loaded": ({"expert_id": "full"}, exists, "'full'"),
        "missing expert directory": ({"path": "/no/such/expert"}, NOT_FOUND, "/no/such/expert"),
        "missing small base directory": ({"small_base": "/no/such/small"}, NOT_FOUND,
                                         "/no/such/small"),
        "empty expert directory": ({"path": str(empty)}, NOT_FOUND, str(empty)),
        "expert of another tokenizer": ({"path": str(tekken_small_dir)}, PRECONDITION,
                                        "tokenizer"),
        "expert relabelled": ({"path": str(relabelled)}, PRECONDITION, "tokenizer"),
        "small base of another tokenizer": ({"small_base": str(tekken_small_dir)}, PRECONDITION,
                                            "tokenizer"),
        "expert of another shape": ({"path": str(tiny_llama_dir)}, PRECONDITION, "shape"),
    }  # fmt: skip
    for case, (fields, code, message) in cases.items():
        got, details = load(**fields)
        assert (got, message in details) == (code, True), (case, got, details)
    assert set(experts_of(expert_server)) == {"full", "lora"}
    got, details = status_of(
        lambda: registry.UnloadExpert(pb.UnloadExpertRequest(expert_id="nope"))
    )
    assert (got, "nope" in details) == (NOT_FOUND, True)
    got, _ = status_of(
        lambda: registry.UnloadExpert(pb.UnloadExpertRequest(expert_id="full", model="nope"))
    )
    assert got == NOT_FOUND
    assert set(experts_of(expert_server)) == {"full", "lora"}
    _assert_healthy(expert_server, oracle)


def test_serve_refuses_an_expert_it_cannot_load(server_factory, tiny_small_dir) -> None:
    server = server_factory("--expert", f"broken=/no/such/expert@{tiny_small_dir}")
    assert server.process.wait(timeout=120) == 1
    assert "cannot load expert broken from /no/such/expert" in server.log()


# ---- the CLI ---------------------------------------------------------------------------------


def test_cli_generate_with_experts(expert_server, tiny_small_dir, tiny_expert_adapter_dir) -> None:
    def tandem(*args: str) -> tuple[str, str]:
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", *args, "--address", expert_server.address],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        # bytes: universal newlines would turn a "\r" into "\n"
        return result.stdout.decode(), result.stderr.decode()

    text = "Experts steer what the model says."
    greedy = ["--temperature", "0", "--max-new-tokens", "6", "--ignore-eos"]
    out, err = tandem(
        "generate", text, "--expert", "full=0.5", "--expert", "lora", "--fusion", "static",
        "--show-fusion-weights", *greedy,
    )  # fmt: skip
    deltas, _ = expert_server.generate(
        text=text,
        experts=[pb.ExpertRef(expert_id="full", weight=0.5), pb.ExpertRef(expert_id="lora")],
        fusion=pb.FusionOptions(mode=STATIC),
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=6, ignore_eos=True),
    )
    assert out == "".join(delta.text for delta in deltas)
    tokens = [token for delta in deltas for token in delta.token_ids]
    lines = [line for line in err.splitlines() if " alphas " in line]
    assert lines == [f"token {token} alphas full=0.5000 lora=1.0000" for token in tokens]
    # Dynamic (the default mode): one line per token, at most one expert steering.
    out, err = tandem("generate", text, "--expert", "full", "--expert", "lora",
                      "--show-fusion-weights", *greedy)  # fmt: skip
    lines = [line for line in err.splitlines() if " alphas " in line]
    assert len(lines) == 6 and out
    assert all(line.count("=0.0000") >= 1 for line in lines)
    # Without --show-fusion-weights, no alphas.
    _, err = tandem("generate", text, "--expert", "full", *greedy)
    assert " alphas " not in err
    loaded, _ = tandem(
        "load-expert", "by-cli", str(tiny_expert_adapter_dir), "--small-base", str(tiny_small_dir)
    )
    assert loaded.startswith("by-cli\tkind=adapter\trequests=0\t")
    assert loaded.rstrip("\n").endswith(f"small_base={tiny_small_dir}\t{tiny_expert_adapter_dir}")
    listing, _ = tandem("models")
    assert "  expert full\tkind=model\t" in listing and "  expert by-cli\tkind=adapter" in listing
    tandem("unload-expert", "by-cli", "--model", "tiny-llama")
    assert "by-cli" not in experts_of(expert_server)
    bad = subprocess.run(
        [sys.executable, "-m", "server.cli", "unload-expert", "by-cli",
         "--address", expert_server.address],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and b"NOT_FOUND" in bad.stderr
