"""Reads a Hugging Face safetensors checkpoint into the engine's fused weight layout.

Engine layout per layer: qkv [(heads + 2 kv_heads) * head_dim, hidden] (q rows, then k, then v),
gate_up [2 * intermediate, hidden] (gate rows, then up), o, down, the two norms, and for Qwen3 the
q/k head norms stacked per head as qk_norm [heads + kv_heads, head_dim] so one RMSNorm call covers
the q and k heads that sit next to each other in the qkv output.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.huge_pages import HugePageArena

logger = logging.getLogger(__name__)

_PROGRESS_EVERY_TENSORS = 64


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_attention_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # the very same tensor as `embed` when embeddings are tied


class CheckpointReader:
    """Tensors by Hugging Face name across all safetensors files of a model directory, read from
    the memory-mapped files into their destination dtype, in one arena of huge pages
    (engine.huge_pages: the decode step streams them all)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, stack: ExitStack) -> None:
        self.dtype = dtype
        self._handles = {}
        for path in _safetensors_files(model_dir):
            handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                self._handles[name] = handle
        # Room for every tensor of the checkpoint (a fused one takes its parts' room).
        self.arena = HugePageArena.for_sizes(self._nbytes(name) for name in self._handles)
        self._read = 0
        self._started = time.monotonic()

    def get(self, name: str) -> torch.Tensor:
        return self.arena.copy_of(self._raw(name), self.dtype)

    def stacked(self, names: list[str]) -> torch.Tensor:
        """Concatenate along dim 0 without holding the pieces and the result twice over."""
        shapes = [self._shape(name) for name in names]
        rows = sum(shape[0] for shape in shapes)
        out = self.arena.empty((rows, *shapes[0][1:]), self.dtype)
        start = 0
        for name, shape in zip(names, shapes, strict=True):
            out[start : start + shape[0]].copy_(self._raw(name))
            start += shape[0]
        return out

    def _shape(self, name: str) -> list[int]:
        return self._handle(name).get_slice(name).get_shape()

    def _nbytes(self, name: str) -> int:
        return math.prod(self._shape(name)) * self.dtype.itemsize

    def _handle(self, name: str):
        if name not in self._handles:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return self._handles[name]

    def _raw(self, name: str) -> torch.Tensor:
        tensor = self._handle(name).get_tensor(name)
        self._read += 1
        if self._read % _PROGRESS_EVERY_TENSORS == 0:
            logger.info(
                "loaded %d/%d tensors (%.1fs)",
                self._read,
                len(self._handles),
                time.monotonic() - self._started,
            )
        return tensor


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names missing weight files: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def load_weights(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype | None = None
) -> ModelWeights:
    """All weights of the model in `dtype` (default: the checkpoint's dtype from config)."""
    model_dir = Path(model_dir)
    dtype = dtype or config.dtype
    started = time.monotonic()
    with ExitStack() as stack:
        reader = CheckpointReader(model_dir, dtype, stack)
        embed = reader.get("model.embed_tokens.weight")
        weights = ModelWeights(
            embed=embed,
            layers=[_layer(reader, config, i) for i in range(config.num_layers)],
            final_norm=reader.get("model.norm.weight"),
            lm_head=embed if config.tie_word_embeddings else reader.get("lm_head.weight"),
        )
    logger.info(
        "loaded %s (%d layers, %s) in %.1fs",
        model_dir,
        config.num_layers,
        str(dtype).removeprefix("torch."),
        time.monotonic() - started,
    )
    return weights


def _layer(reader: CheckpointReader, config: ModelConfig, index: int) -> LayerWeights:
    prefix = f"model.layers.{index}."
    attn = prefix + "self_attn."
    qkv_names = [f"{attn}{p}_proj" for p in ("q", "k", "v")]
    qkv_bias = None
    if config.qkv_bias:
        qkv_bias = reader.stacked([name + ".bias" for name in qkv_names])
    qk_norm = None
    if config.qk_norm:
        q_norm = reader.get(attn + "q_norm.weight")
        k_norm = reader.get(attn + "k_norm.weight")
        qk_norm = torch.cat(
            [q_norm.expand(config.num_heads, -1), k_norm.expand(config.num_kv_heads, -1)]
        )
    return LayerWeights(
        input_norm=reader.get(prefix + "input_layernorm.weight"),
        qkv=reader.stacked([name + ".weight" for name in qkv_names]),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        o=reader.get(attn + "o_proj.weight"),
        o_bias=reader.get(attn + "o_proj.bias") if config.o_bias else None,
        post_attention_norm=reader.get(prefix + "post_attention_layernorm.weight"),
        gate_up=reader.stacked([f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up")]),
        down=reader.get(prefix + "mlp.down_proj.weight"),
    )
