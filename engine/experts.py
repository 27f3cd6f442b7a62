"""The experts an engine serves for dynamic logit fusion, and the small bases they share.

An expert is a small model tuned for a task: a full model directory, or a PEFT LoRA adapter on
its small base (the model it was tuned from, the anti-expert). Each small base is loaded once
per directory and owns a paged KV pool that its own rows and its experts' rows share: a fused
sequence has one row for the small base and one per expert, each with its block table there.

Experts must speak the large model's tokenizer: the vocabularies are compared at load time;
logit rows are cut to the smallest width of the models (padding rows differ, tokens do not).

Threads: `load` reads files (callers run it in an executor); the step thread calls `hold` and
`release`, which never touch the disk. One lock guards the maps.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.kv_cache import BlockAllocator, KVCache
from engine.lora import AdapterStacks, LoraAdapter, load_adapter
from engine.model import CausalLM
from engine.tokenizer import Tokenizer
from engine.types import (
    AdapterError,
    AlreadyExists,
    ExpertError,
    ExpertInfo,
    InvalidRequest,
    NotFound,
    UnsupportedModel,
)

ExpertRefs = Sequence[tuple[str, float | None]]


class SmallBase:
    """A small model, its KV pool, and the LoRA stacks of the experts that are adapters on it."""

    def __init__(self, path: str, model: CausalLM, kv_bytes: int, block_size: int) -> None:
        self.path = path
        self.model = model
        c = model.config
        per_block = KVCache.bytes_per_block(
            c.num_layers, block_size, c.num_kv_heads, c.head_dim, model.dtype
        )
        self.num_blocks = max(1, kv_bytes // per_block)
        self.kv = model.new_kv_cache(self.num_blocks, block_size)
        self.allocator = BlockAllocator(self.num_blocks)
        self.stacks = AdapterStacks(c, model.weights.embed.device, model.dtype)


@dataclass(eq=False)
class Expert:
    expert_id: str
    path: str
    small_base: SmallBase
    model: CausalLM | None  # a full model expert (it runs its own forward) ...
    adapter: LoraAdapter | None  # ... or a LoRA adapter: rows of the small base's forward
    vocab_size: int  # logits shared by the large model, the small base and this expert
    num_requests: int = 0

    def info(self) -> ExpertInfo:
        return ExpertInfo(
            expert_id=self.expert_id,
            path=self.path,
            small_base=self.small_base.path,
            is_adapter=self.adapter is not None,
            num_requests=self.num_requests,
        )


class ExpertRegistry:
    def __init__(
        self,
        large: ModelConfig,
        tokenizer: Tokenizer,
        dtype: torch.dtype,
        kv_bytes: int,
        block_size: int,
    ) -> None:
        self.large = large
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.kv_bytes = kv_bytes
        self.block_size = block_size
        self._lock = threading.Lock()
        self._experts: dict[str, Expert] = {}
        self._small_bases: dict[str, SmallBase] = {}  # by real path
        self._vocab: dict[str, int] | None = None  # the large tokenizer's, computed once

    # ---- registration -------------------------------------------------------------------------

    def load(self, expert_id: str, path: str | Path, small_base: str | Path) -> ExpertInfo:
        """Read and validate an expert (and its small base, unless already loaded) and register
        it (blocking: reads files)."""
        with self._lock:
            self._check_new(expert_id)  # fail before reading files when we can
        base = self._small_base(str(small_base))
        path = str(path)
        _check_dir(path, "expert")
        if (Path(path) / "adapter_config.json").is_file():
            model, adapter = None, self._read_adapter(path, base)
            vocab = base.model.config.vocab_size
        else:
            model, adapter = self._read_full(path, base), None
            vocab = model.config.vocab_size
        expert = Expert(
            expert_id=expert_id,
            path=path,
            small_base=base,
            model=model,
            adapter=adapter,
            vocab_size=min(vocab, base.model.config.vocab_size, self.large.vocab_size),
        )
        with self._lock:
            self._check_new(expert_id)
            base = self._small_bases.setdefault(_key(base.path), base)
            expert.small_base = base
            self._experts[expert_id] = expert
            return expert.info()

    def remove(self, expert_id: str) -> None:
        with self._lock:
            expert = self._experts.pop(expert_id, None)
            if expert is None:
                raise NotFound(f"unknown expert {expert_id!r}")
            # Running requests keep their small base alive; new experts load it afresh.
            if not any(e.small_base is expert.small_base for e in self._experts.values()):
                self._small_bases.pop(_key(expert.small_base.path), None)

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._experts)

    def infos(self) -> list[ExpertInfo]:
        with self._lock:
            return [self._experts[i].info() for i in sorted(self._experts)]

    # ---- requests -----------------------------------------------------------------------------

    def check(self, refs: ExpertRefs) -> tuple[Expert, ...]:
        """The experts of `refs` (not held); NotFound for an unknown id, InvalidRequest for a
        repeated id, a weight that is not finite, or experts of different small bases."""
        with self._lock:
            return self._lookup(refs)

    def hold(self, refs: ExpertRefs) -> tuple[Expert, ...]:
        """The request's experts, counted as in use until `release`."""
        with self._lock:
            experts = self._lookup(refs)
            for expert in experts:
                expert.num_requests += 1
            return experts

    def release(self, experts: Sequence[Expert]) -> None:
        with self._lock:
            for expert in experts:
                expert.num_requests -= 1

    def _lookup(self, refs: ExpertRefs) -> tuple[Expert, ...]:
        ids = [expert_id for expert_id, _ in refs]
        if len(set(ids)) != len(ids):
            raise InvalidRequest("an expert is named twice")
        for expert_id, weight in refs:
            if weight is not None and not math.isfinite(weight):
                raise InvalidRequest(f"the weight of expert {expert_id!r} is not finite")
        unknown = [i for i in ids if i not in self._experts]
        if unknown:
            known = ", ".join(sorted(self._experts)) or "none"
            raise NotFound(f"unknown expert {unknown[0]!r}; loaded: {known}")
        experts = tuple(self._experts[i] for i in ids)
        if len({id(e.small_base) for e in experts}) > 1:
            raise InvalidRequest("the experts of one request must share one small base")
        return experts

    # ---- loading ------------------------------------------------------------------------------

    def _check_new(self, expert_id: str) -> None:
        if not expert_id:
            raise InvalidRequest("the expert id is empty")
        if expert_id in self._experts:
            raise AlreadyExists(f"expert {expert_id!r} is already loaded")

    def _small_base(self, path: str) -> SmallBase:
        with self._lock:
            base = self._small_bases.get(_key(path))
        if base is not None:
            return base
        _check_dir(path, "small base")
        self._check_tokenizer(path, "small base", required=True)
        model = _read_model(path, self.dtype, "small base")
        self._check_vocab_size(model.config, path)
        return SmallBase(path, model, self.kv_bytes, self.block_size)

    def _read_full(self, path: str, base: SmallBase) -> CausalLM:
        self._check_tokenizer(path, "expert", required=False)
        model = _read_model(path, self.dtype, "expert")
        mine, theirs = _kv_shape(model.config), _kv_shape(base.model.config)
        if mine != theirs:
            raise ExpertError(
                f"expert {path} has layers/kv heads/head dim {mine}, its small base "
                f"{base.path} has {theirs}: an expert must have its small base's shape"
            )
        self._check_vocab_size(model.config, path)
        return model

    def _read_adapter(self, path: str, base: SmallBase) -> LoraAdapter:
        try:
            return load_adapter(path, base.model.config, base.model.dtype)
        except AdapterError as error:
            raise ExpertError(f"expert {path}: {error}", error.kind) from error

    def _check_tokenizer(self, path: str, what: str, required: bool) -> None:
        """Refuse a model whose tokenizer maps any token to another id than the large model's."""
        if not (Path(path) / "tokenizer.json").is_file():
            if required:
                raise ExpertError(f"{what} {path} has no tokenizer.json to compare", "not_found")
            return
        if self._vocab is None:
            self._vocab = self.tokenizer.backend.get_vocab(with_added_tokens=True)
        theirs = Tokenizer.from_dir(path).backend.get_vocab(with_added_tokens=True)
        if theirs != self._vocab:
            differ = len(theirs.items() ^ self._vocab.items())
            raise ExpertError(
                f"the tokenizer of {what} {path} differs from the model's ({len(theirs)} vs "
                f"{len(self._vocab)} tokens, {differ} entries differ): experts and their small "
                f"base must use the large model's vocabulary"
            )

    def _check_vocab_size(self, config: ModelConfig, path: str) -> None:
        """Every real token needs a logit in every model; only padding rows may be cut."""
        if config.vocab_size < self.tokenizer.vocab_size:
            raise ExpertError(
                f"{path} has {config.vocab_size} logits, fewer than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens"
            )


def _key(path: str) -> str:
    return os.path.realpath(path)


def _check_dir(path: str, what: str) -> None:
    if not Path(path).is_dir():
        raise ExpertError(f"{what} directory {path} does not exist", "not_found")


def _read_model(path: str, dtype: torch.dtype, what: str) -> CausalLM:
    try:
        return CausalLM.from_dir(path, dtype=dtype)
    except UnsupportedModel as error:
        raise ExpertError(f"{what} {path}: {error}") from error
    except FileNotFoundError as error:
        raise ExpertError(f"{what} {path}: {error}", "not_found") from error


def _kv_shape(config: ModelConfig) -> tuple[int, int, int]:
    return (config.num_layers, config.num_kv_heads, config.head_dim)
