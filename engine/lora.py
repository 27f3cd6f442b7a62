"""LoRA adapters: PEFT adapter directories loaded for a base model, and what one forward pass
needs to apply the adapters of its rows (kernels.lora does the arithmetic).

On disk (PEFT's format): `adapter_config.json` and `adapter_model.safetensors` with tensors
`base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`, A [r, in] and
B [out, r]. Supported: LoRA on any of q/k/v/o/gate/up/down_proj, ranks 1..MAX_RANK (per module:
the tensors' shapes, checked against `r` / `rank_pattern`), `lora_alpha` / `alpha_pattern`,
`use_rslora`, `layers_to_transform`. Anything that changes the computation in another way (DoRA
and the other LoRA variants, biases, `modules_to_save`, embedding or LM-head targets, ...) is
refused with an AdapterError naming it, as are shapes that do not fit the base model.

In memory an adapter is A [r, in] and B [out, r] per (layer, projection), in the model's dtype,
with the scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) folded into B.

Per forward pass the adapters used by its rows are stacked per layer and projection group
(q/k/v and gate/up share their input, so each group is one shrink), see `AdapterStacks`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.types import AdapterError
from kernels.lora import LoraMapping, LoraStack, lora_apply, uses_dense_path

MAX_RANK = 256
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# projection -> (block in the Hugging Face module path, fused group in the engine's weights)
PROJECTIONS: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn", "qkv"),
    "k_proj": ("self_attn", "qkv"),
    "v_proj": ("self_attn", "qkv"),
    "o_proj": ("self_attn", "o"),
    "gate_proj": ("mlp", "gate_up"),
    "up_proj": ("mlp", "gate_up"),
    "down_proj": ("mlp", "down"),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_SUPPORTED = ", ".join(PROJECTIONS)
# LoRA variants and options that change the computation; PEFT 0.21's names. Each is refused
# when set (truthy) in adapter_config.json.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "velora_config": "VeLoRA (velora_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_qalora": "QALoRA (use_qalora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "layer_replication": "layer_replication",
}
# Initialisations that change the base weights too: the adapter only fits the changed base
# unless it was saved with path_initial_model_for_weight_conversion (which resets the field).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_TENSOR_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")
_MODULE_KEY = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<proj>\w+)")
_uids = itertools.count(1)


# ---- shapes of the base model ---------------------------------------------------------------


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in features, out features) of each projection of the base model."""
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (hidden, config.q_size),
        "k_proj": (hidden, config.kv_size),
        "v_proj": (hidden, config.kv_size),
        "o_proj": (config.q_size, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def fused_columns(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(first column, width) of each projection in its group's fused output (engine.loader)."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    return {
        "q_proj": (0, q),
        "k_proj": (q, kv),
        "v_proj": (q + kv, kv),
        "o_proj": (0, config.hidden_size),
        "gate_proj": (0, inter),
        "up_proj": (inter, inter),
        "down_proj": (0, config.hidden_size),
    }


def _base_signature(config: ModelConfig) -> tuple[int, ...]:
    shapes = projection_shapes(config)
    return (config.num_layers, *(n for name in PROJECTIONS for n in shapes[name]))


# ---- adapter_config.json --------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT LoraConfig that the engine honours."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdapterConfig:
        """Parse and check adapter_config.json; AdapterError for anything unsupported."""
        _refuse_unsupported(raw)
        try:
            targets = raw.get("target_modules") or ()
            config = cls(
                r=int(raw.get("r", 8)),
                lora_alpha=float(raw.get("lora_alpha", 8)),
                use_rslora=bool(raw.get("use_rslora", False)),
                target_modules=targets if isinstance(targets, str) else tuple(targets),
                rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
                alpha_pattern={
                    str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()
                },
            )
        except (TypeError, ValueError, AttributeError) as error:
            raise AdapterError(f"{CONFIG_FILE} has a malformed field: {error}") from error
        config._check_targets()
        return config

    def rank_for(self, module: str) -> int:
        """PEFT's rank for a module path like "model.layers.0.self_attn.q_proj"."""
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)

    def scaling_for(self, module: str, rank: int) -> float:
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def _check_targets(self) -> None:
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return
            for name in ("lm_head", "model.embed_tokens"):
                if _regex_match(re.fullmatch, self.target_modules, name):
                    raise AdapterError(
                        f"unsupported target module {name!r} (target_modules regex "
                        f"{self.target_modules!r}); supported: {_SUPPORTED}"
                    )
            return
        for target in self.target_modules:
            if str(target).rsplit(".", 1)[-1] not in PROJECTIONS:
                raise AdapterError(f"unsupported target module {target!r}; supported: {_SUPPORTED}")


def _refuse_unsupported(raw: dict[str, Any]) -> None:
    peft_type = str(raw.get("peft_type", "LORA"))
    if peft_type.upper() != "LORA":
        raise AdapterError(f"peft_type {peft_type!r} is not supported; supported: LORA")
    for option, what in _REFUSED_OPTIONS.items():
        if raw.get(option):
            raise AdapterError(f"{what} is not supported: {option}={raw[option]!r}")
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(f"bias={bias!r} is not supported (trained biases); supported: 'none'")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(
            f"init_lora_weights={init!r} changes the base weights too; save the adapter with "
            "path_initial_model_for_weight_conversion to make it a plain LoRA"
        )
    rank = raw.get("r", 8)
    if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"rank r={rank!r} is not supported; supported: 1..{MAX_RANK}")


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """The first pattern that matches the end of `module` (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if _regex_match(re.match, rf"(.*\.)?({key})$", module):
            return key
    return module


def _regex_match(match: Any, pattern: str, text: str) -> bool:
    try:
        return match(pattern, text) is not None
    except re.error as error:
        raise AdapterError(f"{CONFIG_FILE} has an invalid regex {pattern!r}: {error}") from error


# ---- the adapter ----------------------------------------------------------------------------


@dataclass
class LoraWeights:
    """One adapted projection of one layer: delta(x) = b @ (a @ x), scaling folded into b."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class LoraAdapter:
    path: str
    config: AdapterConfig
    weights: dict[tuple[int, str], LoraWeights]  # (layer, projection name) -> weights
    base_signature: tuple[int, ...]  # the shapes of the base model it was checked against
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values())).a.dtype

    @property
    def projections(self) -> frozenset[str]:
        return frozenset(name for _, name in self.weights)

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.weights.values())

    @property
    def num_bytes(self) -> int:
        return sum(
            w.a.numel() * w.a.element_size() + w.b.numel() * w.b.element_size()
            for w in self.weights.values()
        )

    def fits(self, config: ModelConfig) -> bool:
        return self.base_signature == _base_signature(config)

    def to(self, dtype: torch.dtype) -> LoraAdapter:
        """This adapter in `dtype` (itself when it already is)."""
        if dtype == self.dtype:
            return self
        weights = {
            key: LoraWeights(w.a.to(dtype), w.b.to(dtype)) for key, w in self.weights.items()
        }
        return LoraAdapter(self.path, self.config, weights, self.base_signature)


def load_adapter(
    path: str | Path, model_config: ModelConfig, dtype: torch.dtype | None = None
) -> LoraAdapter:
    """Read a PEFT LoRA directory for this base model; AdapterError (with `kind` "not_found"
    for a missing path or file) when it cannot be used."""
    path = Path(path)
    config = AdapterConfig.from_dict(_read_config(path))
    tensors = _read_tensors(path / WEIGHTS_FILE)
    pairs = _pair_tensors(tensors, model_config.num_layers)
    shapes = projection_shapes(model_config)
    dtype = dtype or model_config.dtype
    weights = {}
    for (layer, proj), (a, b) in sorted(pairs.items()):
        module = f"model.layers.{layer}.{PROJECTIONS[proj][0]}.{proj}"
        rank = _check_shapes(module, a, b, shapes[proj], config.rank_for(module))
        scaling = config.scaling_for(module, rank)
        weights[(layer, proj)] = LoraWeights(a.to(dtype), (b.float() * scaling).to(dtype))
    return LoraAdapter(str(path), config, weights, _base_signature(model_config))


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise AdapterError(f"adapter path {str(path)!r} does not exist", kind="not_found")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter: no {CONFIG_FILE}", kind="not_found")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"cannot read {config_path}: {error}") from error
    if not isinstance(raw, dict):
        raise AdapterError(f"{config_path} is not a JSON object")
    return raw


def _read_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    if not weights_path.is_file():
        legacy = weights_path.with_name("adapter_model.bin")
        hint = " (adapter_model.bin pickles are not supported)" if legacy.is_file() else ""
        raise AdapterError(f"no {WEIGHTS_FILE} in {weights_path.parent}{hint}", kind="not_found")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"cannot read {weights_path}: {error}") from error


def _pair_tensors(
    tensors: dict[str, torch.Tensor], num_layers: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, projection) -> (A, B), refusing any tensor that is not LoRA on a projection."""
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(_unexpected_tensor(key))
        layer, proj = _parse_module(match["module"], num_layers)
        factors.setdefault((layer, proj), {})[match["factor"]] = tensor
    if not factors:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA weights")
    for (layer, proj), found in factors.items():
        if len(found) != 2:
            missing = "lora_B" if "A" in found else "lora_A"
            raise AdapterError(f"layer {layer} {proj} has no {missing} weight")
    return {key: (found["A"], found["B"]) for key, found in factors.items()}


def _unexpected_tensor(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return f"DoRA (use_dora) is not supported: tensor {key!r}"
    if "lora_embedding" in key or "embed_tokens" in key:
        return f"unsupported target module embed_tokens (tensor {key!r}); supported: {_SUPPORTED}"
    if key.endswith(".bias"):
        return f"trained biases are not supported: tensor {key!r}"
    return f"unexpected tensor {key!r}: not a LoRA A/B weight"


def _parse_module(module: str, num_layers: int) -> tuple[int, str]:
    match = _MODULE_KEY.fullmatch(module)
    if match is None or PROJECTIONS.get(match["proj"], ("",))[0] != match["block"]:
        raise AdapterError(f"unsupported target module {module!r}; supported: {_SUPPORTED}")
    layer = int(match["layer"])
    if layer >= num_layers:
        raise AdapterError(
            f"the adapter has weights for layer {layer}; the base model has {num_layers} layers"
        )
    return layer, match["proj"]


def _check_shapes(
    module: str,
    a: torch.Tensor,
    b: torch.Tensor,
    base: tuple[int, int],
    config_rank: int,
) -> int:
    """The rank, after checking A [r, in] and B [out, r] against the base and the config."""
    in_features, out_features = base
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterError(f"{module}: lora_A and lora_B must be matrices")
    rank = int(a.shape[0])
    if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
        raise AdapterError(
            f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base "
            f"projection ({out_features} x {in_features}): expected [r, {in_features}] and "
            f"[{out_features}, r]"
        )
    if not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"{module}: rank {rank} is not supported; supported: 1..{MAX_RANK}")
    if rank != config_rank:
        raise AdapterError(
            f"{module}: the weights have rank {rank} but {CONFIG_FILE} says {config_rank} "
            "(r / rank_pattern)"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterError(f"{module}: lora weights must be floating point, not {a.dtype}")
    return rank


# ---- per forward pass -----------------------------------------------------------------------

# The adapters of one sequence with their weights.
AdapterUse = tuple[tuple[LoraAdapter, float], ...]


_UNMADE = object()  # LoraBatch._params before decode_params makes them


@dataclass
class LoraBatch:
    """Per layer the stacks of each projection group (None: no row adapts it), and the rows."""

    layers: list[dict[str, LoraStack | None]]
    mapping: LoraMapping
    _params: object = field(default=_UNMADE, init=False, repr=False)

    def decode_params(self) -> list[tuple[torch.Tensor | None, ...]] | None:
        """Per layer, the C kernel's params (kernels.cpu_linear.LoraDense.params) of its qkv, o,
        gate_up and down adapters (None: the group has none), for a decode step run in one C
        call; None where a group needs the Python path (segments, or no C kernel). Made once
        per batch (AdapterStacks.batch hands steady decode steps the same one)."""
        if self._params is _UNMADE:
            self._params = self._make_decode_params()
        return self._params  # type: ignore[return-value]

    def _make_decode_params(self) -> list[tuple[torch.Tensor | None, ...]] | None:
        mapping, rows = self.mapping, self.mapping.num_tokens
        values: list[list[int]] = []
        places: list[list[int | None]] = []  # per layer and group: its row of values, or None
        for stacks in self.layers:
            layer: list[int | None] = []
            for group in GROUPS:
                stack = stacks.get(group)
                if stack is None or not mapping.segments or stack.max_rank == 0:
                    layer.append(None)  # lora_ref would leave y as it is
                    continue
                call = stack.dense_call() if uses_dense_path(stack, mapping) else None
                if call is None:
                    return None
                mask = mapping.column_mask(stack.slot_ranks, stack.b.dtype)
                skip = mapping.idle_groups(stack.slot_ranks, len(stack.slices))
                group_values = call.param_values(rows, mask, skip)
                if group_values is None:
                    return None
                layer.append(len(values))
                values.append(group_values)
            places.append(layer)
        # One tensor for the step (one torch.tensor per group cost ~1 ms a step); its rows are
        # the groups' params, views that keep it alive.
        table = torch.tensor(values, dtype=torch.int64) if values else None
        return [
            tuple(None if place is None else table[place] for place in layer)  # type: ignore[index]
            for layer in places
        ]

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += the LoRA deltas of the projections of `group` in `layer`, input x."""
        stack = self.layers[layer][group]
        if stack is not None:
            lora_apply(y, x, stack, self.mapping)


class AdapterStacks:
    """Builds each forward pass's LoraBatch from one set of stacked adapter weights (a copy, in
    the model's dtype and on its device) that lives across passes like a pool of slots:

    - a pass whose adapters all have slots costs no copying (steady decoding);
    - a new adapter takes over the slot of one no pass uses any more, in place, when its ranks
      fit; otherwise it gets a new slot (the stacks grow by one copy);
    - slots of adapters the pass does not use stay (masked out, but their weights are still
      read by the dense path) until they outnumber the used ones: then the stacks are rebuilt
      for the pass's adapters only.

    With `max_slots` (the engine's adapter slots) the pool is fixed-size instead: slots stay
    filled (the adapters there are "on device") and are never compacted; a new adapter takes
    the slot of the first unused adapter in `victim_key` order (the engine's LRU), in place
    when its ranks fit, else by restacking. A pass must use at most `max_slots` adapters.
    """

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        max_slots: int | None = None,
        victim_key: Callable[[LoraAdapter], Any] | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype or config.dtype
        self.max_slots = max_slots
        self._victim_key = victim_key or (lambda adapter: 0)
        self.version = 0  # changes whenever the slots' adapters change
        # The last pass's batch and what it was built from: decode steps of the same sequences
        # make the same one, whose masks and kernel params are then made once, not every step.
        self._last_batch: tuple[tuple, LoraBatch] | None = None
        self._columns = fused_columns(config)
        self._in_features = {p: shape[0] for p, shape in projection_shapes(config).items()}
        self._slots: list[LoraAdapter | None] = []
        # Per layer and group: the stack, and the projections of its slices.
        self._layers: list[dict[str, LoraStack | None]] = []
        self._projs: list[dict[str, tuple[str, ...]]] = []

    @property
    def holds_stacks(self) -> bool:
        return bool(self._slots)

    @property
    def slots(self) -> tuple[LoraAdapter | None, ...]:
        return tuple(self._slots)

    def clear(self) -> None:
        self._slots, self._layers, self._projs = [], [], []
        self.version += 1

    def drop(self, keep: Callable[[LoraAdapter], bool]) -> None:
        """Give up the slots of adapters that `keep` refuses (restacking the others)."""
        kept = [a for a in self._slots if a is not None and keep(a)]
        if len(kept) == len(self._slots):
            return
        if kept:
            self._rebuild(kept)
        else:
            self.clear()

    def batch(self, uses: Sequence[AdapterUse], query_lens: Sequence[int]) -> LoraBatch | None:
        """None when no sequence uses an adapter. uses[i]: sequence i's adapters and weights,
        query_lens[i]: its number of rows in the flat batch."""
        if not any(uses):
            return None
        self._place({adapter.uid: adapter for use in uses for adapter, _ in use})
        slot = {a.uid: index for index, a in enumerate(self._slots) if a is not None}
        runs, row = [], 0
        for use, count in zip(uses, query_lens, strict=True):
            if use:
                runs.append((row, count, [(slot[adapter.uid], w) for adapter, w in use]))
            row += count
        key = (self.version, row, len(self._slots), tuple((r, n, tuple(u)) for r, n, u in runs))
        if self._last_batch is not None and self._last_batch[0] == key:
            return self._last_batch[1]
        mapping = LoraMapping.build(row, len(self._slots), runs, self.device)
        batch = LoraBatch(self._layers, mapping)
        self._last_batch = (key, batch)
        return batch

    # ---- slots ----------------------------------------------------------------------------

    def _place(self, wanted: dict[int, LoraAdapter]) -> None:
        """Give every wanted adapter a slot."""
        if self.max_slots is not None:
            self._place_capped(wanted)
            return
        stale = [i for i, a in enumerate(self._slots) if a is None or a.uid not in wanted]
        if not self._slots or len(stale) > len(wanted):
            self._rebuild([wanted[uid] for uid in sorted(wanted)])
            return
        present = {a.uid for a in self._slots if a is not None}
        appended = []
        for uid in sorted(wanted):
            if uid in present:
                continue
            adapter = wanted[uid]
            slot = next((i for i in stale if self._fits(adapter, i)), None)
            if slot is None:
                appended.append(adapter)
            else:
                stale.remove(slot)
                self._overwrite(slot, adapter)
        if appended:
            self._append(appended)

    def _place_capped(self, wanted: dict[int, LoraAdapter]) -> None:
        """Fill free slots first, then evict the unused slots' adapters in victim_key order."""
        max_slots = self.max_slots or 0
        if len(wanted) > max_slots:  # the scheduler never runs more adapters than slots
            raise ValueError(f"a pass uses {len(wanted)} adapters; there are {max_slots} slots")
        present = {a.uid for a in self._slots if a is not None}
        missing = [wanted[uid] for uid in sorted(wanted) if uid not in present]
        if not missing:
            return
        free = max_slots - len(self._slots)
        appended, replacing = missing[:free], missing[free:]
        unused = [i for i, a in enumerate(self._slots) if a is None or a.uid not in wanted]
        unused.sort(key=self._slot_victim_key)
        evictions = list(zip(unused, replacing, strict=False))  # enough: len(wanted) <= max
        if not self._slots:
            self._rebuild(appended)
        elif all(self._fits(adapter, slot) for slot, adapter in evictions):
            for slot, adapter in evictions:
                self._overwrite(slot, adapter)
            if appended:
                self._append(appended)
        else:
            slots = list(self._slots)
            for slot, adapter in evictions:
                slots[slot] = adapter
            self._rebuild([*slots, *appended])

    def _slot_victim_key(self, slot: int) -> tuple[bool, Any]:
        adapter = self._slots[slot]
        return (False, ()) if adapter is None else (True, self._victim_key(adapter))

    def _rebuild(self, adapters: list[LoraAdapter]) -> None:
        self._slots = list(adapters)
        self.version += 1
        self._layers, self._projs = [], []
        for layer in range(self.config.num_layers):
            stacks, projs = {}, {}
            for group in GROUPS:
                projs[group] = self._used_projs(self._slots, layer, group)
                stacks[group] = self._group_stack(self._slots, layer, group, projs[group])
            self._layers.append(stacks)
            self._projs.append(projs)

    def _fits(self, adapter: LoraAdapter, slot: int) -> bool:
        """Whether the adapter's ranks fit the slot's columns in every layer and group."""
        for layer in range(self.config.num_layers):
            for group, stack in self._layers[layer].items():
                ranks = _group_ranks(adapter, layer, GROUPS[group])
                if not ranks:
                    continue
                if stack is None or not set(ranks) <= set(self._projs[layer][group]):
                    return False
                if max(ranks.values()) > stack.slot_ranks[slot]:
                    return False
        return True

    def _overwrite(self, slot: int, adapter: LoraAdapter) -> None:
        for layer in range(self.config.num_layers):
            for group, stack in self._layers[layer].items():
                if stack is not None:
                    column = stack.slot_offsets[slot]
                    columns = slice(column, column + stack.slot_ranks[slot])
                    stack.a[:, columns].zero_()
                    stack.b[:, columns].zero_()
                    self._copy_in(stack, self._projs[layer][group], adapter, layer, column)
        self._slots[slot] = adapter
        self.version += 1

    def _append(self, adapters: list[LoraAdapter]) -> None:
        """New slots at the end: every stack grows by the new adapters' columns."""
        slots = [*self._slots, *adapters]
        for layer in range(self.config.num_layers):
            for group, old in self._layers[layer].items():
                projs = self._projs[layer][group]
                if not set(self._used_projs(adapters, layer, group)) <= set(projs):
                    # A projection that no slot adapted: restack the whole group.
                    projs = self._used_projs(slots, layer, group)
                    self._projs[layer][group] = projs
                    self._layers[layer][group] = self._group_stack(slots, layer, group, projs)
                    continue
                piece = self._group_stack(adapters, layer, group, projs)
                self._layers[layer][group] = self._concatenate(old, piece, len(adapters))
        self._slots = slots
        self.version += 1

    # ---- stacking ---------------------------------------------------------------------------

    def _used_projs(
        self, adapters: Sequence[LoraAdapter | None], layer: int, group: str
    ) -> tuple[str, ...]:
        return tuple(
            p for p in GROUPS[group] if any(a and (layer, p) in a.weights for a in adapters)
        )

    def _group_stack(
        self,
        adapters: Sequence[LoraAdapter | None],
        layer: int,
        group: str,
        projs: tuple[str, ...],
    ) -> LoraStack | None:
        """The stack of `projs` (slices) for these slots (None: an empty slot)."""
        if not projs:
            return None
        ranks = tuple(
            max(_group_ranks(a, layer, projs).values(), default=0) if a else 0 for a in adapters
        )
        if sum(ranks) == 0:
            return None
        slices = tuple(self._columns[p] for p in projs)
        options = {"dtype": self.dtype, "device": self.device}
        a_all = torch.zeros(len(projs), sum(ranks), self._in_features[projs[0]], **options)
        b_all = torch.zeros(sum(w for _, w in slices), sum(ranks), **options)
        stack = LoraStack(a_all, b_all, slices, ranks)
        for slot, adapter in enumerate(adapters):
            if adapter is not None:
                self._copy_in(stack, projs, adapter, layer, stack.slot_offsets[slot])
        return stack

    def _concatenate(
        self, old: LoraStack | None, piece: LoraStack | None, new_slots: int
    ) -> LoraStack | None:
        """`old` with `new_slots` more slots, whose columns are `piece`'s (None: no columns; the
        caller restacks a group whose new slots adapt projections `old` lacks)."""
        if old is None:
            return None
        if piece is None:
            return LoraStack(old.a, old.b, old.slices, old.slot_ranks + (0,) * new_slots)
        a = torch.cat([old.a, piece.a], dim=1)
        b = torch.cat([old.b, piece.b], dim=1)
        return LoraStack(a, b, old.slices, old.slot_ranks + piece.slot_ranks)

    def _copy_in(
        self,
        stack: LoraStack,
        projs: tuple[str, ...],
        adapter: LoraAdapter,
        layer: int,
        column: int,
    ) -> None:
        for p, proj in enumerate(projs):
            weights = adapter.weights.get((layer, proj))
            if weights is not None:
                stack.a[p, column : column + weights.rank].copy_(weights.a)
                stack.b_slices[p][:, column : column + weights.rank].copy_(weights.b)


def _group_ranks(adapter: LoraAdapter, layer: int, projs: Sequence[str]) -> dict[str, int]:
    return {p: adapter.weights[layer, p].rank for p in projs if (layer, p) in adapter.weights}
