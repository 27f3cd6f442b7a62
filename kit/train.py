"""Training machinery for the kit: compact vocabulary, deterministic runs, the training loop.

Training only ever computes logits for the vocabulary entries the kit's text uses (about a
thousand of 32768). The other embedding rows stay at near zero in the saved full-vocabulary
model, so their logits are near zero and the full softmax's denominator is the seen tokens' part
plus a constant (one logit of log(unseen count)). The loss is therefore the full-vocabulary
cross-entropy, at a small fraction of the LM head's cost, and the saved models are ordinary
full-vocabulary Llamas.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kernels.build import cpu_flags

FULL_VOCAB_SIZE = 32768
BOS_ID, EOS_ID = 1, 2
# Small enough that the unseen tokens' logits are ~0 (the loss's assumption), yet distinct, so
# they never tie with each other in top-k or argmax.
_UNSEEN_EMBEDDING_STD = 1e-4
_PROGRESS_INTERVAL_S = 10.0
# What one more forward and backward piece of a batch costs, counted in padded tokens
# (Batch.pieces). With 64, fp32 steps of base-large took 0.56x the whole padded batch's time on
# multi-task batches and 0.88x on the reverse task's (AVX2 kernels); 16 and 256 were slower.
_PIECE_COST_TOKENS = 64


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 20
    weight_decay: float = 0.1

    def factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to 10% of the peak."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Batch:
    """Right-padded rows: a row ends after its last counted target."""

    inputs: torch.Tensor  # [B, T] compact ids
    targets: torch.Tensor  # [B, T] compact ids
    loss_mask: torch.Tensor  # [B, T] bool: which targets count

    def pieces(self, piece_cost: int = _PIECE_COST_TOKENS) -> list[Batch]:
        """The rows in groups of similar length, each cut to its longest row.

        Attention is causal, so a row's padding never reaches the positions that count: the
        pieces' summed losses and gradients are the whole batch's, for fewer padded tokens (a
        multi-task batch was half padding, its short examples padded to the record task's).
        """
        positions = torch.arange(1, self.loss_mask.shape[1] + 1)
        lengths = (self.loss_mask * positions).amax(dim=1).tolist()
        groups = length_groups(lengths, piece_cost)
        if len(groups) == 1:
            return [self]
        pieces = []
        for rows in groups:
            index, length = torch.tensor(rows), max(lengths[row] for row in rows)
            pieces.append(
                Batch(
                    self.inputs[index, :length],
                    self.targets[index, :length],
                    self.loss_mask[index, :length],
                )
            )
        return pieces


def length_groups(lengths: list[int], piece_cost: int) -> list[list[int]]:
    """Row indices in groups that minimise the padded tokens plus piece_cost per group.

    An optimal grouping takes contiguous runs of the rows sorted by length, so this is a
    dynamic programme over split points of the sorted order.
    """
    order = sorted(range(len(lengths)), key=lambda row: (lengths[row], row))
    # least[i]: the least cost of the i shortest rows; split[i]: where their last group starts.
    least, split = [0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(end):
            cost = least[start] + piece_cost + longest * (end - start)
            if cost < least[end]:
                least[end], split[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[split[end] : end])
        end = split[end]
    return groups[::-1]


class TokenSpace:
    """The sorted set of full-vocabulary ids the kit trains on, and the maps to and from it."""

    def __init__(self, seen_ids: torch.Tensor) -> None:
        self.seen_ids = torch.unique(seen_ids)

    def __len__(self) -> int:
        return len(self.seen_ids)

    def compact(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.searchsorted(self.seen_ids, ids)
        if not torch.equal(self.seen_ids[positions.clamp(max=len(self) - 1)], ids):
            raise ValueError("a token outside the kit's token space")
        return positions

    @property
    def unseen_count(self) -> int:
        return FULL_VOCAB_SIZE - len(self)


def llama_config(arch: Architecture, vocab_size: int, attention: str = "sdpa") -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="float32",
        attn_implementation=attention,
    )


def new_compact_model(arch: Architecture, space: TokenSpace) -> LlamaForCausalLM:
    # Eager attention: torch's CPU flash-attention backward took a third of each step.
    return LlamaForCausalLM(llama_config(arch, len(space), attention="eager"))


def full_vocab_model(
    compact: LlamaForCausalLM, arch: Architecture, space: TokenSpace, seed: int
) -> LlamaForCausalLM:
    """The compact model with its embedding scattered back into the full vocabulary."""
    state = {name: tensor.detach().clone() for name, tensor in compact.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(FULL_VOCAB_SIZE, arch.hidden_size, generator=generator)
    embedding *= _UNSEEN_EMBEDDING_STD
    embedding[space.seen_ids] = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = embedding
    state["lm_head.weight"] = embedding
    model = LlamaForCausalLM(llama_config(arch, FULL_VOCAB_SIZE))
    model.load_state_dict(state)
    return model.eval()


def full_vocab_cross_entropy(
    seen_logits: torch.Tensor,
    targets: torch.Tensor,
    unseen_count: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over seen + unseen tokens, given logits of the seen tokens only.
    `mask` selects the positions that count (all when None)."""
    losses = full_vocab_token_losses(seen_logits, targets, unseen_count)
    return losses.mean() if mask is None else losses[mask].mean()


def full_vocab_token_losses(
    seen_logits: torch.Tensor, targets: torch.Tensor, unseen_count: int
) -> torch.Tensor:
    """Each position's cross-entropy over seen + unseen tokens, given the seen tokens' logits.

    The unseen tokens' logits are taken as 0: together they add unseen_count * e^0 to the
    softmax denominator, i.e. one extra logit log(unseen_count). Targets are never unseen.
    """
    unseen_log_mass = torch.tensor(float(unseen_count)).log()
    log_normaliser = torch.logaddexp(torch.logsumexp(seen_logits, dim=-1), unseen_log_mass)
    target_logits = seen_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return log_normaliser - target_logits


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seeded RNG, deterministic kernels and a fixed thread count, restored afterwards.

    Floating-point reduction order depends on the thread count; fixing it makes a build
    bit-for-bit reproducible on a given machine.
    """
    previous_threads = torch.get_num_threads()
    previous_mode = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # NaN-filling every new tensor is a debugging aid that doubled the step time here.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill
        torch.use_deterministic_algorithms(previous_mode[0], warn_only=previous_mode[1])
        torch.set_num_threads(previous_threads)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16). Elsewhere (AVX2
    CPUs such as AMD Zen 2 and 3) torch emulates bf16 matmuls: a base-large training step under
    bf16 autocast took 8.1 s instead of 0.26 s (fp32: 0.46-0.48 s) with oneDNN and torch's
    kernels held to AVX2 on an AMX Xeon."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    schedule: Schedule,
    unseen_count: int,
    progress: Progress,
    bf16: bool = True,
) -> float:
    """Train the model's trainable parameters for schedule.steps batches, its matmuls under bf16
    autocast where `bf16` (else fp32); returns the final loss."""
    model.train()
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, schedule.weight_decay),
        lr=schedule.learning_rate,
        betas=(0.9, 0.95),
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    progress.start(schedule.steps)
    for _, batch in zip(range(schedule.steps), batches, strict=False):
        loss = batch_loss(model, batch, unseen_count, bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        lr_schedule.step()
        progress.step_done(loss.item(), int(batch.loss_mask.sum()))
    model.eval()
    return progress.recent_loss()


def batch_loss(model: torch.nn.Module, batch: Batch, unseen_count: int, bf16: bool) -> torch.Tensor:
    """The batch's mean loss over the targets that count, computed piece by piece."""
    total = torch.zeros(())
    for piece in batch.pieces():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=piece.inputs, use_cache=False).logits
        losses = full_vocab_token_losses(logits.float(), piece.targets, unseen_count)
        total = total + losses[piece.loss_mask].sum()
    return total / batch.loss_mask.sum()


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    # Decay matrices (projections, embedding) only; norm gains stay free.
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


@dataclass
class Progress:
    """Training progress lines on stderr, at most one every few seconds."""

    label: str
    enabled: bool = True
    total_steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    started: float = 0.0
    last_report: float = 0.0

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[tandem kit] {self.label}: {message}", file=sys.stderr, flush=True)

    def start(self, total_steps: int) -> None:
        self.total_steps, self.tokens, self.losses = total_steps, 0, []
        self.started = self.last_report = time.monotonic()

    def step_done(self, loss: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        now = time.monotonic()
        finished = len(self.losses) == self.total_steps
        if now - self.last_report < _PROGRESS_INTERVAL_S and not finished:
            return
        self.last_report = now
        elapsed = now - self.started
        steps = len(self.losses)
        eta = elapsed / steps * (self.total_steps - steps)
        self.say(
            f"step {steps}/{self.total_steps}  loss {self.recent_loss():.3f}  "
            f"{self.tokens / elapsed:,.0f} tokens/s  ETA {eta:.0f}s"
        )

    def recent_loss(self) -> float:
        """Mean loss of the last 20 steps (a single step's loss is noisy)."""
        recent = self.losses[-20:]
        return sum(recent) / len(recent) if recent else float("nan")
