"""The only server module that imports the engine (and so torch): loading and configuring it.

Everything else in server/ stays tensor-free and sees engines only through their interface.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.async_engine import AsyncEngine, EngineConfig
from server.config import AdapterSpec, EngineOptions, ExpertSpec, ModelSpec

# The kit member served when no --model is given (its id too).
DEFAULT_KIT_MODEL = "base-large"
# Kit members that are PEFT adapters for it, served under their directory names.
KIT_ADAPTER_PREFIX = "lora-"
# Kit members that are small experts (full fine-tunes of the small base), likewise.
KIT_EXPERT_PREFIX = "expert-"
# The small model the kit's experts were tuned from: their anti-expert.
KIT_SMALL_BASE = "base-small"
# EngineOptions fields that EngineConfig takes under the same name.
_SAME_NAME_OPTIONS = (
    "max_prompt_tokens",
    "max_new_tokens",
    "max_queue",
    "max_num_seqs",
    "max_batched_tokens",
    "block_size",
    "dtype",
    "adapter_slots",
    "adapter_host_cache",
)


def engine_config(options: EngineOptions) -> EngineConfig:
    values = {name: getattr(options, name) for name in _SAME_NAME_OPTIONS}
    if options.kv_cache_mb is not None:
        values["kv_cache_bytes"] = options.kv_cache_mb << 20
    if options.expert_kv_cache_mb is not None:
        values["expert_kv_cache_bytes"] = options.expert_kv_cache_mb << 20
    if options.adapter_slots is None and options.adapter_host_cache is not None:
        # A host cache smaller than the default slots: as many slots as it holds.
        values["adapter_slots"] = min(EngineConfig.adapter_slots, options.adapter_host_cache)
    return EngineConfig(**{name: value for name, value in values.items() if value is not None})


def load_engine(spec: ModelSpec, options: EngineOptions) -> AsyncEngine:
    """Blocking: reads the weights; run it in an executor."""
    return AsyncEngine.from_dir(spec.model_id, spec.path, engine_config(options))


@dataclass(frozen=True)
class Serving:
    """A model with the adapters and experts to load on it at start."""

    model: ModelSpec
    adapters: tuple[AdapterSpec, ...] = ()
    experts: tuple[ExpertSpec, ...] = ()


def default_model_spec() -> ModelSpec:
    """The kit's base-large, the kit built on first use (`tandem prepare` builds it ahead)."""
    return default_serving().model


def default_serving() -> Serving:
    """What `tandem serve` serves without --model: the kit's base-large, its adapters and its
    experts; the kit is built on first use (blocking, minutes)."""
    # Imported here: only the no-`--model` path needs the builder and what it imports.
    from kit.build import default_kit_dir

    return kit_serving(default_kit_dir())


def kit_serving(kit_dir: str | os.PathLike[str]) -> Serving:
    """The kit's base-large; every `lora-*` directory of the kit as an adapter of it, and every
    `expert-*` directory as an expert of it on the kit's base-small, each named after its
    directory (e.g. `lora-add`, `expert-add`)."""
    from kit.build import KitPaths

    kit = KitPaths.open(kit_dir)
    model = ModelSpec(model_id=DEFAULT_KIT_MODEL, path=str(kit.member(DEFAULT_KIT_MODEL)))
    members = [path for path in sorted(Path(kit.root).iterdir()) if path.is_dir()]
    adapters = tuple(
        AdapterSpec(adapter_id=path.name, path=str(path), model=DEFAULT_KIT_MODEL)
        for path in members
        if path.name.startswith(KIT_ADAPTER_PREFIX)
    )
    expert_dirs = [path for path in members if path.name.startswith(KIT_EXPERT_PREFIX)]
    # Looked up only when there are experts: a kit without them needs no small base.
    small_base = str(kit.member(KIT_SMALL_BASE)) if expert_dirs else ""
    experts = tuple(
        ExpertSpec(
            expert_id=path.name, path=str(path), small_base=small_base, model=DEFAULT_KIT_MODEL
        )
        for path in expert_dirs
    )
    return Serving(model=model, adapters=adapters, experts=experts)
