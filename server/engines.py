"""The only server module that imports the engine (and so torch): loading and configuring it.

Everything else in server/ stays tensor-free and sees engines only through their interface.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.async_engine import AsyncEngine, EngineConfig
from server.config import AdapterSpec, EngineOptions, ModelSpec

# The kit member served when no --model is given (its id too).
DEFAULT_KIT_MODEL = "base-large"
# Kit members that are PEFT adapters for it, served under their directory names.
KIT_ADAPTER_PREFIX = "lora-"
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
    if options.adapter_slots is None and options.adapter_host_cache is not None:
        # A host cache smaller than the default slots: as many slots as it holds.
        values["adapter_slots"] = min(EngineConfig.adapter_slots, options.adapter_host_cache)
    return EngineConfig(**{name: value for name, value in values.items() if value is not None})


def load_engine(spec: ModelSpec, options: EngineOptions) -> AsyncEngine:
    """Blocking: reads the weights; run it in an executor."""
    return AsyncEngine.from_dir(spec.model_id, spec.path, engine_config(options))


def default_model_spec() -> ModelSpec:
    """The kit's base-large, the kit built on first use (`tandem prepare` builds it ahead)."""
    return default_serving()[0]


def default_serving() -> tuple[ModelSpec, tuple[AdapterSpec, ...]]:
    """What `tandem serve` serves without --model: the kit's base-large and its adapters; the
    kit is built on first use (blocking, minutes)."""
    # Imported here: only the no-`--model` path needs the builder and what it imports.
    from kit.build import default_kit_dir

    return kit_serving(default_kit_dir())


def kit_serving(kit_dir: str | os.PathLike[str]) -> tuple[ModelSpec, tuple[AdapterSpec, ...]]:
    """The kit's base-large, and every `lora-*` directory of the kit as an adapter of it
    named after the directory (e.g. `lora-add`)."""
    from kit.build import KitPaths

    kit = KitPaths.open(kit_dir)
    model = ModelSpec(model_id=DEFAULT_KIT_MODEL, path=str(kit.member(DEFAULT_KIT_MODEL)))
    adapters = tuple(
        AdapterSpec(adapter_id=path.name, path=str(path), model=DEFAULT_KIT_MODEL)
        for path in sorted(Path(kit.root).iterdir())
        if path.name.startswith(KIT_ADAPTER_PREFIX) and path.is_dir()
    )
    return model, adapters
