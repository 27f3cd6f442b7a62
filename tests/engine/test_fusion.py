"""Dynamic logit fusion in the engine against a plain step-by-step implementation.

Oracle: three (or more) transformers models run on the whole sequence at every step (no cache,
no batching), and the fusion written out here in float64 with a full softmax per candidate:
static z_L + sum_t a_t (z_Et - z_S); dynamic, the KL-matching grid search (design.md section 6),
with the expert picked by the lowest cost (KL routing) or by the likelihood of the text so far
(likelihood routing). The engine's fused log-probabilities, chosen alphas and greedy tokens must
match, with requests batched together and prompts prefilled in chunks.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from engine.llm_engine import EngineConfig, LLMEngine
from engine.model import CausalLM
from engine.tokenizer import Tokenizer
from engine.types import (
    AlreadyExists,
    Constraint,
    ConstraintKind,
    ConstraintMethod,
    ExpertError,
    FinishReason,
    FusionMode,
    FusionRouting,
    InvalidRequest,
    NotFound,
    OutputOptions,
    Request,
    SamplingParams,
    StoppingCriteria,
)

VOCAB = 32768  # the SentencePiece tokenizer's: experts are checked against the model's vocabulary
GRID = [i / 10 for i in range(21)]
NEW_TOKENS = 6
ATOL = 2e-3  # float32 engine vs float64 oracle, on log-probabilities


def _shape(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int = VOCAB) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attn_implementation": "eager",
    }


LARGE = _shape(64, 2, 4, 2)
SMALL = _shape(32, 1, 2, 1)


@dataclass
class Member:
    path: Path
    hf: torch.nn.Module  # float32 transformers model (for a LoRA expert: PEFT on the small)


def _save(shape: dict, seed: int, out: Path, tokenizer_dir: str | None, scale: float) -> Member:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
        # Logits past the tokenizer's vocabulary (padding rows) made large, so that a model
        # that samples there shows it.
        model.lm_head.weight[VOCAB:] *= 40.0
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        for name in os.listdir(tokenizer_dir):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    return Member(out, model.eval())


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory, sentencepiece_tokenizer_dir: str) -> dict:
    """large, small, expert-a, expert-b (full models of the small's shape), expert-lora (PEFT
    on the small), all with the SentencePiece tokenizer."""
    root = tmp_path_factory.mktemp("family")
    out = {
        "large": _save(LARGE, 1, root / "large", sentencepiece_tokenizer_dir, 0.12),
        "small": _save(SMALL, 2, root / "small", sentencepiece_tokenizer_dir, 0.12),
        "expert-a": _save(SMALL, 3, root / "expert-a", sentencepiece_tokenizer_dir, 0.12),
        "expert-b": _save(SMALL, 4, root / "expert-b", None, 0.12),  # no tokenizer files
    }
    small = transformers.LlamaForCausalLM.from_pretrained(root / "small", dtype=torch.float32)
    peft_model = get_peft_model(
        small, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(root / "expert-lora")
    out["expert-lora"] = Member(root / "expert-lora", peft_model.eval())
    return out


def make_engine(family: dict, **overrides) -> LLMEngine:
    path = family["large"].path
    config = EngineConfig(
        **{"kv_cache_bytes": 8 << 20, "block_size": 4, "max_batched_tokens": 8, **overrides}
    )
    return LLMEngine(CausalLM.from_dir(path), Tokenizer.from_dir(path), config)


def load_all(engine: LLMEngine, family: dict) -> None:
    for name in ("expert-a", "expert-b", "expert-lora"):
        engine.load_expert(name, family[name].path, family["small"].path)


# ---- the oracle -------------------------------------------------------------------------------


@torch.no_grad()
def _all_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].double()


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    return float((log_p.exp() * (log_p - log_q)).sum())


def _cost(zl: torch.Tensor, zs: torch.Tensor, ze: torch.Tensor, alpha: float) -> float:
    p, q, qe = (torch.log_softmax(z, -1) for z in (zl, zs, ze))
    pt = torch.log_softmax(zl + alpha * (ze - zs), -1)
    return (_kl(pt, p) - _kl(qe, q)) ** 2 + (_kl(p, pt) - _kl(q, qe)) ** 2


def _evidence(small: torch.Tensor, experts: list[torch.Tensor], ids: list[int]) -> list[float]:
    """sum over tokens after the first of log p_Et - log p_S (all-position logits given)."""
    targets = torch.tensor(ids[1:])[:, None]

    def loglik(z: torch.Tensor) -> float:
        return float(torch.log_softmax(z[:-1], -1).gather(1, targets).sum())

    return [loglik(z) - loglik(small) for z in experts]


def oracle(
    family: dict,
    prompt: list[int],
    experts: list[str],
    mode: FusionMode,
    routing: FusionRouting = FusionRouting.LIKELIHOOD,
    weights: list[float] | None = None,
    follow: list[int] | None = None,
) -> tuple[list[int], list[torch.Tensor], list[tuple[float, ...]]]:
    """Greedy tokens (or the tokens `follow`), fused log-probabilities and alphas per step, one
    model call at a time."""
    ids, log_probs, alphas = list(prompt), [], []
    for step in range(NEW_TOKENS if follow is None else len(follow)):
        zl = _all_logits(family["large"].hf, ids)[-1]
        small_all = _all_logits(family["small"].hf, ids)
        experts_all = [_all_logits(family[e].hf, ids) for e in experts]
        zs, ze = small_all[-1], [z[-1] for z in experts_all]
        if mode is FusionMode.STATIC:
            chosen = tuple(weights or [1.0] * len(experts))
            fused = zl + sum(a * (z - zs) for a, z in zip(chosen, ze, strict=True))
        else:
            candidates = range(len(experts))
            if routing is FusionRouting.LIKELIHOOD and len(experts) > 1:
                evidence = _evidence(small_all, experts_all, ids)
                candidates = [max(candidates, key=lambda t: (evidence[t], -t))]
            best = min(
                ((_cost(zl, zs, ze[t], a), t, a) for t in candidates for a in GRID),
                key=lambda c: c[0],
            )  # min keeps the first of equal costs: lowest expert, then smallest alpha
            _, t, a = best
            chosen = tuple(a if u == t else 0.0 for u in range(len(experts)))
            fused = zl + a * (ze[t] - zs)
        log_probs.append(torch.log_softmax(fused, -1))
        alphas.append(chosen)
        ids.append(int(fused.argmax()) if follow is None else follow[step])
    return ids[len(prompt) :], log_probs, alphas


def request(
    rid: str,
    prompt: list[int],
    experts: list[str],
    mode: FusionMode,
    routing: FusionRouting = FusionRouting.LIKELIHOOD,
    weights: list[float | None] | None = None,
) -> Request:
    return Request(
        rid,
        prompt,
        SamplingParams(temperature=0.0),
        StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        OutputOptions(logprobs=True, top_logprobs=5, fusion_weights=True),
        experts=tuple(zip(experts, weights or [None] * len(experts), strict=True)),
        fusion_mode=mode,
        fusion_routing=routing,
    )


def prompt_of(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, VOCAB, (length - 1,), generator=generator).tolist()]


def assert_matches(output, expected) -> None:
    tokens, log_probs, alphas = expected
    assert output.token_ids == tokens
    assert [tuple(round(a, 6) for a in row) for row in output.fusion_weights] == [
        tuple(round(a, 6) for a in row) for row in alphas
    ]
    for entry, reference in zip(output.logprobs, log_probs, strict=True):
        assert math.isclose(entry.logprob, float(reference[entry.token_id]), abs_tol=ATOL)
        for token, value in entry.top:
            assert math.isclose(value, float(reference[token]), abs_tol=ATOL)
        assert [t for t, _ in entry.top] == reference.topk(len(entry.top)).indices.tolist()


# ---- the engine against the oracle --------------------------------------------------------------

CASES = {
    "static-one": (["expert-a"], FusionMode.STATIC, FusionRouting.LIKELIHOOD, None),
    "static-weights": (["expert-a", "expert-lora"], FusionMode.STATIC, None, [0.5, -0.25]),
    "dynamic-one": (["expert-a"], FusionMode.DYNAMIC, FusionRouting.LIKELIHOOD, None),
    "dynamic-lora": (["expert-lora"], FusionMode.DYNAMIC, FusionRouting.LIKELIHOOD, None),
    "dynamic-kl-three": (
        ["expert-a", "expert-b", "expert-lora"],
        FusionMode.DYNAMIC,
        FusionRouting.KL,
        None,
    ),
    "dynamic-likelihood-three": (
        ["expert-a", "expert-b", "expert-lora"],
        FusionMode.DYNAMIC,
        FusionRouting.LIKELIHOOD,
        None,
    ),
}


def test_engine_matches_the_step_by_step_oracle(family: dict) -> None:
    """All cases in one batch with plain requests between them; 8-token steps chunk the
    prompts, so small models prefill in chunks too."""
    engine = make_engine(family)
    load_all(engine, family)
    requests, expected = [], {}
    for index, (name, (experts, mode, routing, weights)) in enumerate(CASES.items()):
        prompt = prompt_of(index, 5 + 4 * index)
        routing = routing or FusionRouting.LIKELIHOOD
        requests.append(request(name, prompt, experts, mode, routing, weights))
        expected[name] = oracle(family, prompt, experts, mode, routing, weights)
        requests.append(request(f"plain-{index}", prompt, [], FusionMode.DYNAMIC))
    outputs = engine.generate(requests)
    for name in CASES:
        assert_matches(outputs[name], expected[name])
    # Plain requests in the same batches are untouched by fusion: the large model's tokens.
    ids = list(requests[1].prompt_token_ids)
    for _ in range(NEW_TOKENS):
        ids.append(int(_all_logits(family["large"].hf, ids)[-1].argmax()))
    assert outputs["plain-0"].token_ids == ids[-NEW_TOKENS:]
    assert outputs["plain-0"].fusion_weights == []
    assert engine.allocator.num_used == 0
    assert all(e.num_requests == 0 for e in engine.expert_infos())


def test_fused_requests_take_a_cached_prefix_and_still_match_the_oracle(family: dict) -> None:
    """After a plain request computed the prompt's blocks, every case takes them for the
    large model while its small models compute the prefix (routing evidence included)."""
    engine = make_engine(family)
    load_all(engine, family)
    prompt = prompt_of(11, 14)
    engine.generate([request("plain", prompt, [], FusionMode.DYNAMIC)])
    cached = len(prompt) // 4 * 4  # the whole blocks of prompt + suffix, short of its last token
    for name, (experts, mode, routing, weights) in CASES.items():
        routing = routing or FusionRouting.LIKELIHOOD
        suffix = [5 + len(name)]  # each case a prompt of its own past the shared blocks
        out = engine.generate([request(name, prompt + suffix, experts, mode, routing, weights)])
        assert out[name].cached_prompt_tokens == cached, name
        expected = oracle(family, prompt + suffix, experts, mode, routing, weights)
        assert_matches(out[name], expected)
    assert engine.allocator.num_used == 0
    assert all(b.allocator.num_used == 0 for b in engine.experts._small_bases.values())


def test_static_weight_zero_is_the_large_model(family: dict) -> None:
    engine = make_engine(family)
    load_all(engine, family)
    prompt = prompt_of(7, 9)
    out = engine.generate([request("r", prompt, ["expert-a"], FusionMode.STATIC, weights=[0.0])])
    plain = engine.generate([request("p", prompt, [], FusionMode.STATIC)])
    assert out["r"].token_ids == plain["p"].token_ids
    assert out["r"].fusion_weights == [(0.0,)] * NEW_TOKENS


def test_preemption_in_the_small_pool_recomputes_the_same_answer(family: dict) -> None:
    """A small base pool too small for three fused sequences at once: they are preempted and
    recomputed (routing evidence too), and still match the oracle."""
    small = CausalLM.from_dir(family["small"].path).config
    per_block = 2 * small.num_layers * 4 * small.num_kv_heads * small.head_dim * 4
    rows = 4  # the small base and three experts
    engine = make_engine(family, expert_kv_cache_bytes=rows * 9 * per_block)
    load_all(engine, family)
    experts = ["expert-a", "expert-b", "expert-lora"]
    prompts = [prompt_of(20 + i, 12) for i in range(3)]
    outputs = engine.generate(
        [request(f"r{i}", p, experts, FusionMode.DYNAMIC) for i, p in enumerate(prompts)]
    )
    for i, prompt in enumerate(prompts):
        assert_matches(outputs[f"r{i}"], oracle(family, prompt, experts, FusionMode.DYNAMIC))
    base = engine.experts._small_bases  # every row's blocks came back
    assert all(b.allocator.num_used == 0 for b in base.values())


@pytest.mark.parametrize(
    "case", ["static-weights", "dynamic-likelihood-three"], ids=["static", "dynamic-likelihood"]
)
def test_smc_particles_fork_the_small_models_rows(family: dict, case: str) -> None:
    """SMC over a fused distribution: particles fork the small models' rows too (full blocks
    shared, the partly filled last block copied, the routing evidence copied) and resample at
    every step where their weights differ. The chosen particle's log-probabilities are the
    oracle's fused ones along its own tokens, its text matches the regex, and every block of
    both pools comes back."""
    experts, mode, routing, weights = CASES[case]
    engine = make_engine(family)
    load_all(engine, family)
    prompt = prompt_of(30, 6)  # 6 tokens in blocks of 4: the first forks copy a partial block
    regex = "[a-z ]{1,40}"
    smc = Request(
        "smc",
        prompt,
        SamplingParams(temperature=1.0, seed=3),
        StoppingCriteria(max_new_tokens=NEW_TOKENS),
        OutputOptions(logprobs=True, fusion_weights=True, particles=True),
        experts=tuple(zip(experts, weights or [None] * len(experts), strict=True)),
        fusion_mode=mode,
        fusion_routing=routing or FusionRouting.LIKELIHOOD,
        constraint=Constraint(
            ConstraintKind.REGEX,
            regex,
            method=ConstraintMethod.SMC,
            particles=4,
            ess_threshold=1.0,
        ),
    )
    output = engine.generate([smc])["smc"]
    assert len(output.particles) == 4 and math.isfinite(output.log_weight)
    tokens = output.token_ids
    expected = oracle(
        family, prompt, experts, mode, routing or FusionRouting.LIKELIHOOD, weights, tokens
    )
    assert len(output.logprobs) == len(tokens) >= 1
    for entry, reference in zip(output.logprobs, expected[1], strict=True):
        assert math.isclose(entry.logprob, float(reference[entry.token_id]), abs_tol=ATOL)
    assert [tuple(round(a, 6) for a in row) for row in output.fusion_weights] == [
        tuple(round(a, 6) for a in row) for row in expected[2]
    ]
    assert re.fullmatch("[a-z ]*", output.text)  # a prefix of a match at least
    if output.finish_reason is FinishReason.EOS:
        assert re.fullmatch(regex, output.text)
    assert engine.allocator.num_used == 0
    assert all(b.allocator.num_used == 0 for b in engine.experts._small_bases.values())
    assert all(e.num_requests == 0 for e in engine.expert_infos())


# ---- the registry ------------------------------------------------------------------------------


def test_registry_lists_validates_and_refuses(family: dict, tmp_path: Path) -> None:
    engine = make_engine(family)
    load_all(engine, family)
    infos = {info.expert_id: info for info in engine.expert_infos()}
    assert set(infos) == {"expert-a", "expert-b", "expert-lora"}
    assert infos["expert-lora"].is_adapter and not infos["expert-a"].is_adapter
    assert infos["expert-a"].small_base == str(family["small"].path)
    # One small base for all three, loaded once.
    assert len(engine.experts._small_bases) == 1
    with pytest.raises(AlreadyExists):
        engine.load_expert("expert-a", family["expert-a"].path, family["small"].path)
    with pytest.raises(ExpertError) as missing:
        engine.load_expert("x", tmp_path / "nowhere", family["small"].path)
    assert missing.value.kind == "not_found"
    # An expert of another shape than its small base (its KV rows share the base's pool).
    with pytest.raises(ExpertError, match="shape"):
        engine.load_expert("x", family["large"].path, family["small"].path)
    prompt = prompt_of(1, 6)
    with pytest.raises(NotFound):
        engine.validate(request("r", prompt, ["nope"], FusionMode.DYNAMIC))
    with pytest.raises(InvalidRequest, match="twice"):
        engine.validate(request("r", prompt, ["expert-a", "expert-a"], FusionMode.DYNAMIC))
    with pytest.raises(InvalidRequest, match="finite"):
        engine.validate(
            request("r", prompt, ["expert-a"], FusionMode.STATIC, weights=[float("nan")])
        )
    engine.remove_expert("expert-b")
    with pytest.raises(NotFound):
        engine.remove_expert("expert-b")
    assert [i.expert_id for i in engine.expert_infos()] == ["expert-a", "expert-lora"]


def test_other_tokenizer_is_refused(
    family: dict, tmp_path: Path, tekken_tokenizer_dir: str
) -> None:
    engine = make_engine(family)
    other = _save(
        _shape(32, 1, 2, 1, vocab=131072), 9, tmp_path / "tekken-small", tekken_tokenizer_dir, 0.1
    )
    with pytest.raises(ExpertError, match="tokenizer") as refused:
        engine.load_expert("x", family["expert-a"].path, other.path)
    assert refused.value.kind == "failed_precondition"
    # An expert with its own tokenizer files, different from the model's.
    mixed = tmp_path / "mixed"
    shutil.copytree(family["expert-b"].path, mixed)
    for name in os.listdir(tekken_tokenizer_dir):
        shutil.copyfile(Path(tekken_tokenizer_dir) / name, mixed / name)
    with pytest.raises(ExpertError, match="tokenizer"):
        engine.load_expert("x", mixed, family["small"].path)
    assert engine.expert_infos() == []


def test_padding_rows_are_cut_to_the_shared_vocabulary(
    family: dict, tmp_path: Path, sentencepiece_tokenizer_dir: str
) -> None:
    """A large model with 64 padding logits past the tokenizer's 32768, made large: alone it
    samples them; fused, its rows are cut to the vocabulary it shares with the small models."""
    shape = {**LARGE, "vocab_size": VOCAB + 64}
    large = _save(shape, 1, tmp_path / "large", sentencepiece_tokenizer_dir, 0.12)
    engine = LLMEngine(
        CausalLM.from_dir(large.path),
        Tokenizer.from_dir(large.path),
        EngineConfig(kv_cache_bytes=8 << 20, block_size=4),
    )
    engine.load_expert("e", family["expert-a"].path, family["small"].path)
    prompt = prompt_of(3, 7)
    plain = engine.generate([request("p", prompt, [], FusionMode.STATIC)])["p"]
    assert max(plain.token_ids) >= VOCAB
    fused = engine.generate([request("r", prompt, ["e"], FusionMode.STATIC)])["r"]
    assert len(fused.token_ids) == NEW_TOKENS and max(fused.token_ids) < VOCAB
    for entry in fused.logprobs:
        assert all(token < VOCAB for token, _ in entry.top)


def test_removed_expert_lets_running_requests_finish(family: dict) -> None:
    engine = make_engine(family)
    load_all(engine, family)
    prompt = prompt_of(11, 6)
    expected = oracle(family, prompt, ["expert-a"], FusionMode.DYNAMIC)
    engine.add_request(request("r", prompt, ["expert-a"], FusionMode.DYNAMIC))
    outputs = [*engine.step()]  # prefill: the request runs with the expert
    engine.remove_expert("expert-a")
    with pytest.raises(NotFound):
        engine.add_request(request("s", prompt, ["expert-a"], FusionMode.DYNAMIC))
    while engine.has_unfinished():
        outputs += engine.step()
    tokens = [t for out in outputs for t in out.token_ids]
    assert tokens == expected[0]
    # Loaded again under the same id, it serves again.
    engine.load_expert("expert-a", family["expert-a"].path, family["small"].path)
    again = engine.generate([request("t", prompt, ["expert-a"], FusionMode.DYNAMIC)])
    assert again["t"].token_ids == expected[0]


def test_pieces_give_each_member_its_own_rows() -> None:
    """A pass's logits split by member: one [V] view each where every member has one row,
    else each member's [n, V] rows, also where the counts add up to as many rows as there are
    members (a member with two rows beside one with none)."""
    from engine.fusion import _pieces

    logits = torch.arange(12.0).view(3, 4)
    ones = _pieces(logits, [1, 1, 1])
    assert [p.shape for p in ones] == [(4,)] * 3
    assert all(
        torch.equal(p, logits[i]) and p.data_ptr() == logits[i].data_ptr()
        for i, p in enumerate(ones)
    )
    two = logits[:2]
    pieces = _pieces(two, [2, 0])
    assert [p.shape for p in pieces] == [(2, 4), (0, 4)] and torch.equal(pieces[0], two)
    pieces = _pieces(logits, [1, 0, 2])
    assert [p.shape for p in pieces] == [(1, 4), (0, 4), (2, 4)]
    assert torch.equal(pieces[0][0], logits[0]) and torch.equal(pieces[2], logits[1:])
