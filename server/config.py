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


SPARSITY_RULES = ("wina", "teal")
SPARSITY_MODES = ("top-k", "threshold")


@dataclass(frozen=True)
class SparsitySpec:
    """Sparse activation asked for on the command line, for one model (`model`) or, with an
    empty `model`, for every model that names none of its own; None fields are unset."""

    model: str = ""
    sparsity: float | None = None
    rule: str | None = None
    mode: str | None = None
    file: str | None = None

    def merged_over(self, general: SparsitySpec | None) -> SparsitySpec:
        """This model's fields, the general ones where this model sets none."""
        if general is None:
            return self
        values = {
            name: getattr(general, name) if getattr(self, name) is None else getattr(self, name)
            for name in ("sparsity", "rule", "mode", "file")
        }
        return SparsitySpec(model=self.model, **values)

    def check(self) -> None:
        """ValueError for a combination that cannot run."""
        where = f" for model {self.model}" if self.model else ""
        if self.sparsity is None:
            if self.file or self.rule or self.mode:
                raise ValueError(f"--sparsity-file/-rule/-mode{where} need --sparsity")
            return
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"--sparsity{where} must be in [0, 1), got {self.sparsity}")
        if self.rule is not None and self.rule not in SPARSITY_RULES:
            raise ValueError(f"--sparsity-rule{where}: one of {', '.join(SPARSITY_RULES)}")
        if self.mode is not None and self.mode not in SPARSITY_MODES:
            raise ValueError(f"--sparsity-mode{where}: one of {', '.join(SPARSITY_MODES)}")
        if self.mode == "threshold" and not self.file:
            raise ValueError(f"--sparsity-mode threshold{where} needs --sparsity-file")


def _model_and_value(value: str) -> tuple[str, str]:
    """`[MODEL=]VALUE`: a name before `=` without a path separator names a model."""
    name, sep, rest = value.partition("=")
    if sep and name and os.sep not in name:
        return name, rest
    return "", value


def parse_sparsity_specs(
    sparsity: list[str], files: list[str], rules: list[str], modes: list[str]
) -> tuple[SparsitySpec, ...]:
    """The `--sparsity`, `--sparsity-file`, `--sparsity-rule` and `--sparsity-mode` values
    (each `[MODEL=]VALUE`), one merged and checked spec per model named (and one general)."""
    fields: dict[str, dict[str, object]] = {}
    for name, values in (("sparsity", sparsity), ("file", files), ("rule", rules), ("mode", modes)):
        for value in values:
            model, raw = _model_and_value(value)
            parsed: object = raw
            if name == "sparsity":
                try:
                    parsed = float(raw)
                except ValueError:
                    raise ValueError(f"--sparsity {value!r}: expected [MODEL=]FRACTION") from None
            fields.setdefault(model, {})[name] = parsed
    general = SparsitySpec(**fields[""]) if "" in fields else None
    specs = [SparsitySpec(model=m, **f).merged_over(general) for m, f in fields.items() if m]
    if general is not None:
        specs.insert(0, general)
    for spec in specs:
        # General fields without a general --sparsity may be there for the models that name
        # their own (`--sparsity a=0.4 --sparsity-file F`).
        if spec.model or spec.sparsity is not None or len(specs) == 1:
            spec.check()
    return tuple(specs)


def sparsity_for(specs: tuple[SparsitySpec, ...], model_id: str) -> SparsitySpec | None:
    """The spec that applies to `model_id`: its own, else the general one, else None."""
    by_model = {spec.model: spec for spec in specs}
    spec = by_model.get(model_id) or by_model.get("")
    return spec if spec is not None and spec.sparsity is not None else None


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
    batch_wait_ms: float | None = None
    block_size: int | None = None
    dtype: str | None = None
    adapter_slots: int | None = None
    adapter_host_cache: int | None = None
    prefix_caching: bool = True
    # Sparse activation per model (SparsitySpec.model) and for all (model ""): off when empty.
    sparsity: tuple[SparsitySpec, ...] = ()
    # Each engine in a process of its own (its stepping thread then never waits for the GIL
    # that the event loop holds while it writes); False runs it on a thread of the server's.
    own_process: bool = True

    def __post_init__(self) -> None:
        if self.batch_wait_ms is not None and not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"--batch-wait-ms must be within 0-1000, got {self.batch_wait_ms}")
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
    # Tokens per streamed delta after the first one (which goes at once, and so does the last).
    stream_interval: int = 1
    engine: EngineOptions = field(default_factory=EngineOptions)
    warmup_delay_s: float = 0.0
    adapters: tuple[AdapterSpec, ...] = ()  # loaded at start, after the models
    experts: tuple[ExpertSpec, ...] = ()  # loaded at start, after the adapters
    merged_adapter_dir: str | None = None  # where MergeAdapters writes; None: the default

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be at least 1, got {self.stream_interval}")


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
