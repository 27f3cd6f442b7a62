"""Sampler against exact enumeration (numpy, float64) and Hugging Face's logits processors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.sampling import (
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    compute_logprobs,
    request_generator,
    sample,
)
from engine.types import SamplingParams

VOCAB = 12
LOGITS = [2.1, -0.4, 1.3, 0.2, -1.7, 0.95, 1.8, -0.9, 0.5, 1.1, -2.5, 0.0]
PRIOR = [0, 1, 4, 6, 6, 9]  # tokens seen before: positive and negative logits, one repeated
SETTINGS = [
    SamplingParams(),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.5, top_k=5),
    SamplingParams(top_p=0.8),
    SamplingParams(temperature=0.8, min_p=0.15),
    SamplingParams(temperature=1.2, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7, top_p=0.95),
    SamplingParams(temperature=2.0, top_k=3, repetition_penalty=2.0),
]
DRAWS = 20_000


def softmax(z: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    weights = np.where(allowed, np.exp(z - z[allowed].max()), 0.0)
    return weights / weights.sum()


def target_distribution(params: SamplingParams, prior: list[int]) -> np.ndarray:
    """The distribution the sampler must draw from, enumerated token by token in float64."""
    z = np.array(LOGITS, dtype=np.float64)
    for token in set(prior):
        z[token] = (
            z[token] / params.repetition_penalty
            if z[token] > 0
            else z[token] * params.repetition_penalty
        )
    z = z / params.temperature
    allowed = np.ones(VOCAB, dtype=bool)
    if params.top_k:
        allowed[np.argsort(-z)[params.top_k :]] = False
    if params.top_p < 1.0:
        p, mass = softmax(z, allowed), 0.0
        for token in np.argsort(-p):
            if allowed[token] and mass >= params.top_p:
                allowed[token] = False
            mass += p[token]
    if params.min_p > 0.0:
        p = softmax(z, allowed)
        allowed &= p >= params.min_p * p.max()
    return softmax(z, allowed)


def chi_square_p_value(statistic: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (regularized gamma Q(dof/2, statistic/2))."""
    a, x = dof / 2, statistic / 2
    term = total = 1 / a
    n = 1
    while term > 1e-16 * total:
        term *= x / (a + n)
        total += term
        n += 1
    return 1.0 - total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def test_chi_square_p_value_matches_closed_forms():
    # dof 2: exp(-x/2); dof 1: erfc(sqrt(x/2)).
    for x in (0.5, 3.0, 12.0):
        assert chi_square_p_value(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)
        assert chi_square_p_value(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)


def test_samples_follow_the_exact_distribution():
    # Every setting in one batch, rows shuffled: half with their own seeded generator, half on
    # the shared engine RNG.
    rows = [(s, i) for s in range(len(SETTINGS)) for i in range(DRAWS)]
    random.Random(0).shuffle(rows)
    params = [SETTINGS[s] for s, _ in rows]
    generators = [request_generator(1000 + r) if r % 2 else None for r in range(len(rows))]
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(len(rows), VOCAB)
    tokens = sample(
        logits,
        params,
        generators,
        prior_token_ids=[PRIOR] * len(rows),
        engine_generator=torch.Generator().manual_seed(5),
    )
    settings_index = torch.tensor([s for s, _ in rows])
    for s, setting in enumerate(SETTINGS):
        counts = np.bincount(tokens[settings_index == s].numpy(), minlength=VOCAB)
        target = target_distribution(setting, PRIOR)
        assert counts[target == 0].sum() == 0, f"{setting} drew a filtered-out token"
        expected = target[target > 0] * DRAWS
        statistic = float(((counts[target > 0] - expected) ** 2 / expected).sum())
        dof = int((target > 0).sum()) - 1
        if dof:
            assert chi_square_p_value(statistic, dof) > 1e-4, (setting, counts, expected)


def test_filters_actually_filter():
    # Guards the chi-square test above against settings that filter nothing.
    allowed = [int((target_distribution(s, PRIOR) > 0).sum()) for s in SETTINGS]
    assert allowed == [12, 12, 5, 5, 5, 7, 8, 3]


def test_greedy_rows_take_the_argmax_of_the_penalized_logits():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    prior = [[int(logits[r].argmax()), 3, 4] for r in range(6)]
    greedy = SamplingParams(temperature=0.0)
    penalized = SamplingParams(temperature=0.0, repetition_penalty=5.0)
    sampled = SamplingParams(temperature=1.0, seed=1)
    params = [greedy, penalized, sampled, greedy, penalized, sampled]
    tokens = sample(logits, params, [None] * 6, prior_token_ids=prior)
    for r in (0, 3):
        assert tokens[r] == logits[r].argmax()
    for r in (1, 4):
        hf = RepetitionPenaltyLogitsProcessor(5.0)(torch.tensor([prior[r]]), logits[r : r + 1])
        assert tokens[r] == hf.argmax() != logits[r].argmax()
    assert torch.equal(sample(logits, [greedy] * 6, [None] * 6), logits.argmax(dim=-1))


def test_same_seed_same_tokens_whatever_the_batch():
    vocab = 32768
    steps = [torch.randn(8, vocab, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    ours = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=50, seed=7),
        SamplingParams(min_p=0.2),
        SamplingParams(temperature=0.5, top_p=0.5, repetition_penalty=1.2),
    ]

    def run(batch: list[SamplingParams], row: int) -> list[int]:
        generators = [request_generator(p.seed) for p in batch]
        engine = torch.Generator().manual_seed(len(batch))
        drawn = []
        for logits in steps:
            rows = logits[: len(batch)].clone()
            rows[row] = logits[0]  # our request always sees the same logits
            tokens = sample(rows, batch, generators, [[1, 2, 3]] * len(batch), engine)
            drawn.append(int(tokens[row]))
        return drawn

    alone = run([ours], 0)
    assert run([*others, ours], 4) == alone
    assert run([others[1], ours, others[3]], 1) == alone
    assert run([ours], 0) == alone
    assert run([SamplingParams(temperature=0.9, top_p=0.95, seed=43)], 0) != alone


def hf_rows(warper, logits: torch.Tensor, values: list, off) -> torch.Tensor:
    return torch.cat(
        [
            logits[r : r + 1] if value == off else warper(value)(None, logits[r : r + 1])
            for r, value in enumerate(values)
        ]
    )


# A peaked distribution (small nucleus, found among the top candidates) and a flat one (the
# nucleus spans most of the vocabulary: full sort).
@pytest.mark.parametrize("scale", [3.0, 0.05])
def test_filters_match_transformers_row_by_row(scale):
    logits = scale * torch.randn(5, 5000, generator=torch.Generator().manual_seed(3))
    top_k, top_p, min_p = [0, 1, 40, 0, 4999], [1.0, 0.3, 0.9, 0.99, 1.0], [0.0, 0.5, 0.01, 0, 1]
    cases = [
        (apply_top_k(logits, top_k), hf_rows(TopKLogitsWarper, logits, top_k, 0)),
        (apply_top_p(logits, top_p), hf_rows(TopPLogitsWarper, logits, top_p, 1.0)),
        (apply_min_p(logits, min_p), hf_rows(MinPLogitsWarper, logits, min_p, 0.0)),
    ]
    for ours, theirs in cases:
        assert torch.equal(ours, theirs)
    assert apply_top_k(logits, [0] * 5) is logits  # nothing to do: no copy, no sort


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    seen = [[1, 5, 5, 7], [], [2, 3, 49]]
    penalties = [1.5, 2.0, 0.8]
    ours = apply_repetition_penalty(logits, seen, penalties)
    for r in range(3):
        ids = torch.tensor([seen[r]], dtype=torch.long).reshape(1, -1)
        theirs = RepetitionPenaltyLogitsProcessor(penalties[r])(ids, logits[r : r + 1].clone())
        assert torch.equal(ours[r : r + 1], theirs)
    assert torch.equal(logits[1], ours[1])  # row with no history unchanged


def test_logprobs_are_the_model_log_softmax():
    logits = 4 * torch.randn(3, 300, generator=torch.Generator().manual_seed(5))
    chosen = [7, 100, 299]
    result = compute_logprobs(logits, chosen, [0, 3, 20])
    reference = logits.double().numpy()
    reference = (
        reference
        - np.log(np.exp(reference - reference.max(1, keepdims=True)).sum(1, keepdims=True))
        - reference.max(1, keepdims=True)
    )
    for r, entry in enumerate(result):
        assert entry.token_id == chosen[r]
        assert entry.logprob == pytest.approx(reference[r, chosen[r]], abs=1e-5)
        best = np.argsort(-reference[r])[: [0, 3, 20][r]]
        assert [token for token, _ in entry.top] == best.tolist()
        for token, logprob in entry.top:
            assert logprob == pytest.approx(reference[r, token], abs=1e-5)
