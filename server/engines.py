"""The only server module that loads engines: in a process of their own (the server then never
imports torch) or, with --engine-in-process, on a thread of the server's.

Everything else in server/ stays tensor-free and sees engines only through their interface.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.engine_process import EngineProcess
from engine.types import EngineConfig, SparsitySettings
from server.config import (
    AdapterSpec,
    EngineOptions,
    ExpertSpec,
    ModelSpec,
    SparsitySpec,
    sparsity_for,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine

    # What the server holds per model: the same interface either way.
    ServedEngine = AsyncEngine | EngineProcess

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
    "prefix_caching",
)


def engine_config(options: EngineOptions) -> EngineConfig:
    values = {name: getattr(options, name) for name in _SAME_NAME_OPTIONS}
    if options.batch_wait_ms is not None:
        values["batch_wait_s"] = options.batch_wait_ms / 1000
    if options.kv_cache_mb is not None:
        values["kv_cache_bytes"] = options.kv_cache_mb << 20
    if options.expert_kv_cache_mb is not None:
        values["expert_kv_cache_bytes"] = options.expert_kv_cache_mb << 20
    if options.adapter_slots is None and options.adapter_host_cache is not None:
        # A host cache smaller than the default slots: as many slots as it holds.
        values["adapter_slots"] = min(EngineConfig.adapter_slots, options.adapter_host_cache)
    return EngineConfig(**{name: value for name, value in values.items() if value is not None})


def load_engine(spec: ModelSpec, options: EngineOptions) -> ServedEngine:
    """Blocking: reads the weights (and the sparsity file); run it in an executor."""
    config = engine_config(options)
    sparsity = sparsity_for(options.sparsity, spec.model_id)
    settings = sparsity_settings(sparsity) if sparsity is not None else None
    if options.own_process:
        return EngineProcess.spawn(spec.model_id, spec.path, config, settings)
    # Imported here: only an engine in this process needs the model code (and torch).
    from engine.async_engine import AsyncEngine

    return AsyncEngine.from_dir(spec.model_id, spec.path, config, settings)


def sparsity_settings(spec: SparsitySpec) -> SparsitySettings:
    """The engine's settings for a checked spec; unset fields take the defaults (WINA, top-k)."""
    assert spec.sparsity is not None
    defaults = SparsitySettings(spec.sparsity)
    return SparsitySettings(
        sparsity=spec.sparsity,
        rule=spec.rule or defaults.rule,
        mode=spec.mode or defaults.mode,
        calibration_file=os.path.abspath(spec.file) if spec.file else "",
    )


# Calibration text when none is given: the kit's general corpus, its pretraining stream.
_KIT_CORPUS_SEED = 0


def calibrate_to_file(
    model_dir: str,
    out: str,
    *,
    tokens: int = 8192,
    seq_len: int = 256,
    text_file: str | None = None,
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """`tandem calibrate`: write the sparsity sidecar of the model at `model_dir`; returns its
    header (what was calibrated on what)."""
    from engine.sparsity import calibrate_dir

    documents, source = _calibration_documents(text_file)
    calibration = calibrate_dir(
        model_dir,
        out,
        documents,
        source,
        tokens=tokens,
        seq_len=seq_len,
        dtype=dtype,
        progress=progress,
    )
    return calibration.header


def _calibration_documents(text_file: str | None) -> tuple[Iterable[str], str]:
    """Documents and where they come from: the file's paragraphs (blank-line separated), or
    the kit's general corpus."""
    if text_file:
        with open(text_file, encoding="utf-8") as f:
            paragraphs = [p.strip() for p in f.read().split("\n\n")]
        return [p for p in paragraphs if p], os.path.abspath(text_file)
    from kit import corpus

    return corpus.iter_documents(_KIT_CORPUS_SEED), f"kit corpus (seed {_KIT_CORPUS_SEED})"


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
    return kit_serving(_default_kit_dir())


def _default_kit_dir() -> str:
    """The kit's directory, built first if needed, found by a child process: the kit's builder
    imports torch, which this process (the server's, whose engines run in processes of their
    own) then never loads. The build's progress goes to stderr."""
    found = subprocess.run(
        [sys.executable, "-c", "from kit.build import default_kit_dir; print(default_kit_dir())"],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        raise OSError(f"the model kit could not be built (exit code {found.returncode})")
    return found.stdout.strip().splitlines()[-1]


def kit_serving(kit_dir: str | os.PathLike[str]) -> Serving:
    """The kit's base-large; every `lora-*` directory of the kit as an adapter of it, and every
    `expert-*` directory as an expert of it on the kit's base-small, each named after its
    directory (e.g. `lora-add`, `expert-add`)."""
    root = Path(kit_dir)
    model = ModelSpec(model_id=DEFAULT_KIT_MODEL, path=str(_kit_member(root, DEFAULT_KIT_MODEL)))
    members = [path for path in sorted(root.iterdir()) if path.is_dir()]
    adapters = tuple(
        AdapterSpec(adapter_id=path.name, path=str(path), model=DEFAULT_KIT_MODEL)
        for path in members
        if path.name.startswith(KIT_ADAPTER_PREFIX)
    )
    expert_dirs = [path for path in members if path.name.startswith(KIT_EXPERT_PREFIX)]
    # Looked up only when there are experts: a kit without them needs no small base.
    small_base = str(_kit_member(root, KIT_SMALL_BASE)) if expert_dirs else ""
    experts = tuple(
        ExpertSpec(
            expert_id=path.name, path=str(path), small_base=small_base, model=DEFAULT_KIT_MODEL
        )
        for path in expert_dirs
    )
    return Serving(model=model, adapters=adapters, experts=experts)


def _kit_member(root: Path, name: str) -> Path:
    """(kit.build.KitPaths.member without importing the kit's builder, which imports torch.)"""
    path = root / name
    if not path.is_dir():
        raise FileNotFoundError(f"the kit at {root} has no {name}")
    return path
