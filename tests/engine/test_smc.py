"""SMC over AWRS steps: its weighted particles approach the global posterior p(x | constraint),
computed exactly by enumerating every token path of a small language with transformers' model
as the oracle, and beat token masking, whose locally renormalised distribution is biased."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import transformers

from engine.awrs import allowed_mask
from engine.llm_engine import EngineConfig, LLMEngine
from engine.smc import effective_sample_size, mean_log_weight, stratified_counts
from engine.types import (
    Constraint,
    ConstraintKind,
    ConstraintMethod,
    OutputOptions,
    Request,
    SamplingParams,
    StoppingCriteria,
)

# Two strings; under the model "a" is about as likely a first token as "b", but the rest of
# "a qwerty" is very unlikely: masking picks "a" about half the time, the posterior rarely.
CHOICES = ("a qwerty", "b")
PROMPT = "Pick:"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sentencepiece_tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("smc-llama")
    config = transformers.LlamaConfig(
        vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(0.1 * torch.randn(param.shape))
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = Path(sentencepiece_tokenizer_dir) / name
        if source.is_file():
            (out / name).write_bytes(source.read_bytes())
    return out


@pytest.fixture(scope="module")
def engine(model_dir) -> LLMEngine:
    engine = LLMEngine.from_dir(str(model_dir), EngineConfig(max_num_seqs=128))
    yield engine
    engine.constraints.close()


def _exact_distributions(engine: LLMEngine, model_dir: Path) -> tuple[dict, dict]:
    """Over complete strings: the posterior p(x | C) and what token masking samples, by
    enumerating every path of allowed tokens (EOS included) with transformers' logits."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = engine.tokenizer.encode(PROMPT)
    root = engine.compile_constraint(Constraint(ConstraintKind.CHOICE, choices=CHOICES)).matcher()
    eos = 2
    posterior, masked = defaultdict(float), defaultdict(float)

    def walk(path: list[int], matcher, log_p: float, log_q: float) -> None:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + path])).logits[0, -1]
        logprobs = logits.log_softmax(dim=-1)
        allowed = allowed_mask(matcher, logits.shape[-1]).nonzero().flatten().tolist()
        log_z = float(logprobs[allowed].logsumexp(dim=0))
        for token in allowed:
            step_p, step_q = log_p + float(logprobs[token]), log_q + float(logprobs[token]) - log_z
            if token == eos:
                text = engine.tokenizer.decode(path)
                posterior[text] += math.exp(step_p)
                masked[text] += math.exp(step_q)
                continue
            child = matcher.fork()
            child.accept(token)
            walk([*path, token], child, step_p, step_q)

    walk([], root, 0.0, 0.0)
    total = sum(posterior.values())
    return {x: p / total for x, p in posterior.items()}, dict(masked)


def _smc_estimate(engine: LLMEngine, particles: int, runs: int) -> dict[str, float]:
    """The average over runs of each run's self-normalised particle weights, per string."""
    requests = [
        Request(
            request_id=f"smc{particles}-{seed}",
            prompt_token_ids=engine.tokenizer.encode(PROMPT),
            sampling=SamplingParams(temperature=1.0, seed=seed),
            stopping=StoppingCriteria(max_new_tokens=20),
            output=OutputOptions(particles=True),
            constraint=Constraint(
                ConstraintKind.CHOICE,
                choices=CHOICES,
                method=ConstraintMethod.SMC,
                particles=particles,
            ),
        )
        for seed in range(runs)
    ]
    estimate: dict[str, float] = defaultdict(float)
    for out in engine.generate(requests).values():
        assert out.text in CHOICES
        weights = torch.tensor([p.log_weight for p in out.particles]).softmax(dim=0)
        for particle, weight in zip(out.particles, weights.tolist(), strict=True):
            estimate[particle.text] += weight / runs
    assert engine.allocator.num_used == 0
    return estimate


def _kl(target: dict[str, float], estimate: dict[str, float]) -> float:
    return sum(p * math.log(p / max(estimate.get(x, 0.0), 1e-9)) for x, p in target.items())


def test_smc_approaches_the_posterior_and_beats_masking(engine, model_dir) -> None:
    posterior, masked = _exact_distributions(engine, model_dir)
    assert set(posterior) == set(CHOICES)
    masking_kl = _kl(posterior, masked)
    assert masking_kl > 0.3, (posterior, masked)  # the language really is biased by masking
    one = _smc_estimate(engine, particles=1, runs=100)
    many = _smc_estimate(engine, particles=8, runs=40)
    # One particle is AWRS alone: the masking distribution, up to sampling noise.
    assert abs(one["b"] - masked["b"]) < 0.1
    assert _kl(posterior, many) < masking_kl / 4, (posterior, masked, many)
    assert _kl(posterior, many) < _kl(posterior, one)


def test_stratified_resampling_keeps_n_particles_in_proportion() -> None:
    generator = torch.Generator().manual_seed(0)
    log_weights = [math.log(w) for w in (0.1, 0.6, 0.3)]
    totals = torch.zeros(3)
    for _ in range(2000):
        counts = stratified_counts(log_weights, generator)
        assert sum(counts) == 3
        totals += torch.tensor(counts, dtype=torch.float32)
    assert torch.allclose(totals / 6000, torch.tensor([0.1, 0.6, 0.3]), atol=0.02)
    assert stratified_counts([0.0, -math.inf], generator) == [2, 0]


def test_effective_sample_size_and_mean_weight() -> None:
    assert effective_sample_size([0.0, 0.0, 0.0, 0.0]) == pytest.approx(4.0)
    assert effective_sample_size([0.0, -math.inf, -math.inf]) == pytest.approx(1.0)
    assert mean_log_weight([math.log(1.0), math.log(3.0)]) == pytest.approx(math.log(2.0))


def test_smc_frees_shared_blocks_on_abort(engine) -> None:
    request = Request(
        request_id="abort-me",
        prompt_token_ids=engine.tokenizer.encode("A longer prompt " * 5),
        stopping=StoppingCriteria(max_new_tokens=50),
        constraint=Constraint(
            ConstraintKind.REGEX, "[a-z]{40,50}", method=ConstraintMethod.SMC, particles=4
        ),
    )
    engine.add_request(request)
    for _ in range(3):
        engine.step()
    running = [seq for seq in engine.scheduler.running if seq.request_id == "abort-me"]
    assert len(running) == 4
    shared = set(running[0].block_table[:1])
    assert all(engine.allocator.refcount(block) >= 2 for block in shared)
    out = engine.abort("abort-me")
    assert out.finished and out.token_ids == []
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()
