"""Adaptive weighted rejection sampling (AWRS): constrained sampling that checks only the tokens
it draws (design.md section 7).

Loop 0 walks the row's tokens in the order of sampling without replacement (Gumbel-top-k
keys) and takes the first one the constraint accepts: an exact sample from p restricted to the
allowed tokens, after (rejections + 1) checks. Loop 1 (only when a weight is wanted: SMC) draws
a fresh order over the tokens loop 0 did not reject and walks it to its first accepted token;
with R rejections in both loops and the loop-0 rejected mass m,
    weight = Z_left / (R + 1),  Z_left = 1 - m  (p is normalised),
is an unbiased estimate of the allowed mass Z.

Only k candidates per row are drawn, and the walk stops earlier once its checks would cost more
than one full mask of the grammar (GrammarCosts.walk_limit, from the measured times of both):
then the full mask finishes the walk. The first allowed token in the same key order is the
argmax of the keys over allowed tokens, and the tokens the walk would still have rejected are
exactly the disallowed ones with a larger key. Sample and weight are therefore those of the
unbounded walk, wherever it stops: the timings change only how many checks are made.

Greedy rows (temperature 0) take the allowed token of highest logit (no noise, no weight).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.grammar import Matcher, allocate_bitmask, bitmask_to_bool
from engine.types import ConstraintMethod
from kernels import cpu_ops
from kernels.gumbel import gumbel_topk

# Candidates drawn per row: the most checks a walk makes before the full mask.
CANDIDATES = 32


@dataclass
class StepOutcome:
    token: int | None  # None: no allowed token has probability > 0 (a dead end)
    checks: int  # tokens the matcher checked
    used_mask: bool  # the full mask was computed
    log_weight: float = 0.0  # log estimate of the allowed mass (rows that asked for it)


def gumbel_keys(logprobs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """logprobs + Gumbel noise, the keys gumbel_topk ranks (U = 0 counts as the smallest normal
    number, so that no finite token gets a -inf key)."""
    return cpu_ops.gumbel_keys(logprobs[None], uniform[None])[0]


def allowed_mask(matcher: Matcher, width: int) -> torch.Tensor:
    """bool [width]: the tokens the matcher allows now (none beyond its vocabulary)."""
    bitmask = allocate_bitmask(1, matcher.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    allowed = bitmask_to_bool(bitmask, matcher.vocab_size)[0]
    if width == allowed.shape[0]:  # the usual case: the copy of a pad costs as much as a fill
        return allowed
    return torch.nn.functional.pad(allowed[:width], (0, max(0, width - allowed.shape[0])))


def sample_constrained(
    logprobs: torch.Tensor,
    matchers: Sequence[Matcher],
    greedy: Sequence[bool],
    want_weight: Sequence[bool],
    uniform: Callable[[Sequence[int]], torch.Tensor],
) -> list[StepOutcome]:
    """One token per row of `logprobs` [B, V] (float32, log-softmax of the filtered logits).

    `uniform(rows)` returns fresh U(0, 1) noise [len(rows), V] for those rows, drawn from each
    row's own generator. Matchers are not advanced: the caller accepts the chosen tokens.
    """
    vocab = logprobs.shape[-1]
    k = min(CANDIDATES, vocab)
    sampled = [i for i, g in enumerate(greedy) if not g]
    outcomes: list[StepOutcome | None] = [None] * len(matchers)
    if len(sampled) < len(matchers):
        rows = [i for i, g in enumerate(greedy) if g]
        top = logprobs[rows].topk(k, dim=-1)
        for j, row in enumerate(rows):
            row_logprobs = logprobs[row]  # greedy: the keys are the log-probabilities
            outcomes[row] = _first_allowed(
                lambda keys=row_logprobs: keys, top.values[j], top.indices[j], matchers[row]
            )[0]
    if sampled:
        noise = uniform(sampled)
        keys, ids = gumbel_topk(logprobs[sampled], noise, k)
        for j, row in enumerate(sampled):

            def full_keys(j: int = j, row: int = row) -> torch.Tensor:
                return gumbel_keys(logprobs[row], noise[j])

            outcome, rejected = _first_allowed(full_keys, keys[j], ids[j], matchers[row])
            if want_weight[row]:
                _estimate_weight(outcome, logprobs[row], rejected, matchers[row], uniform, row)
            outcomes[row] = outcome
    return outcomes  # type: ignore[return-value]


def _first_allowed(
    full_keys: Callable[[], torch.Tensor], keys: torch.Tensor, ids: torch.Tensor, matcher: Matcher
) -> tuple[StepOutcome, list[int] | torch.Tensor]:
    """Walk the candidates (decreasing keys) to the first allowed token; returns the outcome
    and the tokens rejected on the way (ids, or a bool [V] after the mask fallback).
    `full_keys()` gives every token's key: only the fallback needs it."""
    rejected: list[int] = []
    checks = 0
    limit = matcher.costs.walk_limit(keys.shape[-1])
    started = time.perf_counter()
    for key, token in zip(keys[:limit].tolist(), ids[:limit].tolist(), strict=True):
        if key == -math.inf:  # every token of nonzero probability was rejected
            matcher.costs.add_checks(checks, time.perf_counter() - started)
            return StepOutcome(None, checks, False, -math.inf), rejected
        checks += 1
        if matcher.check(token):
            matcher.costs.add_checks(checks, time.perf_counter() - started)
            return StepOutcome(token, checks, False), rejected
        rejected.append(token)
    matcher.costs.add_checks(checks, time.perf_counter() - started)
    # The walk's limit rejected: the unbounded walk's result, read off the full mask.
    every_key = full_keys()
    started = time.perf_counter()
    allowed = allowed_mask(matcher, every_key.shape[-1])
    matcher.costs.add_mask(time.perf_counter() - started)
    allowed &= every_key > -math.inf
    if not allowed.any():
        return StepOutcome(None, checks, True, -math.inf), rejected
    token = int(torch.where(allowed, every_key, -math.inf).argmax())
    return StepOutcome(token, checks, True), ~allowed & (every_key > every_key[token])


def _estimate_weight(
    outcome: StepOutcome,
    logprobs: torch.Tensor,
    rejected: list[int] | torch.Tensor,
    matcher: Matcher,
    uniform: Callable[[Sequence[int]], torch.Tensor],
    row: int,
) -> None:
    """Loop 1: a fresh walk over what loop 0 did not reject, to count further rejections."""
    if outcome.token is None:
        return
    left = logprobs.clone()
    left[rejected] = -math.inf
    noise = uniform([row])[0]
    keys, ids = gumbel_topk(left[None], noise[None], min(CANDIDATES, left.shape[-1]))
    second, rejected_again = _first_allowed(
        lambda: gumbel_keys(left, noise), keys[0], ids[0], matcher
    )
    outcome.checks += second.checks
    outcome.used_mask |= second.used_mask
    num_rejected = _count(rejected) + _count(rejected_again)
    outcome.log_weight = float(torch.logsumexp(left, dim=-1)) - math.log(num_rejected + 1)


def _count(rejected: list[int] | torch.Tensor) -> int:
    return len(rejected) if isinstance(rejected, list) else int(rejected.sum())


def mask_logits(logits: torch.Tensor, matchers: Sequence[Matcher]) -> torch.Tensor:
    """MASK: disallowed tokens of each row set to -inf (a new tensor)."""
    width = logits.shape[-1]
    allowed = torch.stack([allowed_mask(matcher, width) for matcher in matchers])
    return logits.masked_fill(~allowed.to(logits.device), -math.inf)


@dataclass
class ConstraintState:
    """A constrained sequence's matcher and what its decoding cost and weighed."""

    matcher: Matcher
    method: ConstraintMethod
    checks: int = 0
    mask_steps: int = 0
    log_weight: float = 0.0

    def record(self, outcome: StepOutcome) -> None:
        self.checks += outcome.checks
        self.mask_steps += outcome.used_mask
        self.log_weight += outcome.log_weight
