"""Tiny random Hugging Face checkpoints of every supported architecture, saved to disk."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

TINY_SHAPE: dict[str, Any] = {
    "vocab_size": 200,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# name -> (transformers config class, options on top of TINY_SHAPE)
TINY_VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "llama": (transformers.LlamaConfig, {}),
    "llama_attention_bias": (transformers.LlamaConfig, {"attention_bias": True}),
    "llama_rope_linear": (
        transformers.LlamaConfig,
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}},
    ),
    "llama_rope_llama3": (
        transformers.LlamaConfig,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    # A window shorter than the test sequences, so it changes the logits.
    "mistral_window": (transformers.MistralConfig, {"sliding_window": 8}),
    "qwen2_tied": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    # Layer 0 attends to everything, layer 1 slides (transformers' max_window_layers rule).
    "qwen2_window": (
        transformers.Qwen2Config,
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    ),
    # head_dim 32 != hidden / heads, as in real Qwen3 checkpoints.
    "qwen3_tied": (transformers.Qwen3Config, {"tie_word_embeddings": True, "head_dim": 32}),
    "qwen3_untied": (transformers.Qwen3Config, {"tie_word_embeddings": False, "head_dim": 32}),
}


@dataclass
class TinyModel:
    path: Path  # Hugging Face model directory (config.json, model.safetensors, ...)
    hf: transformers.PreTrainedModel  # float32 reference loaded from `path`, eager attention


def build_tiny_model(variant: str, out_dir: Path, dtype: torch.dtype = torch.float32) -> TinyModel:
    config_class, options = TINY_VARIANTS[variant]
    config = config_class(**TINY_SHAPE, **options, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(model)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    return TinyModel(path=out_dir, hf=load_reference(out_dir, torch.float32))


def load_reference(model_dir: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The checkpoint as transformers itself reads it (`.to(dtype)` on a live model would also
    round its rotary frequencies, which loading does not)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager"
    ).eval()


def _randomize(model: torch.nn.Module) -> None:
    """transformers initialises norms to 1 and biases to 0, which would hide mistakes in how they
    are loaded, and its small init makes logits nearly flat; draw everything at useful scales."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(0.15 * noise)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TinyModel]:
    """tiny_model(variant, dtype=torch.float32) -> TinyModel, built once per session."""
    built: dict[tuple[str, torch.dtype], TinyModel] = {}

    def get(variant: str, dtype: torch.dtype = torch.float32) -> TinyModel:
        key = (variant, dtype)
        if key not in built:
            out_dir = tmp_path_factory.mktemp(f"{variant}-{str(dtype).removeprefix('torch.')}")
            built[key] = build_tiny_model(variant, out_dir, dtype)
        return built[key]

    return get


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sentencepiece_tokenizer_dir) -> str:
    """A tiny Llama with the real 32k SentencePiece tokenizer (test_engine's and
    test_engine_process's model)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32768,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # Larger weights than the default init give peaked distributions, so greedy ties are rare.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(sentencepiece_tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return str(out)
