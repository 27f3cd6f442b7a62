"""A request's state inside the engine: its tokens, KV blocks, and where its prefill stands."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.awrs import ConstraintState
from engine.detokenizer import IncrementalDetokenizer
from engine.fusion import FusionState
from engine.lora import AdapterUse
from engine.prefix_cache import BlockDigests
from engine.stopping import StopStringMatcher
from engine.types import FinishReason, Request, TokenLogprob

if TYPE_CHECKING:
    from engine.smc import ParticleGroup


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request: Request
    token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None
    generator: torch.Generator | None
    # The request's LoRA adapters, resolved when it was added: a reference that outlives the
    # adapter's removal from the engine, so running requests finish with it.
    adapters: AdapterUse = ()
    # Its experts and their KV rows when it names experts (dynamic logit fusion).
    fusion: FusionState | None = None
    # Its grammar matcher when its output is constrained.
    constraint: ConstraintState | None = None
    # SMC: the particles of its request (this sequence is one of them).
    group: ParticleGroup | None = None
    max_tokens: int = 0  # prompt + output at most (the context, and the KV pools, hold it)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    # Prefix caching (engine.prefix_cache): its blocks' digests, or None where it takes and
    # offers no cached blocks; how many leading blocks of block_table the cache knows (taken
    # from it, or registered in the step that computes them); prompt tokens found cached at its
    # admission.
    prefix: BlockDigests | None = None
    num_cached_blocks: int = 0
    cached_prompt_tokens: int = 0
    finish_reason: FinishReason | None = None
    first_scheduled_time: float = 0.0
    first_token_time: float = 0.0
    # What the next RequestOutput reports (reset after each emission).
    pending_token_ids: list[int] = field(default_factory=list)
    pending_text: list[str] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_fusion_weights: list[tuple[float, ...]] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
