"""Training-free sparse activation (WINA, TEAL): what to skip, calibrated how, stored where.

Each projection group of a layer reads one input x [T, K]: `qkv` (q/k/v share it), `o`,
`gate_up` (gate/up share it) and `down`. Per token, input channel j is kept when its score
reaches the group's threshold; the score is |x_j| * ||W[:, j]||_2 (WINA, W the group's fused
weight [N, K]) or |x_j| (TEAL). The LM head and the embeddings stay dense.

Modes:
- top-k: each token keeps its K - round(s * K) best channels, so exactly round(s * K) of every
  group's K channels are skipped (more are kept only on exact ties);
- threshold: a calibrated constant per layer, group and rule: the s-quantile of the scores over
  calibration tokens (TEAL's recipe), so on calibration-like text a fraction s is skipped on
  average and each token skips more or less as its activations are spread.

The sidecar (`tandem calibrate`) is a real safetensors file: per layer and group the column
norms (float32 [K]) and the score quantiles of both rules at QUANTILE_LEVELS, with a small JSON
header in the safetensors metadata (model shape, calibration text, token count). One file serves
every target sparsity, rule and mode: thresholds are read off the quantiles at load time.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.types import (
    SPARSITY_RULES as RULES,
)
from engine.types import (
    SparsityError,
    SparsitySettings,
)
from kernels.sparse import channel_scores, input_top_k_thresholds, top_k_thresholds

if TYPE_CHECKING:
    from engine.loader import LayerWeights, ModelWeights
    from engine.model import CausalLM

GROUPS = ("qkv", "o", "gate_up", "down")
FORMAT = "tandem-sparsity"
FORMAT_VERSION = 1
_HEADER_KEY = "tandem_sparsity"
# Quantile levels stored in the sidecar: every half percent, interpolated in between.
QUANTILE_STEPS = 200
# Score histograms of calibration: log2 bins, 1/85 of an octave wide (0.8% relative error).
_LOG2_LOW, _LOG2_HIGH, _BINS = -32.0, 16.0, 4096
# The sidecar's column norms may differ from the weights' by rounding (bf16 weights against a
# float32 calibration) but not more: more means the file belongs to other weights.
_NORM_TOLERANCE = 0.05
# Rows of each forward pass whose scores calibration records (a strided sample).
_OBSERVED_ROWS = 1024


@dataclass(frozen=True, eq=False)
class GroupPlan:
    """One projection group of one layer: how each token's threshold is found."""

    col_norms: torch.Tensor | None  # float32 [K] for WINA, on the weights' device; TEAL: None
    keep: int | None = None  # top-k: channels kept per token
    threshold: float | None = None  # threshold mode: the calibrated score threshold
    device: torch.device | str = "cpu"
    # The threshold as the kernels take it, made once: a decode step is many small calls.
    _threshold_row: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.threshold is not None:
            row = torch.tensor([self.threshold], dtype=torch.float32, device=self.device)
            object.__setattr__(self, "_threshold_row", row)

    def kernel_args(self, in_features: int) -> tuple[torch.Tensor | None, int, torch.Tensor | None]:
        """(column norms, keep, threshold) as kernels.cpu_decode's one-call step takes them:
        top-k keeping some but not all channels as keep; otherwise a threshold (fp32 [1]),
        -inf where top-k keeps every channel and +inf where it keeps none, as
        kernels.sparse.top_k_thresholds_ref makes them."""
        norms = None if self.col_norms is None else self.col_norms.float().contiguous()
        if self.keep is None:
            return norms, 0, self._threshold_row
        if 0 < self.keep < in_features:
            return norms, self.keep, None
        bound = -math.inf if self.keep >= in_features else math.inf
        return norms, 0, torch.tensor([bound], dtype=torch.float32, device=self.device)

    def thresholds(self, x: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """float32 [T] per token of the input x (top-k; from `scores`, x's channel_scores, when
        the caller has them), or [1] for every token (threshold mode, x and scores unused)."""
        if self.keep is None:
            assert self._threshold_row is not None
            return self._threshold_row
        if scores is None:
            return input_top_k_thresholds(x, self.col_norms, self.keep)
        return top_k_thresholds(scores, self.keep)


@dataclass(frozen=True, eq=False)
class SparsityPlan:
    """Settings and, per layer, the plan of each projection group."""

    settings: SparsitySettings
    layers: tuple[Mapping[str, GroupPlan], ...]

    @property
    def active(self) -> bool:
        """At sparsity 0 nothing is skipped: the model runs its dense path, bit for bit."""
        return self.settings.sparsity > 0.0


@dataclass
class SkipCounter:
    """Skipped and total input channels per group, over every token of every forward pass."""

    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))

    def add(self, group: str, keep: torch.Tensor) -> None:
        self.skipped[group] += int(keep.numel() - keep.sum())
        self.total[group] += keep.numel()

    def fraction(self, group: str | None = None) -> float:
        groups = GROUPS if group is None else (group,)
        total = sum(self.total[g] for g in groups)
        return sum(self.skipped[g] for g in groups) / total if total else 0.0


# ---- shapes and column norms ------------------------------------------------------------------


def group_in_features(config: ModelConfig) -> dict[str, int]:
    return {
        "qkv": config.hidden_size,
        "o": config.q_size,
        "gate_up": config.hidden_size,
        "down": config.intermediate_size,
    }


def group_weight(layer: LayerWeights, group: str) -> torch.Tensor:
    """The group's fused weight [N, K] (a transposed view once the model runs sparse)."""
    return getattr(layer, group)


def column_norms(layer: LayerWeights) -> dict[str, torch.Tensor]:
    """float32 [K] per group: ||W[:, j]||_2 over the fused rows (q/k/v, gate/up together,
    since they share one mask)."""
    return {
        group: torch.linalg.vector_norm(group_weight(layer, group), dim=0, dtype=torch.float32)
        for group in GROUPS
    }


def keep_count(in_features: int, sparsity: float) -> int:
    """Channels kept per token in top-k mode: round(s * K) skipped."""
    return in_features - round(sparsity * in_features)


# ---- the sidecar ------------------------------------------------------------------------------


def quantile_levels() -> torch.Tensor:
    return torch.linspace(0.0, 1.0, QUANTILE_STEPS + 1, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class Calibration:
    """The sidecar's content: column norms and score quantiles per layer and group."""

    col_norms: tuple[dict[str, torch.Tensor], ...]  # per layer, group -> float32 [K]
    quantiles: dict[str, tuple[dict[str, torch.Tensor], ...]]  # rule -> per layer -> [Q + 1]
    header: dict[str, object]

    def threshold(self, rule: str, layer: int, group: str, sparsity: float) -> float:
        """The score below which a fraction `sparsity` of calibration scores fell,
        interpolated geometrically between the stored quantile levels."""
        values = self.quantiles[rule][layer][group].double()
        position = sparsity * (values.numel() - 1)
        low = min(int(position), values.numel() - 2)
        weight = position - low
        a, b = values[low].clamp_min(1e-30), values[low + 1].clamp_min(1e-30)
        return float(torch.exp(torch.log(a) * (1 - weight) + torch.log(b) * weight))

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = {"quantile_levels": quantile_levels().float()}
        for index, norms in enumerate(self.col_norms):
            for group in GROUPS:
                prefix = f"layers.{index}.{group}."
                tensors[prefix + "col_norms"] = norms[group].float().contiguous()
                for rule in RULES:
                    values = self.quantiles[rule][index][group]
                    tensors[f"{prefix}{rule}_quantiles"] = values.float().contiguous()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(self.header)})
        # safetensors writes owner-only files; a sidecar is as readable as the model it serves.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """SparsityError for a missing, unreadable or foreign file."""
        if not Path(path).is_file():
            raise SparsityError(f"sparsity file {path} not found")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                raw = (f.metadata() or {}).get(_HEADER_KEY)
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except Exception as error:  # safetensors raises its own error types
            raise SparsityError(
                f"sparsity file {path} is not a safetensors file: {error}"
            ) from None
        header = json.loads(raw) if raw else {}
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise SparsityError(
                f"{path} is not a Tandem sparsity file (format {FORMAT} version "
                f"{FORMAT_VERSION}); write one with `tandem calibrate`"
            )
        return cls._from_tensors(path, tensors, header)

    @classmethod
    def _from_tensors(
        cls, path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], header: dict
    ) -> Calibration:
        num_layers = int(header["num_layers"])

        def get(name: str) -> torch.Tensor:
            if name not in tensors:
                raise SparsityError(f"sparsity file {path} lacks tensor {name!r}")
            return tensors[name].float()

        norms = tuple(
            {g: get(f"layers.{i}.{g}.col_norms") for g in GROUPS} for i in range(num_layers)
        )
        quantiles = {
            rule: tuple(
                {g: get(f"layers.{i}.{g}.{rule}_quantiles") for g in GROUPS}
                for i in range(num_layers)
            )
            for rule in RULES
        }
        return cls(norms, quantiles, header)

    def check(self, config: ModelConfig, norms: list[dict[str, torch.Tensor]], path: str) -> None:
        """SparsityError unless the file was calibrated on this model's weights."""
        where = f"sparsity file {path} (calibrated on {self.header.get('model', '?')})"
        if len(self.col_norms) != config.num_layers:
            raise SparsityError(
                f"{where} has {len(self.col_norms)} layers, the model {config.num_layers}"
            )
        widths = group_in_features(config)
        for index, theirs in enumerate(self.col_norms):
            for group in GROUPS:
                if theirs[group].shape != (widths[group],):
                    raise SparsityError(
                        f"{where}: layer {index} {group} has {tuple(theirs[group].shape)} "
                        f"channels, the model {widths[group]}"
                    )
        for index, (ours, theirs) in enumerate(zip(norms, self.col_norms, strict=True)):
            for group in GROUPS:
                # Relative to the column, or to the group's mean for near-empty columns.
                scale = ours[group].clamp_min(float(ours[group].mean()) * 1e-3 + 1e-30)
                deviation = float(((theirs[group] - ours[group]).abs() / scale).max())
                if deviation > _NORM_TOLERANCE:
                    raise SparsityError(
                        f"{where}: layer {index} {group} column norms differ from the model's "
                        f"by up to {deviation:.0%}: calibrated on other weights"
                    )


# ---- the plan ---------------------------------------------------------------------------------


def build_plan(
    config: ModelConfig, weights: ModelWeights, settings: SparsitySettings
) -> SparsityPlan:
    """The plan for `settings` on these weights; reads and checks the sidecar when one is named."""
    calibration = None
    norms = None
    if settings.calibration_file:
        calibration = Calibration.load(settings.calibration_file)
        norms = [column_norms(layer) for layer in weights.layers]
        calibration.check(config, norms, settings.calibration_file)
        # The file's norms: its thresholds were measured with them.
        norms = list(calibration.col_norms)
    elif settings.rule == "wina":
        norms = [column_norms(layer) for layer in weights.layers]
    widths = group_in_features(config)
    device = weights.embed.device
    layers = []
    for index in range(config.num_layers):
        groups = {}
        for group in GROUPS:
            col = None
            if settings.rule == "wina" and norms:
                col = norms[index][group].to(device)
            if settings.mode == "top-k":
                keep = keep_count(widths[group], settings.sparsity)
                groups[group] = GroupPlan(col, keep=keep, device=device)
            else:
                assert calibration is not None
                value = calibration.threshold(settings.rule, index, group, settings.sparsity)
                groups[group] = GroupPlan(col, threshold=value, device=device)
        layers.append(groups)
    return SparsityPlan(settings, tuple(layers))


def apply_sparsity(model: CausalLM, settings: SparsitySettings | None) -> None:
    """Configure `model` (None: dense); SparsityError for a file that does not fit it."""
    plan = None if settings is None else build_plan(model.config, model.weights, settings)
    model.set_sparsity(plan)


# ---- calibration ------------------------------------------------------------------------------


class _ScoreHistograms:
    """Per rule, layer and group: a log2 histogram of every score seen (memory stays fixed
    however many tokens calibrate)."""

    def __init__(self, norms: list[dict[str, torch.Tensor]]) -> None:
        self.norms = norms
        self.counts = {
            rule: [{g: torch.zeros(_BINS, dtype=torch.float64) for g in GROUPS} for _ in norms]
            for rule in RULES
        }

    def observe(self, layer: int, group: str, x: torch.Tensor) -> None:
        # Every other row or so is plenty for quantiles, and the histograms cost more than
        # the forward pass they watch.
        x = x[:: -(-x.shape[0] // _OBSERVED_ROWS)]
        teal = channel_scores(x, None).clamp_min_(2.0**_LOG2_LOW).log2_()
        # WINA's log score is TEAL's plus log2 of the column norm: one log for both.
        wina = teal + self.norms[layer][group].clamp_min(2.0**_LOG2_LOW).log2()
        for rule, logs in (("teal", teal), ("wina", wina)):
            hist = torch.histc(logs.clamp_(_LOG2_LOW, _LOG2_HIGH), _BINS, _LOG2_LOW, _LOG2_HIGH)
            self.counts[rule][layer][group] += hist.double()

    def quantiles(self) -> dict[str, tuple[dict[str, torch.Tensor], ...]]:
        return {
            rule: tuple({g: _histogram_quantiles(c[g]) for g in GROUPS} for c in layers)
            for rule, layers in self.counts.items()
        }


def _histogram_quantiles(counts: torch.Tensor) -> torch.Tensor:
    """float32 [Q + 1]: the score at each quantile level, linear in log2 within a bin."""
    levels = quantile_levels()
    total = counts.sum().clamp_min(1.0)
    cdf = counts.cumsum(0) / total
    index = torch.searchsorted(cdf, levels).clamp_(max=_BINS - 1)
    below = torch.where(index > 0, cdf[(index - 1).clamp_min(0)], torch.zeros_like(levels))
    mass = (counts[index] / total).clamp_min(1e-300)
    fraction = ((levels - below) / mass).clamp_(0.0, 1.0)
    width = (_LOG2_HIGH - _LOG2_LOW) / _BINS
    return torch.exp2(_LOG2_LOW + (index + fraction) * width).float()


def calibration_sequences(
    encode: Callable[[str], list[int]],
    documents: Iterable[str],
    tokens: int,
    seq_len: int,
    separator: int | None,
) -> list[list[int]]:
    """Documents encoded back to back (`separator` between them) and cut into sequences of
    `seq_len` tokens, `tokens` in all (fewer when the documents run out)."""
    stream: list[int] = []
    for document in documents:
        stream.extend(encode(document))
        if separator is not None:
            stream.append(separator)
        if len(stream) >= tokens:
            break
    stream = stream[:tokens]
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len) if i + 1 < len(stream)]


def _batches(sequences: list[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for sequence in sequences:
        if batch and sum(map(len, batch)) + len(sequence) > batch_tokens:
            yield batch
            batch = []
        batch.append(sequence)
    if batch:
        yield batch


def calibrate(
    model: CausalLM,
    sequences: list[list[int]],
    *,
    batch_tokens: int = 2048,
    block_size: int = 16,
    header: dict[str, object] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Run the dense model over `sequences` (prefills, no sampling) and record every group's
    input scores; TEAL calibrates on dense activations the same way."""
    if model.sparsity is not None and model.sparsity.sparsity > 0:
        raise SparsityError("calibrate the dense model (set_sparsity(None) first)")
    norms = [column_norms(layer) for layer in model.weights.layers]
    histograms = _ScoreHistograms(norms)
    batches = list(_batches(sequences, batch_tokens))
    started, seen = time.monotonic(), 0
    model.observer = histograms.observe
    try:
        for number, batch in enumerate(batches, 1):
            _prefill(model, batch, block_size)
            seen += sum(map(len, batch))
            if progress is not None:
                progress(
                    f"batch {number}/{len(batches)}: {seen} tokens "
                    f"({time.monotonic() - started:.1f} s)"
                )
    finally:
        model.observer = None
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_layers": model.config.num_layers,
        "in_features": group_in_features(model.config),
        "tokens": seen,
        "sequences": len(sequences),
        **(header or {}),
    }
    return Calibration(tuple(norms), histograms.quantiles(), info)


def _prefill(model: CausalLM, batch: list[list[int]], block_size: int) -> None:
    tables, next_block = [], 0
    for sequence in batch:
        count = math.ceil(len(sequence) / block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    kv = model.new_kv_cache(next_block, block_size)
    forward = ForwardBatch.build(batch, [len(s) for s in batch], tables, block_size)
    model.forward(forward, kv)


def calibrate_dir(
    model_dir: str,
    out: str | os.PathLike[str],
    documents: Iterable[str],
    source: str,
    *,
    tokens: int = 8192,
    seq_len: int = 256,
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Load the model at `model_dir`, calibrate it on `tokens` tokens of `documents` (from
    `source`, recorded in the header) and write the sidecar to `out`."""
    # Imported here: engine.model imports this module.
    from engine.model import CausalLM
    from engine.tokenizer import Tokenizer

    say = progress or (lambda message: None)
    started = time.monotonic()
    model = CausalLM.from_dir(model_dir, dtype=dtype)
    tokenizer = Tokenizer.from_dir(model_dir)
    say(f"loaded {model_dir} ({time.monotonic() - started:.1f} s)")
    separator = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    sequences = calibration_sequences(tokenizer.encode, documents, tokens, seq_len, separator)
    if not sequences:
        raise SparsityError(f"no calibration text in {source}")
    header = {
        "model": os.path.abspath(model_dir),
        "text": source,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    calibration = calibrate(model, sequences, header=header, progress=say)
    calibration.save(out)
    say(f"wrote {out} ({time.monotonic() - started:.1f} s)")
    return calibration
