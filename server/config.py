"""What `tandem serve` was asked to do, parsed from the command line; no engine, no grpc."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Seconds to sleep before each model's warm-up. Tests set it to observe health NOT_SERVING
# while warm-up runs; leave it unset in production.
WARMUP_DELAY_ENV = "TANDEM_WARMUP_DELAY_S"


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    path: str


def parse_model_spec(value: str) -> ModelSpec:
    """`DIR` (the id is the directory's base name) or `NAME=DIR`."""
    name, sep, path = value.partition("=")
    if sep and name and os.sep not in name:
        return ModelSpec(model_id=name, path=path)
    path = value
    model_id = os.path.basename(os.path.normpath(path))
    if not model_id or model_id in (".", ".."):
        raise ValueError(f"cannot name a model after {value!r}; use NAME=DIR")
    return ModelSpec(model_id=model_id, path=path)


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings given on the command line; None keeps the engine's default."""

    kv_cache_mb: int | None = None
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    max_queue: int | None = None
    max_num_seqs: int | None = None
    max_batched_tokens: int | None = None
    block_size: int | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[ModelSpec, ...]  # empty: serve the built-in default model
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (logged as "listening on host:port")
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    drain_timeout_s: float = 30.0
    engine: EngineOptions = field(default_factory=EngineOptions)
    warmup_delay_s: float = 0.0


def warmup_delay_from_env() -> float:
    raw = os.environ.get(WARMUP_DELAY_ENV, "")
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{WARMUP_DELAY_ENV} must be a number of seconds, got {raw!r}") from None
