"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, paged_attention, write_kv
from engine.batch import ForwardBatch
from engine.config import ModelConfig, resolve_dtype
from engine.kv_cache import KVCache
from engine.loader import LayerWeights, ModelWeights, load_weights
from engine.lora import LoraBatch
from engine.rope import RotaryEmbedding, apply_rotary_
from kernels.cpu_linear import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32 and round back before scaling, like transformers' LlamaRMSNorm."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


class CausalLM:
    def __init__(self, config: ModelConfig, weights: ModelWeights) -> None:
        self.config = config
        self.weights = weights
        self.dtype = weights.embed.dtype
        self.rope = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, self.dtype
        )
        self._scale = config.head_dim**-0.5

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype: torch.dtype | str | None = None) -> CausalLM:
        """Load a Hugging Face model directory; `dtype` overrides the checkpoint's dtype."""
        config = ModelConfig.from_dir(model_dir)
        weights = load_weights(model_dir, config, resolve_dtype(dtype) if dtype else None)
        return cls(config, weights)

    def new_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype)

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, kv: KVCache, lora: LoraBatch | None = None
    ) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), vocab]; writes the new tokens' K/V.
        `lora`: the LoRA adapters of the batch's rows (None: every row runs the base model)."""
        hidden = F.embedding(batch.input_ids, self.weights.embed)
        cos, sin = self.rope.cos_sin(batch.positions)
        meta = AttentionMetadata.from_batch(batch)
        for index, layer in enumerate(self.weights.layers):
            self._layer(index, layer, hidden, cos, sin, meta, kv, lora)
        last = rms_norm(
            hidden[batch.logits_indices], self.weights.final_norm, self.config.rms_norm_eps
        )
        return linear(last, self.weights.lm_head).float()

    def _layer(
        self,
        index: int,
        w: LayerWeights,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        lora: LoraBatch | None,
    ) -> None:
        """Pre-norm attention and MLP blocks, each added into `hidden` in place."""
        eps = self.config.rms_norm_eps
        x = rms_norm(hidden, w.input_norm, eps)
        attn = self._attention(index, w, x, cos, sin, meta, kv, lora)
        out = linear(attn, w.o, w.o_bias)
        if lora is not None:
            lora.apply(index, "o", attn, out)
        hidden.add_(out)
        hidden.add_(self._mlp(index, w, rms_norm(hidden, w.post_attention_norm, eps), lora))

    def _attention(
        self,
        index: int,
        w: LayerWeights,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        c = self.config
        tokens = x.shape[0]
        qkv = linear(x, w.qkv, w.qkv_bias)
        if lora is not None:
            lora.apply(index, "qkv", x, qkv)
        # q and k heads are adjacent in each row, so norm and rotary treat them as one block.
        qk = qkv[:, : c.q_size + c.kv_size].view(tokens, c.num_heads + c.num_kv_heads, c.head_dim)
        if w.qk_norm is not None:
            qk = rms_norm(qk, w.qk_norm, c.rms_norm_eps)
        apply_rotary_(qk, cos, sin)
        q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]
        v = qkv[:, c.q_size + c.kv_size :].view(tokens, c.num_kv_heads, c.head_dim)
        write_kv(kv.keys[index], kv.values[index], meta.slot_mapping, k, v)
        out = paged_attention(
            q, kv.keys[index], kv.values[index], meta, self._scale, c.sliding_windows[index]
        )
        return out.reshape(tokens, c.q_size)

    def _mlp(
        self, index: int, w: LayerWeights, x: torch.Tensor, lora: LoraBatch | None
    ) -> torch.Tensor:
        gate_up = linear(x, w.gate_up)
        if lora is not None:
            lora.apply(index, "gate_up", x, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = torch.mul(F.silu(gate, inplace=True), up)
        out = linear(act, w.down)
        if lora is not None:
            lora.apply(index, "down", act, out)
        return out
