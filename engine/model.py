"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, paged_attention
from engine.batch import ForwardBatch
from engine.config import ModelConfig, resolve_dtype
from engine.huge_pages import rewrite_in_place
from engine.kv_cache import KVCache
from engine.loader import LayerWeights, ModelWeights, load_weights
from engine.lora import LoraBatch
from engine.rope import RotaryEmbedding
from engine.sparsity import (
    GROUPS,
    SkipCounter,
    SparsityPlan,
    SparsitySettings,
    group_in_features,
)
from kernels import cpu_linear
from kernels import sparse as sparse_kernels
from kernels.cpu_decode import DecodeCall, DecodeLayers, DecodeShape
from kernels.cpu_linear import linear
from kernels.cpu_ops import add_rms_norm, rms_norm, rope_store_kv, silu_mul
from kernels.sparse import channel_scores, sparse_linear
from kernels.threads import serial_ops

# Called with (layer, group, input) before each projection group runs (calibration's tap).
Observer = Callable[[int, str, torch.Tensor], None]
_UNPREPARED = object()  # CausalLM._decode_layers before its first use


class CausalLM:
    def __init__(self, config: ModelConfig, weights: ModelWeights) -> None:
        self.config = config
        self.weights = weights
        self.dtype = weights.embed.dtype
        self.rope = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, self.dtype
        )
        self._scale = config.head_dim**-0.5
        # Sparse activation (engine.sparsity): None runs every projection dense.
        self._plan: SparsityPlan | None = None
        self.sparsity: SparsitySettings | None = None
        # Bumped whenever the keys and values a forward computes change (sparse activation):
        # cached prefix blocks of an older version are never taken (engine.prefix_cache).
        self.kv_version = 0
        self.observer: Observer | None = None
        self.skip_counter: SkipCounter | None = None  # set to count skipped channels
        # kernels.cpu_decode's one-call decode step, prepared at first use (None: not possible).
        self._decode_layers: DecodeLayers | object | None = _UNPREPARED

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype: torch.dtype | str | None = None) -> CausalLM:
        """Load a Hugging Face model directory; `dtype` overrides the checkpoint's dtype."""
        config = ModelConfig.from_dir(model_dir)
        weights = load_weights(model_dir, config, resolve_dtype(dtype) if dtype else None)
        return cls(config, weights)

    def set_sparsity(self, plan: SparsityPlan | None) -> None:
        """Run the projections sparse by `plan` (None: dense). Not while a forward runs.

        Sparse, the projection weights are stored input-channel-major (W.T contiguous, so a
        skipped channel is a skipped row of memory) and kept as transposed views, [N, K] like
        before. Dense (or at sparsity 0) they are contiguous [N, K] again, so the dense path is
        exactly today's. Either way they are rewritten over their own bytes: memory does not
        grow, and the weights stay in the loader's huge pages.
        """
        sparse = plan is not None and plan.active
        for layer in self.weights.layers:
            for group in GROUPS:
                weight = getattr(layer, group)
                if sparse == weight.is_contiguous():
                    setattr(layer, group, rewrite_in_place(weight, input_major=sparse))
        self._plan = plan if sparse else None
        self.sparsity = None if plan is None else plan.settings
        self.kv_version += 1
        self._decode_layers = _UNPREPARED  # the weights may have moved

    def decode_kernels(self) -> str:
        """What runs this model's decode steps, for the logs: on the CPU whether a step runs its
        layers in one C call (known after the first decode step), the variant of the linear
        kernel and, for a sparse model, of the sparse kernel."""
        device = self.weights.embed.device
        if device.type != "cpu":
            return f"{device.type}: torch and Triton kernels"
        if self._decode_layers is _UNPREPARED:
            step = "no decode step yet"
        elif self._decode_layers is None:
            step = "decode steps layer by layer"
        else:
            step = "decode steps in one C call"
        parts = [step, f"linear {cpu_linear.current_variant(self.dtype) or 'torch'}"]
        if self._plan is not None:
            kernel = sparse_kernels.cpu_kernel_available(self.dtype)
            parts.append(f"sparse {sparse_kernels.current_variant() if kernel else 'reference'}")
        return ", ".join(parts)

    def new_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype)

    def forward(
        self, batch: ForwardBatch, kv: KVCache, lora: LoraBatch | None = None
    ) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), vocab]; writes the new tokens' K/V.
        `lora`: the LoRA adapters of the batch's rows (None: every row runs the base model)."""
        return self.prepare(batch, kv, lora)()

    @torch.inference_mode()
    def prepare(
        self, batch: ForwardBatch, kv: KVCache, lora: LoraBatch | None = None
    ) -> Callable[[], torch.Tensor]:
        """forward made ready: its Python work now, the pass itself (and the K/V writes) when
        the returned function is called, once. A step prepares each of its models' passes
        before the first one runs: their Python then runs back to back while the caches are
        warm, not each after a model's weights have streamed through them."""
        meta = AttentionMetadata.from_batch(batch)
        # logits_indices ascend without repeats: as many as the rows means every row.
        every_row = len(batch.logits_indices) == batch.num_tokens
        one_call = self._decode_in_one_call(batch, meta, kv, lora, every_row)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                if one_call is None:
                    return self._lm_head(batch, self._layers(batch, meta, kv, lora), every_row)
                call, x, logits = one_call
                call.run()
                return logits if logits is not None else self._lm_head(batch, x, every_row)

        return run

    def _lm_head(self, batch: ForwardBatch, x: torch.Tensor, every_row: bool) -> torch.Tensor:
        rows = x if every_row else x[batch.logits_indices]
        logits = linear(rows, self.weights.lm_head)
        with serial_ops(logits.numel()):
            return logits.float()

    def _layers(
        self, batch: ForwardBatch, meta: AttentionMetadata, kv: KVCache, lora: LoraBatch | None
    ) -> torch.Tensor:
        """The embedding and every layer op by op; the final norm of every row."""
        hidden = F.embedding(batch.input_ids, self.weights.embed)
        cos, sin = self.rope.cos_sin(batch.positions, max(batch.context_lens, default=0))
        # Each layer ends with the residual add and the next norm in one call (the last layer
        # with the final norm): after a projection has streamed its weights through the caches,
        # every distinct call runs cold, at ~20 us.
        layers = self.weights.layers
        norms = [layer.input_norm for layer in layers] + [self.weights.final_norm]
        x = rms_norm(hidden, norms[0], self.config.rms_norm_eps)
        for index, (layer, following_norm) in enumerate(zip(layers, norms[1:], strict=True)):
            x = self._layer(index, layer, hidden, x, following_norm, cos, sin, meta, kv, lora)
        return x

    def _decode_in_one_call(
        self,
        batch: ForwardBatch,
        meta: AttentionMetadata,
        kv: KVCache,
        lora: LoraBatch | None,
        with_logits: bool,
    ) -> tuple[DecodeCall, torch.Tensor, torch.Tensor | None] | None:
        """A decode-only step from its token ids through every layer as one C call
        (kernels.cpu_decode: the same kernels in the same order as _layers, so the same bits,
        without Python between them), where nothing needs the Python path: no observer, no
        skip counter, adapters only through the dense C kernel. The call, made ready, and what
        it fills: the final norm of every row, and with_logits the logits of every row
        (float32) where it runs the LM head too. None where the step takes the Python path."""
        if self.observer is not None or self.skip_counter is not None or not meta.decode_only:
            return None
        adapters = None
        if lora is not None:
            adapters = lora.decode_params()
            if adapters is None:
                return None
        if self._decode_layers is _UNPREPARED:
            self._decode_layers = self._prepare_decode_layers()
        step = self._decode_layers
        if step is None or step.embedding is None:
            return None
        gathers = [meta.decode_gather(window) for window in self.config.sliding_windows]
        pairs = [(gather.slots, gather.lengths) for gather in gathers]
        m, hidden_size = batch.num_tokens, self.config.hidden_size
        hidden = torch.empty(m, hidden_size, dtype=self.dtype)
        x = torch.empty(m, hidden_size, dtype=self.dtype)
        cos, sin = self.rope.tables(max(batch.context_lens, default=0))
        logits = None
        if with_logits and step.lm_head is not None:
            logits = torch.empty(m, step.lm_head.shape[0], dtype=torch.float32)
        tokens = (batch.input_ids, batch.positions)
        call = step.plan(hidden, x, kv.keys, kv.values, pairs, cos, sin, meta.slot_mapping,
                         adapters, logits, tokens)  # fmt: skip
        return None if call is None else (call, x, logits)

    def _prepare_decode_layers(self) -> DecodeLayers | None:
        c, layers = self.config, self.weights.layers
        tensors = [
            (w.qkv, w.qkv_bias, w.qk_norm, w.o, w.o_bias, w.post_attention_norm, w.gate_up, w.down)
            for w in layers
        ]
        norms_after = [w.input_norm for w in layers[1:]] + [self.weights.final_norm]
        shape = DecodeShape(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        )
        sparsity = None
        if self._plan is not None:
            widths = group_in_features(c)
            sparsity = [
                [plans[group].kernel_args(widths[group]) for group in GROUPS]
                for plans in self._plan.layers
            ]
        embedding = (self.weights.embed, layers[0].input_norm)
        return DecodeLayers.prepare(
            tensors, norms_after, shape, c.rms_norm_eps, self._scale, sparsity,
            self.weights.lm_head, embedding,
        )  # fmt: skip

    def _layer(
        self,
        index: int,
        w: LayerWeights,
        hidden: torch.Tensor,
        x: torch.Tensor,
        following_norm: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        """Pre-norm attention and MLP blocks, each added into `hidden` in place; x is the
        layer's normed input. Returns the new hidden normed by `following_norm`."""
        eps = self.config.rms_norm_eps
        attn = self._attention(index, w, x, cos, sin, meta, kv, lora)
        attn_out = self._project(index, "o", attn, w.o, w.o_bias, lora)
        x = add_rms_norm(hidden, attn_out, w.post_attention_norm, eps)
        return add_rms_norm(hidden, self._mlp(index, w, x, lora), following_norm, eps)

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
        qkv = self._project(index, "qkv", x, w.qkv, w.qkv_bias, lora)
        # q and k heads are adjacent in each row, so the norm treats them as one block.
        qk = qkv[:, : c.q_size + c.kv_size].view(tokens, c.num_heads + c.num_kv_heads, c.head_dim)
        if w.qk_norm is not None:
            qk = rms_norm(qk, w.qk_norm, c.rms_norm_eps)
        q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]
        v = qkv[:, c.q_size + c.kv_size :].view(tokens, c.num_kv_heads, c.head_dim)
        rope_store_kv(q, k, v, cos, sin, kv.keys[index], kv.values[index], meta.slot_mapping)
        out = paged_attention(
            q, kv.keys[index], kv.values[index], meta, self._scale, c.sliding_windows[index]
        )
        return out.reshape(tokens, c.q_size)

    def _mlp(
        self, index: int, w: LayerWeights, x: torch.Tensor, lora: LoraBatch | None
    ) -> torch.Tensor:
        gate_up = self._project(index, "gate_up", x, w.gate_up, None, lora)
        return self._project(index, "down", silu_mul(gate_up), w.down, None, lora)

    def _project(
        self,
        index: int,
        group: str,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        """x @ weight.T + bias, plus the group's LoRA deltas; sparse when a plan is set."""
        if self.observer is not None:
            self.observer(index, group, x)
        if self._plan is None:
            out = linear(x, weight, bias)
        else:
            x, out = self._sparse_project(index, group, x, weight, bias, lora is not None)
        if lora is not None:
            lora.apply(index, group, x, out)
        return out

    def _sparse_project(
        self,
        index: int,
        group: str,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mask_input: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the input as the adapters see it, the output); the input is masked only for
        `mask_input` (LoRA must see the channels the base weights saw)."""
        assert self._plan is not None
        plan = self._plan.layers[index][group]
        counting = self.skip_counter is not None
        scores = channel_scores(x, plan.col_norms) if mask_input or counting else None
        thresholds = plan.thresholds(x, scores)
        if scores is not None:
            keep = scores >= thresholds[:, None]
            if self.skip_counter is not None:
                self.skip_counter.add(group, keep)
            if mask_input:  # +0 where dropped, as the one-call step's sparse kernel writes it
                x = x.masked_fill(~keep, 0)
        return x, sparse_linear(x, weight.t(), plan.col_norms, thresholds, bias)
