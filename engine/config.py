"""The model shape the engine runs, parsed from a Hugging Face model directory's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.types import UnsupportedModel

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_ROPE_THETA = 10_000.0


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling; `factor` 1 with type "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only: frequencies between these wavelengths are interpolated smoothly.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    # Per layer: how many most recent keys (including the query's own) a query may attend to.
    sliding_windows: tuple[int | None, ...]
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{model_dir} is not a model directory: no config.json")
        raw = json.loads(config_path.read_text())
        generation_path = model_dir / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        return cls.from_dict(raw, generation)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None
    ) -> ModelConfig:
        architecture = _architecture(raw)
        _check_unsupported_options(raw)
        hidden_size = raw["hidden_size"]
        num_heads = raw["num_attention_heads"]
        num_layers = raw["num_hidden_layers"]
        rope_theta, rope_scaling = _rope(raw)
        qkv_bias, o_bias = _attention_biases(raw, architecture)
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=raw["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=architecture == "Qwen3ForCausalLM",
            sliding_windows=_sliding_windows(raw, architecture, num_layers),
            dtype=_dtype(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_token_ids(raw, generation or {}),
        )


def _architecture(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise UnsupportedModel(
            f"unsupported architecture {architectures or raw.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return supported[0]


def _check_unsupported_options(raw: dict[str, Any]) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"unsupported hidden_act {act!r}; supported: silu")
    if raw.get("mlp_bias"):
        raise UnsupportedModel("mlp_bias is not supported; supported: MLP without bias")
    if raw.get("quantization_config"):
        raise UnsupportedModel("quantized checkpoints are not supported; supported: bf16/fp16/fp32")


def _attention_biases(raw: dict[str, Any], architecture: str) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) as the transformers modeling code of each architecture builds them."""
    if architecture == "Qwen2ForCausalLM":
        return True, False
    if architecture == "MistralForCausalLM":
        return False, False
    attention_bias = bool(raw.get("attention_bias", False))
    return attention_bias, attention_bias


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    """transformers >= 5 writes `rope_parameters`; older checkpoints use rope_theta/rope_scaling."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if any(isinstance(value, dict) for value in params.values()):
        raise UnsupportedModel("per-layer-type rope parameters are not supported")
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or _DEFAULT_ROPE_THETA)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if partial not in (None, 1, 1.0):
        raise UnsupportedModel("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type == "linear":
        return theta, RopeScaling(rope_type=rope_type, factor=float(params["factor"]))
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings")
            or raw.get("max_position_embeddings", 8192)
        ),
    )


def _sliding_windows(
    raw: dict[str, Any], architecture: str, num_layers: int
) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if architecture == "MistralForCausalLM":
        return (window,) * num_layers
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and raw.get("use_sliding_window"):
        # Same rule as transformers' Qwen2Config: explicit layer_types win, else the layers from
        # max_window_layers on slide.
        layer_types = raw.get("layer_types") or [
            "sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention"
            for i in range(num_layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (None,) * num_layers


def _dtype(raw: dict[str, Any]) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise UnsupportedModel(f"unsupported dtype {name!r}; supported: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype, or its name as in config.json ("bfloat16", "float16", "float32")."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise UnsupportedModel(f"unsupported dtype {dtype}; supported: {', '.join(_DTYPES)}")
        return dtype
    return _dtype({"dtype": dtype})


def _eos_token_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's (what generate stops on), then config's."""
    ids: list[int] = []
    for source in (generation.get("eos_token_id"), raw.get("eos_token_id")):
        for token in source if isinstance(source, list) else [source]:
            if token is not None and token not in ids:
                ids.append(token)
    return tuple(ids)
