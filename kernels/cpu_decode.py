"""A decode step's decoder layers in one C call (kernels/csrc/cpu_ops.c: decode_layers).

Between two projections of a decode step, the weights a projection has just streamed evict
the interpreter's and torch's code and data from the caches, and each Python-level op after it
ran cold: ~20 us for an op that takes 2 warm. `DecodeLayers` runs every layer of a decode step
(m <= 16 rows, each one new token) in C: the very kernels and calls of the Python path (the
projections through kernels.cpu_linear's kernel, the norms, rotary embedding, cache writes,
attention and activation of kernels.cpu_ops), in its order, so the same bits. It releases the
GIL for the whole step, and runs it as one OpenMP parallel region whose threads share each op and
meet at a spinning barrier between ops: a region per op woke the sleeping thread ~200 times a
step where OpenMP waits passively (the server's setting), which on a virtual machine cost as
much as the step itself.

Prepared with the LM head, a call can also run it over the final norm's rows and widen its
output to float32 logits in the same region (the LM head's own call and `logits.float()` were
two more cold ops and a region); prepared with the embedding and layer 0's norm, it can start
from token ids and positions, gathering the embedding rows, their norm and each row's rotary
rows itself (three more cold ops).

A sparse model (WINA / TEAL) runs its projections through kernels.sparse's C kernel instead,
on weights stored input-channel-major, as the Python path does (same bits); where a group has
adapters, that kernel also writes the input with each row's dropped channels zeroed, the input
the adapters see (as in the Python path, engine.model).

It takes only what those kernels take (bf16 or float32, contiguous CPU tensors; multi-LoRA
only through kernels.cpu_linear's dense kernel): `DecodeLayers.prepare` returns None otherwise,
and a call that does not fit returns False having done nothing; the caller then runs the layers
op by op.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import cpu_linear, cpu_ops, sparse

# Per layer: qkv, qkv bias, q/k norm, o, o bias, post-attention norm, gate_up, down (None where
# the model has none), as engine.loader.LayerWeights holds them.
LayerTensors = tuple[
    Tensor, Tensor | None, Tensor | None, Tensor, Tensor | None, Tensor, Tensor, Tensor
]

# A sparse model's projection group (qkv, o, gate_up, down, in this order): its column norms
# (fp32 [K], WINA) or None (TEAL), then the channels each row keeps (top-k, 0 < keep < K) or 0
# and the calibrated threshold (fp32 [1]).
GroupSparsity = tuple[Tensor | None, int, Tensor | None]

# A layer's row of the C call's table (cpu_ops.c's LAYER_* fields): 9 weight addresses; keys,
# values, slots, lengths and the longest length; each projection group's LoRA params or 0; each
# group's column norms, keep and threshold addresses (0: dense).


@dataclass(frozen=True)
class DecodeShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


@dataclass(frozen=True)
class DecodeCall:
    """A decode step made ready by DecodeLayers.plan: decode_layers' arguments per chunk of
    rows, and the tensors their addresses point into (alive until the call has run)."""

    chunks: tuple[tuple[int | float, ...], ...]
    tensors: tuple[Tensor, ...]

    def run(self) -> None:
        module = cpu_ops._kernels()
        for arguments in self.chunks:
            module.decode_layers(*arguments)


class DecodeLayers:
    """A model's decoder layers for the one-call decode step, their weights checked once."""

    def __init__(
        self,
        layers: Sequence[LayerTensors],
        norms_after: Sequence[Tensor],
        shape: DecodeShape,
        eps: float,
        scale: float,
        sparsity: Sequence[Sequence[GroupSparsity]] | None = None,
        lm_head: Tensor | None = None,
        embedding: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.shape, self.eps, self.scale = shape, eps, scale
        self.lm_head = lm_head
        self.embedding = embedding
        self.dtype = layers[0][0].dtype
        self.num_layers = len(layers)
        self.has_qk_norm = layers[0][2] is not None
        self.sparse = sparsity is not None
        self._sparse_entry = sparse.entry_address(self.dtype) if self.sparse else 0
        # The tensors stay referenced here, so their addresses stay valid.
        self._tensors = [(*layer, norm) for layer, norm in zip(layers, norms_after, strict=True)]
        self._sparsity = sparsity
        self._static = [
            [0 if t is None else t.data_ptr() for t in tensors] for tensors in self._tensors
        ]
        self._sparse_fields = [
            [0] * 12 if sparsity is None else _sparse_fields(groups)
            for groups in (sparsity or [None] * self.num_layers)
        ]
        self._plain_tails = [[0] * 4 + fields for fields in self._sparse_fields]
        self._kv: tuple[list[Tensor], list[Tensor], list[tuple[int, int]]] | None = None
        # The last call's table and what it was built from (a decode step's sequences make the
        # same table step after step), and the ops' scratch for MAX_ROWS rows: after the
        # weights stream, each Python-level tensor op before the C call runs cold.
        self._table: tuple[tuple, Tensor] | None = None
        self._scratch: dict[str, Tensor] = {}

    @classmethod
    def prepare(
        cls,
        layers: Sequence[LayerTensors],
        norms_after: Sequence[Tensor],
        shape: DecodeShape,
        eps: float,
        scale: float,
        sparsity: Sequence[Sequence[GroupSparsity]] | None = None,
        lm_head: Tensor | None = None,
        embedding: tuple[Tensor, Tensor] | None = None,
    ) -> DecodeLayers | None:
        """The step, or None where the kernels cannot take these weights. norms_after[i]: the
        norm that follows layer i (the next layer's input norm; the final norm last).
        sparsity[i]: layer i's groups, for a sparse model, whose four projection weights are
        then transposed views (W.T contiguous). lm_head [vocab, hidden]: calls may ask for the
        logits too; embedding (the embedding [vocab, hidden] and layer 0's input norm
        [hidden]): calls may start from token ids. Without them (or where the kernels cannot
        take them) they cannot."""
        module = cpu_ops._kernels()
        if module is None or not hasattr(module, "decode_layers") or not layers:
            return None
        dtype = layers[0][0].dtype
        if dtype not in (torch.bfloat16, torch.float32) or not cpu_linear.kernel_available(dtype):
            return None
        hidden, d = shape.hidden_size, shape.head_dim
        q_size, kv_size = shape.num_heads * d, shape.num_kv_heads * d
        qkv_width, f = q_size + 2 * kv_size, shape.intermediate_size
        if shape.num_kv_heads < 1 or shape.num_heads % shape.num_kv_heads or d % 2:
            return None
        expected = (
            (qkv_width, hidden),
            (qkv_width,),
            (shape.num_heads + shape.num_kv_heads, d),  # q's norm per q head, then k's
            (hidden, q_size),
            (hidden,),
            (hidden,),
            (2 * f, hidden),
            (hidden, f),
        )
        if len(norms_after) != len(layers):
            return None
        qk_norms = {layer[2] is None for layer in layers}
        if len(qk_norms) != 1:
            return None
        projections = (0, 3, 6, 7)  # qkv, o, gate_up, down: transposed views in a sparse model
        for layer, norm in zip(layers, norms_after, strict=True):
            if any(layer[i] is None for i in projections):
                return None
            for i, (tensor, wanted) in enumerate(
                zip((*layer, norm), (*expected, (hidden,)), strict=True)
            ):
                if tensor is None:
                    continue
                stored = tensor.t() if sparsity is not None and i in projections else tensor
                if (
                    tensor.dtype is not dtype
                    or not tensor.is_cpu
                    or not stored.is_contiguous()
                    or tuple(tensor.shape) != wanted
                    or tensor.requires_grad
                ):
                    return None
        if sparsity is not None and not _sparsity_fits(sparsity, layers, dtype):
            return None
        if lm_head is not None and not (
            lm_head.dim() == 2
            and _rows(lm_head, lm_head.shape[0], hidden, dtype)
            and not lm_head.requires_grad
        ):
            lm_head = None
        if embedding is not None and not (
            embedding[0].dim() == 2
            and _rows(embedding[0], embedding[0].shape[0], hidden, dtype)
            and _rows(embedding[1].view(1, -1), 1, hidden, dtype)
            and not any(t.requires_grad for t in embedding)
        ):
            embedding = None
        return cls(layers, norms_after, shape, eps, scale, sparsity, lm_head, embedding)

    def __call__(self, *args: object, **kwargs: object) -> bool:
        """plan(*args, **kwargs)'s step run at once; False, having done nothing, where plan
        gives None."""
        call = self.plan(*args, **kwargs)  # type: ignore[arg-type]
        if call is None:
            return False
        call.run()
        return True

    def plan(
        self,
        hidden: Tensor,
        x: Tensor,
        keys: list[Tensor],
        values: list[Tensor],
        gathers: Sequence[tuple[Tensor, Tensor]],
        cos: Tensor,
        sin: Tensor,
        slot_mapping: Tensor,
        adapters: Sequence[Sequence[Tensor | None]] | None = None,
        logits: Tensor | None = None,
        tokens: tuple[Tensor, Tensor] | None = None,
    ) -> DecodeCall | None:
        """Every layer, when the call runs: hidden [m, H] (the residual stream) is updated in
        place and x [m, H] (layer 0's normed input) ends as the final norm of hidden, as the
        layers one by one would leave them. keys and values: the KV cache's per-layer pools;
        gathers[i]: the decode gather (slots [m, L] int64, lengths [m] int64) layer i attends
        (layers of one window share the very same tensors); cos and sin [m, D / 2];
        slot_mapping [m] int64: where the new keys and values go; adapters[i]: the multi-LoRA
        params (kernels.cpu_linear.LoraDense.params) of layer i's qkv, o, gate_up and down,
        None where a group has none; logits (float32 [m, vocab], only with an LM head): filled
        with x's rows through it, as linear(x, lm_head).float() would. tokens (token ids [m]
        and positions [m], int64; only with the embedding): the call starts from them, writing
        hidden (their embedding rows) and x (its norm) first, and cos and sin are the rotary
        tables [P, D / 2] whose row p is position p's (IndexError where an id or a position is
        outside its table).

        Checks and addresses now, the step when the DecodeCall runs (once): a decode step
        prepares all its models' calls before the first one streams its weights through the
        caches. None where a tensor does not fit. Calls share their scratch: one runs at a time.

        A batch of more than MAX_ROWS rows runs as near-equal chunks of at most MAX_ROWS (each
        row's arithmetic is the same in any batch, so the same bits); not with adapters, whose
        params describe the whole batch."""
        dtype, shape, m = self.dtype, self.shape, hidden.shape[0]
        linear = cpu_linear.entry_address(dtype)
        if (
            not linear
            or m <= 0
            or (adapters is not None and m > cpu_linear.MAX_ROWS)
            or len(gathers) != self.num_layers
            or not _rows(hidden, m, shape.hidden_size, dtype)
            or not _rows(x, m, shape.hidden_size, dtype)
            or not _rows(cos, cos.shape[0] if tokens else m, shape.head_dim // 2, dtype)
            or not _rows(sin, cos.shape[0] if tokens else m, shape.head_dim // 2, dtype)
            or not _vector(slot_mapping, m)
            or (
                tokens is not None
                and (self.embedding is None or not all(_vector(t, m) for t in tokens))
            )
            or (torch.is_grad_enabled() and (hidden.requires_grad or x.requires_grad))
        ):
            return None
        if logits is not None and (
            self.lm_head is None or not _rows(logits, m, self.lm_head.shape[0], torch.float32)
        ):
            return None
        kv = self._kv_addresses(keys, values)
        if kv is None:
            return None
        # The distinct gathers (one per window), and the one each layer attends.
        found: dict[int, int] = {}
        distinct: list[tuple[Tensor, Tensor]] = []
        for slots, lengths in gathers:
            if id(slots) not in found:
                if not (
                    slots.dim() == 2
                    and slots.shape[1] > 0
                    and _rows(slots, m, slots.shape[1], torch.int64)
                    and _vector(lengths, m)
                ):
                    return None
                found[id(slots)] = len(distinct)
                distinct.append((slots, lengths))
        which = tuple(found[id(slots)] for slots, _ in gathers)
        lora = 0
        tails = self._plain_tails  # per layer the table's fields after the gather's
        if adapters is not None:
            lora = cpu_linear.lora_entry_address(dtype)
            if not lora or len(adapters) != self.num_layers:
                return None
            if any(len(layer) != 4 for layer in adapters):
                return None
            tails = [
                [0 if p is None else p.data_ptr() for p in layer] + sparse_fields
                for layer, sparse_fields in zip(adapters, self._sparse_fields, strict=True)
            ]
        table = self._table_for(kv, which, tails)
        chunks = -(-m // cpu_linear.MAX_ROWS)
        if tokens is not None and chunks > 1:  # each call checks its own rows: check all first
            assert self.embedding is not None
            _check_indices(tokens[0], self.embedding[0].shape[0])
            _check_indices(tokens[1], cos.shape[0])
        bounds = [m * i // chunks for i in range(chunks + 1)]
        calls, kept = [], [table, hidden, x, cos, sin, slot_mapping, *itertools.chain(*distinct)]
        for begin, end in itertools.pairwise(bounds):
            rows = slice(begin, end)
            # Where this chunk's rows of each gather (int64, contiguous) start.
            chunk_gathers = torch.tensor(
                [
                    [
                        slots.data_ptr() + begin * slots.shape[1] * 8,
                        lengths.data_ptr() + begin * 8,
                        slots.shape[1],
                    ]
                    for slots, lengths in distinct
                ],
                dtype=torch.int64,
            )
            kept.append(chunk_gathers)
            calls.append(
                self._arguments(
                    table, chunk_gathers, hidden[rows], x[rows],
                    (cos, sin) if tokens else (cos[rows], sin[rows]), slot_mapping[rows], linear,
                    lora, None if logits is None else logits[rows],
                    None if tokens is None else (tokens[0][rows], tokens[1][rows]),
                )
            )  # fmt: skip
        kept.extend(t for t in (logits, *(tokens or ())) if t is not None)
        if adapters is not None:
            kept.extend(p for layer in adapters for p in layer if p is not None)
        return DecodeCall(tuple(calls), tuple(kept))

    def _table_for(
        self, kv: list[tuple[int, int]], which: tuple[int, ...], tails: list[list[int]]
    ) -> Tensor:
        """The C call's per-layer table (cpu_ops.c's LAYER_* fields), made again only when
        the KV pools, the layers' gathers or the adapters' params differ from the last call's."""
        key = (kv, which, None if tails is self._plain_tails else [*map(tuple, tails)])
        if self._table is None or self._table[0] != key:
            rows = [
                [*static, key_at, value_at, gather, *tail]
                for static, (key_at, value_at), gather, tail in zip(
                    self._static, kv, which, tails, strict=True
                )
            ]
            self._table = (key, torch.tensor(rows, dtype=torch.int64))
        return self._table[1]

    def _scratch_addresses(self) -> dict[str, int]:
        """Where the ops' scratch buffers start: [MAX_ROWS, width] each, made once (a call of
        m rows uses their first m rows)."""
        if not self._scratch:
            shape, rows = self.shape, cpu_linear.MAX_ROWS
            d, hq, hk = shape.head_dim, shape.num_heads, shape.num_kv_heads
            f = shape.intermediate_size
            widths = {
                "qkv": (hq + 2 * hk) * d,
                "qk": (hq + hk) * d,
                "attn": hq * d,
                "proj": shape.hidden_size,
                "gate_up": 2 * f,
                "act": f,
                "masked": max(shape.hidden_size, hq * d, f),
            }
            if self.lm_head is not None and self.dtype is torch.bfloat16:
                widths["lm_out"] = self.lm_head.shape[0]
            self._scratch = {
                name: torch.empty(rows, width, dtype=self.dtype) for name, width in widths.items()
            }
        return {name: buffer.data_ptr() for name, buffer in self._scratch.items()}

    def _arguments(
        self,
        table: Tensor,
        gathers: Tensor,
        hidden: Tensor,
        x: Tensor,
        rotary: tuple[Tensor, Tensor],
        slot_mapping: Tensor,
        linear: int,
        lora: int,
        logits: Tensor | None,
        tokens: tuple[Tensor, Tensor] | None,
    ) -> tuple[int | float, ...]:
        """decode_layers' arguments for at most MAX_ROWS rows; gathers: these rows' decode
        gathers; rotary: their cos and sin rows, or with tokens the tables."""
        shape, m = self.shape, hidden.shape[0]
        scratch = self._scratch_addresses()
        qk = scratch["qk"] if self.has_qk_norm else scratch["qkv"]
        # Only where a sparse model's adapters read each group's input.
        masked = scratch["masked"] if lora and self.sparse else 0
        lm_head = lm_out = vocab = 0
        if logits is not None:
            assert self.lm_head is not None
            lm_head, vocab = self.lm_head.data_ptr(), self.lm_head.shape[0]
            lm_out = scratch.get("lm_out", 0)
        ids = embed = embed_rows = first_norm = positions = 0
        if tokens is not None:
            assert self.embedding is not None
            ids, positions = tokens[0].data_ptr(), tokens[1].data_ptr()
            embed, embed_rows = self.embedding[0].data_ptr(), self.embedding[0].shape[0]
            first_norm = self.embedding[1].data_ptr()
        cos, sin = rotary
        d, hq, hk, f = shape.head_dim, shape.num_heads, shape.num_kv_heads, shape.intermediate_size
        return (
            cpu_ops._DTYPES[self.dtype], table.data_ptr(), gathers.data_ptr(), self.num_layers,
            m, shape.hidden_size, hq, hk, d, f, hidden.data_ptr(), x.data_ptr(), scratch["qkv"],
            qk, scratch["attn"], scratch["proj"], scratch["gate_up"], scratch["act"], masked,
            cos.data_ptr(),
            sin.data_ptr(), slot_mapping.data_ptr(), self.eps, self.scale, linear, lora,
            self._sparse_entry, lm_head, vocab, lm_out,
            0 if logits is None else logits.data_ptr(), torch.get_num_threads(), ids, embed,
            embed_rows, first_norm, positions, cos.shape[0],
        )  # fmt: skip

    def _kv_addresses(
        self, keys: list[Tensor], values: list[Tensor]
    ) -> list[tuple[int, int]] | None:
        """Per layer the pools' addresses, checked once per KV cache (its pools never move)."""
        if self._kv is not None and self._kv[0] is keys and self._kv[1] is values:
            return self._kv[2]
        shape = self.shape
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            return None
        for pool in (*keys, *values):
            if (
                pool.dtype is not self.dtype
                or not pool.is_cpu
                or not pool.is_contiguous()
                or pool.dim() != 3
                or tuple(pool.shape[1:]) != (shape.num_kv_heads, shape.head_dim)
            ):
                return None
        addresses = [(k.data_ptr(), v.data_ptr()) for k, v in zip(keys, values, strict=True)]
        self._kv = (keys, values, addresses)
        return addresses


def _sparsity_fits(
    sparsity: Sequence[Sequence[GroupSparsity]],
    layers: Sequence[LayerTensors],
    dtype: torch.dtype,
) -> bool:
    """Four groups per layer the sparse kernel can take, and the kernel is there."""
    if len(sparsity) != len(layers) or not sparse.entry_address(dtype):
        return False
    for groups, layer in zip(sparsity, layers, strict=True):
        if len(groups) != 4:
            return False
        for (norms, keep, threshold), weight in zip(
            groups, (layer[0], layer[3], layer[6], layer[7]), strict=True
        ):
            k = weight.shape[1]
            if norms is not None and not _fp32(norms, k):
                return False
            if not (0 < keep < k if threshold is None else keep == 0 and _fp32(threshold, 1)):
                return False
    return True


def _sparse_fields(groups: Sequence[GroupSparsity]) -> list[int]:
    """The table's per-group norms, keep and threshold fields (cpu_ops.c's LAYER_NORMS_QKV...)."""
    norms = [0 if n is None else n.data_ptr() for n, _, _ in groups]
    keeps = [keep for _, keep, _ in groups]
    thresholds = [0 if t is None else t.data_ptr() for _, _, t in groups]
    return norms + keeps + thresholds


def _check_indices(indices: Tensor, size: int) -> None:
    if int(indices.min()) < 0 or int(indices.max()) >= size:
        raise IndexError("decode_layers: a token id or position is out of range")


def _fp32(t: Tensor, length: int) -> bool:
    """t is a contiguous CPU float32 [length] tensor."""
    return t.dtype is torch.float32 and t.is_cpu and t.shape == (length,) and t.is_contiguous()


def _vector(t: Tensor, m: int) -> bool:
    """t is a contiguous CPU int64 [m] tensor."""
    return t.dtype is torch.int64 and t.is_cpu and t.shape == (m,) and t.is_contiguous()


def _rows(t: Tensor, m: int, width: int, dtype: torch.dtype) -> bool:
    """t is a contiguous CPU [m, width] tensor of dtype."""
    return (
        t.dtype is dtype
        and t.is_cpu
        and t.dim() == 2
        and t.shape[0] == m
        and t.shape[1] == width
        and t.is_contiguous()
    )
