"""Dynamic logit fusion in the engine loop: small models in lockstep, then fused logits.

Every step, each scheduled sequence that names experts also runs its new tokens through its
small base and through each expert (design.md section 6). The rows of all such sequences form
one forward per model: the small base's forward carries its own rows and the rows of experts that
are LoRA adapters on it; an expert that is a full model runs one forward over its rows. Sequences
that sample this step then get their logits replaced, in place, by the fused ones:

    static:  z_L + sum_t alpha_t (z_Et - z_S)          (fixed alphas, proxy tuning)
    dynamic: z_L + alpha (z_Et - z_S), one expert t and its alpha chosen per step

over the vocabulary the models share; logits past it (padding of the large model) become -inf.

Dynamic fusion picks alpha on a grid by KL matching (kernels.fusion). With several experts,
which one steers is routed (FusionRouting): by KL cost over every expert's grid (the paper's), or
by likelihood: the expert under which the text so far is most likely relative to the small base,
log p_Et(x) - log p_S(x) summed over every token after the first (the task the text comes from).
That evidence is accumulated from the small models' logits at every position as they go.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine.batch import ForwardBatch
from engine.experts import Expert, SmallBase
from engine.kv_cache import OutOfBlocks
from engine.lora import LoraAdapter
from engine.model import CausalLM
from engine.types import FusionMode, FusionRouting
from kernels.cpu_ops import fusion_apply, fusion_dynamic
from kernels.fusion import default_grid


@dataclass(eq=False)
class FusionState:
    """A sequence's experts, the KV block tables of its small-model rows, how many tokens those
    rows have computed, and the routing evidence gathered so far."""

    experts: tuple[Expert, ...]
    alphas: tuple[float, ...]  # static fusion's fixed alphas, in the experts' order
    mode: FusionMode
    routing: FusionRouting = FusionRouting.LIKELIHOOD
    # Row 0 is the small base, row 1 + t expert t; all in the small base's KV pool.
    tables: list[list[int]] = field(default_factory=list)
    # Behind the large model's only at admission, when it took a cached prefix: the small
    # models then compute those tokens in the same step as the large model's first chunk.
    num_computed: int = 0
    # Likelihood routing: sum of log p_Et - log p_S over the tokens seen, float64 [E], and each
    # row's logits at the last position seen (they score the next token when it arrives).
    evidence: torch.Tensor | None = None
    last_logits: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.tables = [[] for _ in range(1 + len(self.experts))]
        self.reset_evidence()

    @property
    def small_base(self) -> SmallBase:
        return self.experts[0].small_base

    @property
    def vocab_size(self) -> int:
        return min(expert.vocab_size for expert in self.experts)

    @property
    def num_rows(self) -> int:
        return len(self.tables)

    @property
    def routes_by_likelihood(self) -> bool:
        return (
            self.mode is FusionMode.DYNAMIC
            and self.routing is FusionRouting.LIKELIHOOD
            and len(self.experts) > 1
        )

    def can_grow(self, num_blocks: int) -> bool:
        """True when every row can hold `num_blocks` blocks of the pool."""
        needed = sum(max(0, num_blocks - len(table)) for table in self.tables)
        return needed <= self.small_base.allocator.num_free

    def grow(self, num_blocks: int) -> None:
        allocator = self.small_base.allocator
        for table in self.tables:
            while len(table) < num_blocks:
                table.append(allocator.allocate())

    def fork(self, num_computed: int) -> FusionState:
        """A copy for an SMC particle whose rows have computed `num_computed` tokens: full
        blocks shared (reference counts), a partly filled last block copied, the routing
        evidence copied. Raises OutOfBlocks, having taken no block, when the pool cannot hold
        the copies."""
        child = FusionState(self.experts, self.alphas, self.mode, self.routing)
        child.num_computed = num_computed
        assert self.evidence is not None
        child.evidence = self.evidence.clone()
        child.last_logits = self.last_logits  # never written in place: add_evidence replaces it
        base = self.small_base
        full, partial = divmod(num_computed, base.kv.block_size)
        if partial and base.allocator.num_free < self.num_rows:
            raise OutOfBlocks("no blocks to copy a particle's small-model rows into")
        for table, copy in zip(self.tables, child.tables, strict=True):
            copy.extend(base.allocator.fork(block) for block in table[:full])
            if partial:
                block = base.allocator.allocate()
                base.kv.copy_block(table[full], block)
                copy.append(block)
        return child

    def free(self) -> None:
        """Give the blocks back (finished, or preempted: then every token is recomputed, so the
        evidence starts over too)."""
        for table in self.tables:
            self.small_base.allocator.free_all(table)
            table.clear()
        self.num_computed = 0
        self.reset_evidence()

    def reset_evidence(self) -> None:
        self.evidence = torch.zeros(len(self.experts), dtype=torch.float64)
        self.last_logits = None

    def add_evidence(self, token_ids: list[int], logits: list[torch.Tensor]) -> None:
        """logits[m]: row m's logits [len(token_ids), V] at the positions of `token_ids`; the
        logits before each token (the last ones seen, then these) score it."""
        vocab = self.vocab_size
        tokens = torch.tensor(token_ids)
        scored = []
        for m, rows in enumerate(logits):
            before = rows[:-1]
            if self.last_logits is not None:
                before = torch.cat([self.last_logits[m][None], before])
            targets = tokens[len(tokens) - len(before) :]
            log_probs = torch.log_softmax(before[:, :vocab].double(), -1)
            scored.append(log_probs.gather(1, targets[:, None]).sum())
        self.evidence += torch.stack(scored[1:]) - scored[0]
        self.last_logits = [rows[-1].clone() for rows in logits]  # not a view of the batch

    def route(self) -> int:
        """The expert under which the text so far is most likely (ties: the first)."""
        return int(torch.argmax(self.evidence))


@dataclass(frozen=True)
class FusionRow:
    """One fused sequence of the step: its state and its new tokens."""

    state: FusionState
    token_ids: list[int]  # the tokens of this step (a prefill chunk or one decode token)
    context_len: int  # the sequence's length after them
    samples: bool  # draws a token this step (then its logits are fused)


def prepare_experts(
    rows: Sequence[FusionRow], block_size: int
) -> Callable[[], list[list[torch.Tensor]]]:
    """The small models' passes over the step's rows made ready (CausalLM.prepare); the
    returned function runs them (and gathers routing evidence) and gives, per row that samples,
    in order, the logits [V] of its small base then of each expert (float32; V may exceed the
    row's vocabulary: the fusion reads its first state.vocab_size)."""
    groups: dict[int, tuple[CausalLM, SmallBase, list[tuple[int, int]]]] = {}
    for index, row in enumerate(rows):
        base = row.state.small_base
        for member in range(row.state.num_rows):
            expert = row.state.experts[member - 1] if member else None
            model = expert.model if expert is not None else None
            key = id(model) if model is not None else id(base.model)
            entry = groups.setdefault(key, (model or base.model, base, []))
            entry[2].append((index, member))
    passes = [
        (members, *_prepare(model, base, rows, members, block_size))
        for model, base, members in groups.values()
    ]

    def run() -> list[list[torch.Tensor]]:
        # Per row and member: logits at the positions it needs (see _needed).
        out: list[list[torch.Tensor]] = [[None] * r.state.num_rows for r in rows]  # type: ignore[list-item]
        for members, counts, forward in passes:
            for (i, m), piece in zip(members, _pieces(forward(), counts), strict=True):
                out[i][m] = piece
        for row, logits in zip(rows, out, strict=True):
            if row.state.routes_by_likelihood:
                row.state.add_evidence(
                    row.token_ids, [t if t.dim() == 2 else t[None] for t in logits]
                )
        return [
            [member if member.dim() == 1 else member[-1] for member in logits]
            for row, logits in zip(rows, out, strict=True)
            if row.samples
        ]

    return run


def _pieces(logits: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, ...]:
    """Each member's rows of a pass's logits: [V] each where every member has one row (a
    decode step: one op makes them all, where an op per row cost a step of eight rows hundreds
    of us), else [counts[i], V]."""
    if all(n == 1 for n in counts):
        return logits.unbind(0)
    return logits.split(counts)


def _needed(row: FusionRow) -> int:
    """How many of the row's last positions need logits: all for routing evidence, the last
    when it samples, else none."""
    if row.state.routes_by_likelihood:
        return len(row.token_ids)
    return 1 if row.samples else 0


def _prepare(
    model: CausalLM,
    base: SmallBase,
    rows: Sequence[FusionRow],
    members: list[tuple[int, int]],
    block_size: int,
) -> tuple[list[int], Callable[[], torch.Tensor]]:
    """One pass of `model` over the member rows, made ready: how many logits rows each member
    gets (its last _needed(row) positions), and the pass."""
    counts = [_needed(rows[i]) for i, _ in members]
    batch = ForwardBatch.build(
        token_ids=[rows[i].token_ids for i, _ in members],
        context_lens=[rows[i].context_len for i, _ in members],
        block_tables=[rows[i].state.tables[m] for i, m in members],
        block_size=block_size,
        logits_rows=[n > 0 for n in counts],  # each one's last position: all a decode step needs
    )
    if any(n > 1 for n in counts):
        ends = itertools.accumulate(batch.query_lens)
        batch.logits_indices = torch.tensor(
            [p for end, n in zip(ends, counts, strict=True) for p in range(end - n, end)],
            dtype=torch.int64,
        )
    lora = None
    if model is base.model:
        uses = [_lora_use(rows[i].state, m) for i, m in members]
        lora = base.stacks.batch(uses, batch.query_lens)
    return counts, model.prepare(batch, base.kv, lora)


def _lora_use(state: FusionState, member: int) -> tuple[tuple[LoraAdapter, float], ...]:
    adapter = state.experts[member - 1].adapter if member else None
    return ((adapter, 1.0),) if adapter is not None else ()


def fuse(
    states: Sequence[FusionState],
    logits: torch.Tensor,
    rows: Sequence[int],
    small: Sequence[list[torch.Tensor]],
) -> list[tuple[float, ...]]:
    """Replace logits[rows[i]] (the large model's, float32) by the fused logits of states[i],
    in place; returns each one's alphas in its experts' order. Rows are fused in groups of one mode,
    one number of candidate experts and one vocabulary (the kernels take [B, E, V])."""
    # Per row: the experts that compete this step (likelihood routing keeps one).
    candidates = [
        [state.route()] if state.routes_by_likelihood else list(range(len(state.experts)))
        for state in states
    ]
    groups: dict[tuple[FusionMode, int, int], list[int]] = {}
    for i, state in enumerate(states):
        key = (state.mode, len(candidates[i]), state.vocab_size)
        groups.setdefault(key, []).append(i)
    alphas: list[tuple[float, ...]] = [()] * len(states)
    for (mode, _, vocab), indices in groups.items():
        targets = [rows[i] for i in indices]
        base = [small[i][0] for i in indices]
        offered = [[small[i][1 + t] for t in candidates[i]] for i in indices]
        if mode is FusionMode.STATIC:
            chosen = [states[i].alphas for i in indices]
            fusion_apply(
                logits, targets, base, offered, torch.tensor(chosen, dtype=torch.float32), vocab
            )
        else:
            picks, alpha = fusion_dynamic(
                logits, targets, base, offered, default_grid(torch.float32, logits.device), vocab
            )
            chosen = [
                _one_hot(len(states[i].experts), candidates[i][e], a)
                for i, e, a in zip(indices, picks, alpha, strict=True)
            ]
        for i, row_alphas in zip(indices, chosen, strict=True):
            alphas[i] = tuple(row_alphas)
    return alphas


def _one_hot(size: int, index: int, value: float) -> tuple[float, ...]:
    return tuple(value if t == index else 0.0 for t in range(size))
