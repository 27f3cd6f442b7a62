"""AWRS against exact enumeration: one step's samples follow p restricted to the allowed tokens,
the weight's mean is the allowed mass, and the full-mask fallback changes neither.

The constraint here is a set of allowed token ids (a matcher over a fixed set): what is under
test is the sampler, and exact enumeration over a small vocabulary is its oracle. The real
grammar engines are exercised in test_constrained.py.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from engine import awrs
from engine.grammar import GrammarCosts, allocate_bitmask, bitmask_to_bool

VOCAB = 12
# Critical chi-square values at p = 0.001 by degrees of freedom (scipy is not a dependency).
CHI2_CRITICAL_0_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


class SetMatcher:
    """Allows a fixed set of tokens at every step; counts its checks."""

    def __init__(
        self, allowed: set[int], vocab_size: int = VOCAB, costs: GrammarCosts | None = None
    ) -> None:
        self.allowed = allowed
        self.vocab_size = vocab_size
        self.costs = costs or GrammarCosts()
        self.checks = 0

    def check(self, token: int) -> bool:
        self.checks += 1
        return token in self.allowed

    def accept(self, token: int) -> None:
        assert token in self.allowed

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        for token in self.allowed:
            bitmask[row, token // 32] |= 1 << (token % 32)

    def is_terminated(self) -> bool:
        return False

    def fork(self) -> SetMatcher:
        return SetMatcher(self.allowed, self.vocab_size, self.costs)


def _logprobs(seed: int) -> torch.Tensor:
    logits = 2.0 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))
    return logits.log_softmax(dim=-1)


def _draw(logprobs: torch.Tensor, matcher: SetMatcher, n: int, want_weight: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def uniform(rows):
        return torch.rand((len(rows), VOCAB), generator=generator)

    batch = logprobs.expand(n, VOCAB).contiguous()
    return awrs.sample_constrained(batch, [matcher] * n, [False] * n, [want_weight] * n, uniform)


def _chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    support = expected_probs > 0
    expected = expected_probs[support] * counts.sum()
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    return statistic, int(support.sum()) - 1


# (candidates, walk limit): the whole walk; the mask after 2 candidates; after 1 check (a
# grammar whose mask costs no more than a check).
WALKS = {
    "walk": (awrs.CANDIDATES, None),
    "mask-fallback": (2, None),
    "limit-1": (awrs.CANDIDATES, 1),
}


def _set_walk(monkeypatch, walk: str) -> int:
    candidates, limit = WALKS[walk]
    monkeypatch.setattr(awrs, "CANDIDATES", candidates)
    if limit is not None:
        monkeypatch.setattr(GrammarCosts, "walk_limit", lambda self, candidates: limit)
    return candidates if limit is None else limit


@pytest.mark.parametrize("walk", WALKS)
def test_one_step_samples_p_restricted_to_allowed_tokens(monkeypatch, walk) -> None:
    candidates = _set_walk(monkeypatch, walk)
    logprobs = _logprobs(0)
    allowed = {1, 4, 5, 9, 11}
    outcomes = _draw(logprobs, SetMatcher(allowed), 6000, False, seed=1)
    counts = torch.bincount(torch.tensor([o.token for o in outcomes]), minlength=VOCAB).double()
    assert counts[[t for t in range(VOCAB) if t not in allowed]].sum() == 0
    restricted = torch.zeros(VOCAB, dtype=torch.float64)
    restricted[list(allowed)] = logprobs.double().exp()[list(allowed)]
    statistic, dof = _chi_square(counts, restricted / restricted.sum())
    assert statistic < CHI2_CRITICAL_0_001[dof]
    if candidates <= 2:
        assert any(o.used_mask for o in outcomes)
        assert max(o.checks for o in outcomes) <= candidates


def test_sampler_test_detects_a_wrong_distribution() -> None:
    """The chi-square check above fails for the unconstrained (renormalised-mask-less) p."""
    logprobs = _logprobs(0)
    allowed = {1, 4, 5, 9, 11}
    outcomes = _draw(logprobs, SetMatcher(allowed), 6000, False, seed=1)
    counts = torch.bincount(torch.tensor([o.token for o in outcomes]), minlength=VOCAB).double()
    wrong = torch.zeros(VOCAB, dtype=torch.float64)
    wrong[list(allowed)] = 1.0 / len(allowed)
    statistic, dof = _chi_square(counts, wrong)
    assert statistic > CHI2_CRITICAL_0_001[dof]


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize(
    "allowed", [{3}, {0, 2, 7}, set(range(VOCAB))], ids=["one", "three", "all"]
)
def test_mean_weight_is_the_allowed_mass(monkeypatch, walk, allowed) -> None:
    _set_walk(monkeypatch, walk)
    logprobs = _logprobs(2)
    outcomes = _draw(logprobs, SetMatcher(allowed), 6000, True, seed=3)
    weights = torch.tensor([math.exp(o.log_weight) for o in outcomes], dtype=torch.float64)
    mass = float(logprobs.double().exp()[list(allowed)].sum())
    # Within 5 standard errors of the mean: unbiased, not just close.
    standard_error = float(weights.std()) / math.sqrt(len(weights))
    assert abs(float(weights.mean()) - mass) < 5 * standard_error + 1e-6
    if allowed == set(range(VOCAB)):
        assert all(o.log_weight == pytest.approx(0.0, abs=1e-6) for o in outcomes)


def test_checks_are_rejections_plus_one() -> None:
    logprobs = _logprobs(4)
    matcher = SetMatcher({int(logprobs.argmax())})
    outcomes = _draw(logprobs, matcher, 2000, False, seed=5)
    assert matcher.checks == sum(o.checks for o in outcomes)
    # The most likely token is allowed: most steps need exactly one check.
    assert sorted(o.checks for o in outcomes)[len(outcomes) // 2] == 1


def test_bitmask_to_bool_reads_bit_j_of_word_w_as_token_32w_plus_j() -> None:
    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31, (3, 5), dtype=torch.int32, generator=generator)
    vocab = 150  # not a multiple of 32: the last word's high bits are ignored
    expected = torch.tensor(
        [[(int(row[t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)] for row in bitmask]
    )
    assert torch.equal(bitmask_to_bool(bitmask, vocab), expected)


def test_walk_limit_is_the_checks_one_mask_costs() -> None:
    costs = GrammarCosts()
    assert costs.walk_limit(32) == 32  # nothing measured yet
    costs.add_checks(4, 4e-6)  # 1 us a check
    assert costs.walk_limit(32) == 32  # no mask measured yet
    costs.add_mask(5.5e-6)
    assert costs.walk_limit(32) == 6
    assert costs.walk_limit(4) == 4
    costs.add_mask(0.0)  # running means: one cheap mask lowers the limit, not to nothing
    assert 1 <= costs.walk_limit(32) < 6
    slow_checks = GrammarCosts(check_seconds=1e-3, mask_seconds=1e-5)
    assert slow_checks.walk_limit(32) == 1


class SlowCheckMatcher(SetMatcher):
    """Checks cost 10 ms; its masks are cheap (with 1 ms checks, a mask timed while a busy
    machine stalled the process once came out dearer than a check and raised the limit)."""

    def check(self, token: int) -> bool:
        time.sleep(1e-2)
        return super().check(token)


def test_walks_stop_where_checks_cost_more_than_the_mask_and_sample_the_same(
    monkeypatch,
) -> None:
    """Only the two least likely tokens are allowed: walks reject a lot. Once a mask has been
    timed, walks stop after one check (per loop); the sampled tokens and weights are those of
    full walks."""
    monkeypatch.setattr(awrs, "CANDIDATES", 6)
    logprobs = _logprobs(8)
    allowed = {int(logprobs.argmin()), int(logprobs.argsort()[1])}
    adaptive = SlowCheckMatcher(allowed)
    outcomes = _draw(logprobs, adaptive, 30, True, seed=9)
    first_mask = next(i for i, o in enumerate(outcomes) if o.used_mask)
    assert outcomes[first_mask].checks > 2  # walked before any mask was timed
    assert adaptive.costs.walk_limit(6) == 1
    later = outcomes[first_mask + 1 :]
    assert later and all(o.checks <= 2 for o in later)  # one check in each loop
    unbounded = SetMatcher(allowed, costs=GrammarCosts())
    unbounded.costs.walk_limit = lambda candidates: candidates  # never measured: full walks
    reference = _draw(logprobs, unbounded, 30, True, seed=9)
    assert [o.token for o in outcomes] == [o.token for o in reference]
    assert [o.log_weight for o in outcomes] == pytest.approx([o.log_weight for o in reference])


def test_greedy_takes_the_best_allowed_token() -> None:
    logprobs = _logprobs(6)
    order = logprobs.argsort(descending=True).tolist()
    allowed = {order[3], order[7]}
    outcome = awrs.sample_constrained(
        logprobs[None], [SetMatcher(allowed)], [True], [False], lambda rows: None
    )[0]
    assert outcome.token == order[3]
    assert outcome.checks == 4


def test_no_allowed_token_with_probability_is_a_dead_end() -> None:
    logprobs = _logprobs(7).clone()
    logprobs[[2, 3]] = -math.inf
    outcomes = _draw(logprobs, SetMatcher({2, 3}), 5, True, seed=8)
    assert all(o.token is None and o.log_weight == -math.inf for o in outcomes)


def test_mask_logits_keeps_only_allowed_tokens() -> None:
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(9))
    matchers = [SetMatcher({0, 33}, 40), SetMatcher({5}, 40)]
    masked = awrs.mask_logits(logits, matchers)
    assert torch.isfinite(masked).sum(dim=-1).tolist() == [2, 1]
    assert masked[0, 33] == logits[0, 33]
    bitmask = allocate_bitmask(1, 40)
    matchers[0].fill_bitmask(bitmask, 0)
    assert bitmask.shape == (1, 2)
