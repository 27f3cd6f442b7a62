"""The only server module that imports the engine (and so torch): loading and configuring it.

Everything else in server/ stays tensor-free and sees engines only through their interface.
"""

from __future__ import annotations

from engine.async_engine import AsyncEngine, EngineConfig
from server.config import EngineOptions, ModelSpec

BUILTIN_MODEL_ID = "builtin"
# EngineOptions fields that EngineConfig takes under the same name.
_SAME_NAME_OPTIONS = (
    "max_prompt_tokens",
    "max_new_tokens",
    "max_queue",
    "max_num_seqs",
    "max_batched_tokens",
    "block_size",
    "dtype",
)


def engine_config(options: EngineOptions) -> EngineConfig:
    values = {name: getattr(options, name) for name in _SAME_NAME_OPTIONS}
    if options.kv_cache_mb is not None:
        values["kv_cache_bytes"] = options.kv_cache_mb << 20
    return EngineConfig(**{name: value for name, value in values.items() if value is not None})


def load_engine(spec: ModelSpec, options: EngineOptions) -> AsyncEngine:
    """Blocking: reads the weights; run it in an executor."""
    return AsyncEngine.from_dir(spec.model_id, spec.path, engine_config(options))


def default_model_spec() -> ModelSpec:
    """The built-in model, built on first use (`tandem prepare` builds it ahead of time)."""
    # Imported here: only the no-`--model` path needs the builder and what it imports.
    from engine.builtin import default_model_dir

    # A fixed id: the directory's name carries a recipe hash that clients should not depend on.
    return ModelSpec(model_id=BUILTIN_MODEL_ID, path=default_model_dir())
