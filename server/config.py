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
class AdapterSpec:
    """A LoRA adapter to load at start; an empty model means the only model served."""

    adapter_id: str
    path: str
    model: str = ""


def parse_adapter_spec(value: str) -> AdapterSpec:
    """`[MODEL:]ID=DIR`."""
    name, sep, path = value.partition("=")
    model, _, adapter_id = name.rpartition(":")
    if not sep or not adapter_id or not path or os.sep in name:
        raise ValueError(f"cannot read adapter {value!r}; expected [MODEL:]ID=DIR")
    return AdapterSpec(adapter_id=adapter_id, path=path, model=model)


@dataclass(frozen=True)
class ExpertSpec:
    """A small expert to load at start: a full model or a PEFT adapter directory, and the small
    base it was tuned from; an empty model means the only model served."""

    expert_id: str
    path: str
    small_base: str
    model: str = ""


def parse_expert_spec(value: str) -> ExpertSpec:
    """`[MODEL:]ID=DIR@SMALL_BASE_DIR`; the last `@` separates the two directories."""
    name, sep, paths = value.partition("=")
    model, _, expert_id = name.rpartition(":")
    path, at, small_base = paths.rpartition("@")
    if not sep or not at or not expert_id or not path or not small_base or os.sep in name:
        raise ValueError(f"cannot read expert {value!r}; expected [MODEL:]ID=DIR@SMALL_BASE_DIR")
    return ExpertSpec(expert_id=expert_id, path=path, small_base=small_base, model=model)


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings given on the command line; None keeps the engine's default."""

    kv_cache_mb: int | None = None
    expert_kv_cache_mb: int | None = None
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    max_queue: int | None = None
    max_num_seqs: int | None = None
    max_batched_tokens: int | None = None
    block_size: int | None = None
    dtype: str | None = None
    adapter_slots: int | None = None
    adapter_host_cache: int | None = None

    def __post_init__(self) -> None:
        slots, cache = self.adapter_slots, self.adapter_host_cache
        if slots is not None and slots < 1:
            raise ValueError(f"--adapter-slots must be at least 1, got {slots}")
        if cache is not None and cache < (slots or 1):
            raise ValueError(
                f"--adapter-host-cache ({cache}) must be at least --adapter-slots ({slots or 1})"
            )


@dataclass(frozen=True)
class ServerConfig:
    # Empty: serve the model kit's base-large with its adapters and experts.
    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (logged as "listening on host:port")
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    drain_timeout_s: float = 30.0
    engine: EngineOptions = field(default_factory=EngineOptions)
    warmup_delay_s: float = 0.0
    adapters: tuple[AdapterSpec, ...] = ()  # loaded at start, after the models
    experts: tuple[ExpertSpec, ...] = ()  # loaded at start, after the adapters
    merged_adapter_dir: str | None = None  # where MergeAdapters writes; None: the default


def default_merged_adapter_dir() -> str:
    """`$TANDEM_HOME/adapters`, or `~/.cache/tandem/adapters` without TANDEM_HOME."""
    home = os.environ.get("TANDEM_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "tandem"
    )
    return os.path.join(home, "adapters")


def warmup_delay_from_env() -> float:
    raw = os.environ.get(WARMUP_DELAY_ENV, "")
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{WARMUP_DELAY_ENV} must be a number of seconds, got {raw!r}") from None
