"""Sequential Monte Carlo over AWRS steps (design.md section 7).

A request with method SMC runs N particles. The first one prefills the prompt alone; when its
first token is drawn, N - 1 forks share its KV blocks (reference counts: copy-on-write, only a
partly filled last block is copied) and every particle draws its own first token from the same
logits. Each AWRS step adds its log weight (an unbiased estimate of the allowed mass) to the
particle's. After every step, when the effective sample size 1 / sum(W_i^2) of the normalised
weights falls under `ess_threshold * N`, the particles are resampled (stratified): a particle
drawn c times is kept once and forked c - 1 times, one drawn 0 times is dropped; every weight
becomes the mean weight. When all particles have finished, one is returned, drawn in
proportion to its weight: a sample of the weighted posterior over complete strings.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.kv_cache import BlockAllocator, KVCache, OutOfBlocks
from engine.sequence import Sequence


@dataclass
class ParticleGroup:
    size: int
    ess_threshold: float
    generator: torch.Generator  # resampling and the final choice
    particles: list[Sequence] = field(default_factory=list)
    spawned: bool = False
    # Over every particle that ever ran: tokens checked and steps that used the full mask.
    checks: int = 0
    mask_steps: int = 0

    def log_weights(self) -> list[float]:
        return [p.constraint.log_weight for p in self.particles]  # type: ignore[union-attr]

    def finished(self) -> bool:
        return self.spawned and all(p.is_finished for p in self.particles)

    def needs_resampling(self) -> bool:
        return effective_sample_size(self.log_weights()) < self.ess_threshold * len(self.particles)

    def choose(self) -> Sequence:
        """The returned particle, drawn in proportion to its weight."""
        weights = _normalised(self.log_weights())
        index = int(torch.multinomial(weights, 1, generator=self.generator))
        return self.particles[index]


def effective_sample_size(log_weights: list[float]) -> float:
    """1 / sum(W_i^2) of the normalised weights; 0 when every weight is 0."""
    if all(w == -math.inf for w in log_weights):
        return 0.0
    weights = _normalised(log_weights)
    return float(1.0 / (weights * weights).sum())


def _normalised(log_weights: list[float]) -> torch.Tensor:
    values = torch.tensor(log_weights, dtype=torch.float64)
    if torch.isneginf(values).all():
        return torch.full_like(values, 1.0 / len(values))
    return (values - values.logsumexp(dim=0)).exp()


def stratified_counts(log_weights: list[float], generator: torch.Generator) -> list[int]:
    """How many copies of each particle stratified resampling keeps (they sum to N)."""
    n = len(log_weights)
    cumulative = _normalised(log_weights).cumsum(dim=0)
    cumulative[-1] = 1.0  # rounding must not leave the last stratum without a particle
    offsets = torch.rand(n, generator=generator, dtype=torch.float64)
    points = (torch.arange(n, dtype=torch.float64) + offsets) / n
    chosen = torch.searchsorted(cumulative, points, right=True).clamp(max=n - 1)
    return torch.bincount(chosen, minlength=n).tolist()


def mean_log_weight(log_weights: list[float]) -> float:
    values = torch.tensor(log_weights, dtype=torch.float64)
    if torch.isneginf(values).all():
        return -math.inf
    return float(values.logsumexp(dim=0) - math.log(len(log_weights)))


def fork_sequence(
    seq: Sequence,
    allocator: BlockAllocator,
    kv: KVCache,
    block_size: int,
    generator: torch.Generator | None,
) -> Sequence:
    """A copy of `seq` that shares its full KV blocks; a partly filled last block is copied
    (the two would otherwise write their next tokens into the same slots). The same for the
    rows of its small models in their pool when it fuses experts (they have computed the same
    tokens). Raises OutOfBlocks, having taken no block, when a copy finds no free block."""
    child = copy.copy(seq)
    child.token_ids = list(seq.token_ids)
    child.pending_token_ids = list(seq.pending_token_ids)
    child.pending_text = list(seq.pending_text)
    child.pending_logprobs = list(seq.pending_logprobs)
    child.pending_fusion_weights = list(seq.pending_fusion_weights)
    child.detokenizer = seq.detokenizer.fork()
    child.stop_matcher = copy.copy(seq.stop_matcher)
    child.generator = generator
    if seq.constraint is not None:
        child.constraint = copy.copy(seq.constraint)
        child.constraint.matcher = seq.constraint.matcher.fork()
    child.block_table = []
    child.num_cached_blocks = 0
    if seq.prefix is not None:
        child.prefix = seq.prefix.copy()
    computed = 0 if seq.is_finished else seq.num_computed
    full, partial = divmod(computed, block_size)
    if partial and allocator.num_free == 0:
        raise OutOfBlocks("no block to copy a particle's last block into")
    if seq.fusion is not None:
        child.fusion = seq.fusion.fork(computed)  # may raise OutOfBlocks: nothing taken yet
    if seq.is_finished:
        return child
    child.block_table = [allocator.fork(block) for block in seq.block_table[:full]]
    child.num_cached_blocks = min(seq.num_cached_blocks, full)
    if partial:
        block = allocator.allocate()
        kv.copy_block(seq.block_table[full], block)
        child.block_table.append(block)
    # Blocks reserved beyond the computed tokens are not shared: the child grows its own.
    return child


def resample(
    group: ParticleGroup,
    fork: Callable[[Sequence], Sequence],
    drop: Callable[[Sequence], None],
) -> None:
    """Stratified resampling in place: `fork(p)` copies a particle (adding it to the running
    set if it runs), `drop(p)` releases one that was not drawn (first, so that forks can use
    its blocks). Weights become their mean."""
    counts = stratified_counts(group.log_weights(), group.generator)
    mean = mean_log_weight(group.log_weights())
    for particle, count in zip(group.particles, counts, strict=True):
        if count == 0:
            drop(particle)
    kept: list[Sequence] = []
    for particle, count in zip(group.particles, counts, strict=True):
        if count > 0:
            kept.append(particle)
            kept.extend(fork(particle) for _ in range(count - 1))
    for particle in kept:
        particle.constraint.log_weight = mean  # type: ignore[union-attr]
    group.particles = kept
