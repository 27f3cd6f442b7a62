"""Batched token sampling: repetition penalty, temperature, top-k, top-p, min-p, logprobs.

Every function takes logits [B, V] and per-row parameters as host-side sequences (no device
syncs to find which rows need work), never modifies its input, and leaves rows whose option is
off bit-for-bit untouched: a row's result depends only on that row.

Order (Hugging Face's): repetition penalty -> temperature -> top-k -> top-p -> min-p. Top-p
measures mass in the distribution renormalized after top-k (and before min-p); min-p compares
each token to the most likely one, a ratio that no renormalization changes.

Sampling uses the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. is a draw from p
(E_i / p_i ~ Exp(rate p_i), and the smallest of independent exponentials is index i with
probability p_i / sum p). The noise of a seeded row comes from that row's own generator, so the
token depends only on the seed, how many steps the generator has served and the row's logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain

import torch

from engine.types import SamplingParams, TokenLogprob

# Candidates searched for the top-p nucleus before falling back to a full sort of the row.
_NUCLEUS_CANDIDATES = 1024


def apply_repetition_penalty(
    logits: torch.Tensor, token_ids: Sequence[Sequence[int]], penalties: Sequence[float]
) -> torch.Tensor:
    """HF semantics: for tokens seen in the row (prompt + output), positive logits are divided
    by the penalty and negative ones multiplied, so a penalty > 1 always lowers them."""
    rows = [r for r, penalty in enumerate(penalties) if penalty != 1.0 and token_ids[r]]
    if not rows:
        return logits
    device = logits.device
    lengths = torch.tensor([len(token_ids[r]) for r in rows])
    row_index = torch.tensor(rows).repeat_interleave(lengths).to(device)
    token_index = torch.tensor(list(chain.from_iterable(token_ids[r] for r in rows))).to(device)
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=device)[row_index]
    seen = logits[row_index, token_index]
    out = logits.clone()
    # Repeated ids write the same value twice, so duplicates need no deduplication.
    out[row_index, token_index] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_temperature(logits: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """Divide each row by its temperature; rows at 1.0 or 0.0 (greedy) are left alone."""
    if all(t in (0.0, 1.0) for t in temperatures):
        return logits
    divisors = [t if t > 0.0 else 1.0 for t in temperatures]
    return logits / torch.tensor(divisors, dtype=logits.dtype, device=logits.device)[:, None]


def _rows(flags: Sequence[bool], device: torch.device) -> torch.Tensor:
    return torch.tensor([i for i, flag in enumerate(flags) if flag], device=device)


def apply_top_k(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th are kept too); k = 0 disables."""
    vocab = logits.shape[-1]
    enabled = [0 < k < vocab for k in top_k]
    if not any(enabled):
        return logits
    rows = _rows(enabled, logits.device)
    k_list = [k for k, on in zip(top_k, enabled, strict=True) if on]
    ks = torch.tensor(k_list, device=logits.device)
    selected = logits[rows]
    # One partial top-k at the largest k serves every row; no full sort.
    largest = selected.topk(max(k_list), dim=-1).values
    kth = largest.gather(-1, (ks - 1)[:, None])
    out = logits.clone()
    out[rows] = selected.masked_fill(selected < kth, -math.inf)
    return out


def apply_top_p(logits: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass is >= top_p.

    A token is kept iff the mass of the tokens ranked above it is < top_p, which always keeps
    the most likely token. Rows at 1.0 are left alone.
    """
    enabled = [p < 1.0 for p in top_p]
    if not any(enabled):
        return logits
    rows = _rows(enabled, logits.device)
    ps = torch.tensor(
        [p for p, on in zip(top_p, enabled, strict=True) if on],
        dtype=logits.dtype,
        device=logits.device,
    )
    selected = logits[rows]
    probs = selected.softmax(dim=-1)
    # A language model's nucleus is usually small: look for it among the top candidates and
    # sort the whole row only where they do not reach top_p (a full sort of 131k is slow).
    top_probs, top_ids = probs.topk(min(_NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    keep = torch.zeros_like(selected, dtype=torch.bool)
    keep.scatter_(-1, top_ids, _nucleus(top_probs, ps))
    uncovered = (top_probs.sum(dim=-1) < ps).nonzero().squeeze(-1)
    if uncovered.numel():
        sorted_probs, order = probs[uncovered].sort(dim=-1, descending=True)
        keep[uncovered] = torch.zeros_like(order, dtype=torch.bool).scatter_(
            -1, order, _nucleus(sorted_probs, ps[uncovered])
        )
    out = logits.clone()
    out[rows] = selected.masked_fill(~keep, -math.inf)
    return out


def _nucleus(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which of the descending probabilities are kept: those with less than top_p above them."""
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    return mass_above < top_p[:, None]


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max; rows at 0.0 are left alone."""
    enabled = [p > 0.0 for p in min_p]
    if not any(enabled):
        return logits
    rows = _rows(enabled, logits.device)
    log_min_p = torch.tensor(
        [math.log(p) for p, on in zip(min_p, enabled, strict=True) if on],
        dtype=logits.dtype,
        device=logits.device,
    )
    selected = logits[rows]
    # p_i / p_max = exp(l_i - l_max): compare in log space, no softmax needed.
    threshold = selected.max(dim=-1, keepdim=True).values + log_min_p[:, None]
    out = logits.clone()
    out[rows] = selected.masked_fill(selected < threshold, -math.inf)
    return out


def request_generator(
    seed: int | None, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """A seeded request's own generator; None (the engine's shared RNG) for unseeded ones."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def uniform_noise(
    shape: tuple[int, int],
    generators: Sequence[torch.Generator | None],
    engine_generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """U(0, 1) noise [B, V]: row i from generators[i], or when that is None from one batched
    draw of `engine_generator` shared by all such rows."""
    uniform = torch.empty(shape, device=device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        uniform[shared] = torch.empty((len(shared), shape[1]), device=device).uniform_(
            generator=engine_generator
        )
    for i, generator in enumerate(generators):
        if generator is not None:
            uniform[i].uniform_(generator=generator)
    return uniform


def _exponential_noise(
    shape: tuple[int, int],
    generators: Sequence[torch.Generator | None],
    engine_generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Exp(1) noise as -log(U): torch's CPU exponential_ is several times slower than this."""
    uniform = uniform_noise(shape, generators, engine_generator, device)
    # U = 0 would give infinite noise, so a row with one allowed token could score all zeros.
    return uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_()


def _penalize(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prior_token_ids: Sequence[Sequence[int]] | None,
) -> torch.Tensor:
    penalties = [p.repetition_penalty for p in params]
    if all(penalty == 1.0 for penalty in penalties):
        return logits
    if prior_token_ids is None:
        raise ValueError("repetition_penalty needs prior_token_ids")
    return apply_repetition_penalty(logits, prior_token_ids, penalties)


def _filter_rows(rows: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on rows that sample (one params per row)."""
    rows = apply_temperature(rows, [p.temperature for p in params])
    rows = apply_top_k(rows, [p.top_k for p in params])
    rows = apply_top_p(rows, [p.top_p for p in params])
    return apply_min_p(rows, [p.min_p for p in params])


def filter_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prior_token_ids: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """The logits `sample` draws from: repetition penalty on every row, then temperature,
    top-k, top-p and min-p on the rows that sample (greedy rows keep their penalized logits).
    `prior_token_ids[i]` (prompt + output so far) is needed only when a row has a penalty."""
    logits = _penalize(logits, params, prior_token_ids)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return logits
    if len(sampled) == len(params):
        return _filter_rows(logits, params)
    out = logits.clone()
    out[sampled] = _filter_rows(logits[sampled], [params[i] for i in sampled])
    return out


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prior_token_ids: Sequence[Sequence[int]] | None = None,
    engine_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of float32 `logits` [B, V]; returns int64 [B].

    Greedy rows (temperature 0) take the argmax of the penalized logits. Sampled rows draw their
    noise from `generators[i]`, or when that is None from `engine_generator` (torch's default
    generator if None). `prior_token_ids[i]` (prompt + output so far) feeds the repetition
    penalty and is only needed when some row has one.
    """
    logits = _penalize(logits, params, prior_token_ids)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if len(sampled) < len(params):
        tokens = logits.argmax(dim=-1)  # greedy rows; sampled rows are overwritten below
        if not sampled:
            return tokens
        rows = logits[torch.tensor(sampled, device=logits.device)]
    else:
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
        rows = logits
    rows = _filter_rows(rows, [params[i] for i in sampled])
    # Unnormalized probabilities suffice: the argmax ignores a per-row scale.
    weights = (rows - rows.max(dim=-1, keepdim=True).values).exp()
    noise = _exponential_noise(
        tuple(rows.shape), [generators[i] for i in sampled], engine_generator, rows.device
    )
    tokens[sampled] = (weights / noise).argmax(dim=-1)
    return tokens


def compute_logprobs(
    logits: torch.Tensor, chosen_ids: Sequence[int] | torch.Tensor, top_n: Sequence[int]
) -> list[TokenLogprob]:
    """Log-probabilities of the chosen tokens and each row's top_n alternatives (best first).

    Pass the raw model logits: like vLLM's default, these are the model's own log-probabilities,
    before repetition penalty, temperature and top-k/top-p/min-p filtering.
    """
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = torch.as_tensor(chosen_ids, dtype=torch.long, device=logits.device)
    chosen_logprobs = logprobs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    top_values: list[list[float]] = [[] for _ in top_n]
    top_ids: list[list[int]] = [[] for _ in top_n]
    if max(top_n, default=0) > 0:
        top = logprobs.topk(max(top_n), dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    return [
        TokenLogprob(
            token_id=int(token_id),
            logprob=logprob,
            top=tuple(zip(top_ids[r][: max(n, 0)], top_values[r][: max(n, 0)], strict=True)),
        )
        for r, (token_id, logprob, n) in enumerate(
            zip(chosen.tolist(), chosen_logprobs, top_n, strict=True)
        )
    ]
