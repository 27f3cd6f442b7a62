"""kernels.cpu_decode: a decode step's layers in one C call against the same kernels called one
by one from Python (bit for bit), and what it refuses."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_linear, cpu_ops, lora, sparse
from kernels.cpu_decode import DecodeLayers, DecodeShape
from kernels.lora import LoraMapping, LoraStack

# Where the CPU runs a variant of the sparse kernel, it must build (run_both asserts it).
SPARSE_MISSING = "" if sparse.variants() else "AVX-512 and AVX2 for the sparse kernel"
SHAPE = DecodeShape(hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=40)
SLOTS = 200  # room for 25 sequences of 8 distinct slots
EPS, SCALE = 1e-6, 0.25

pytestmark = pytest.mark.skipif(
    not (cpu_ops.kernel_available() and cpu_linear.kernel_available(torch.float32)),
    reason="this CPU has no compiled kernels",
)


def make_layers(
    dtype: torch.dtype,
    layers: int,
    qk_norm: bool,
    bias: bool,
    seed: int = 0,
    shape: DecodeShape = SHAPE,
):
    generator = torch.Generator().manual_seed(seed)
    h, d, f = shape.hidden_size, shape.head_dim, shape.intermediate_size
    q, kv = shape.num_heads * d, shape.num_kv_heads * d

    def rand(*shape: int, scale: float = 0.2, offset: float = 0.0) -> torch.Tensor:
        return (offset + scale * torch.randn(*shape, generator=generator)).to(dtype)

    tensors = [
        (
            rand(q + 2 * kv, h),
            rand(q + 2 * kv) if bias else None,
            rand(shape.num_heads + shape.num_kv_heads, d, offset=1.0) if qk_norm else None,
            rand(h, q),
            rand(h) if bias else None,
            rand(h, offset=1.0),
            rand(2 * f, h),
            rand(h, f),
        )
        for _ in range(layers)
    ]
    norms_after = [rand(h, offset=1.0) for _ in range(layers)]
    return tensors, norms_after


def make_step(dtype: torch.dtype, m: int, layers: int, seed: int = 1, shape: DecodeShape = SHAPE):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, shape.hidden_size, generator=generator).to(dtype)
    x = torch.randn(m, shape.hidden_size, generator=generator).to(dtype)
    pool = (SLOTS, shape.num_kv_heads, shape.head_dim)
    keys = [torch.randn(pool, generator=generator).to(dtype) for _ in range(layers)]
    values = [torch.randn(pool, generator=generator).to(dtype) for _ in range(layers)]
    lengths = torch.randint(3, 9, (m,), generator=generator)  # 3..8 keys per sequence
    slots = torch.randperm(SLOTS, generator=generator)[: m * 8].view(m, 8)
    slot_mapping = slots[torch.arange(m), lengths - 1].contiguous()  # the new token's slot
    angles = torch.rand(m, shape.head_dim // 2, generator=generator) * 6
    return (
        hidden,
        x,
        keys,
        values,
        (slots, lengths),
        angles.cos().to(dtype),
        angles.sin().to(dtype),
        slot_mapping,
    )


def one_by_one(
    tensors,
    norms_after,
    hidden,
    x,
    keys,
    values,
    gather,
    cos,
    sin,
    slot_mapping,
    shape: DecodeShape = SHAPE,
    adapters=None,
    sparsity=None,
    mask_adapter_input: bool = True,
):
    """The layers as engine.model runs them op by op; adapters: per layer the LoraStack of qkv,
    o, gate_up and down, and the rows' LoraMapping; sparsity: per layer the four groups'
    (norms, keep, threshold), the projections then through kernels.sparse, and the adapters
    on the input with each row's dropped channels zeroed (on all of it without
    mask_adapter_input: a guard)."""
    m, d = hidden.shape[0], shape.head_dim
    hq, hk = shape.num_heads, shape.num_kv_heads
    stacks, mapping = adapters if adapters is not None else ([None] * len(tensors), None)
    groups_of = sparsity if sparsity is not None else [None] * len(tensors)

    def project(x, w, b, layer_stacks, groups, group):
        if groups is None:
            y = cpu_linear.linear(x, w, b)
        else:
            norms, keep, threshold = groups[group]
            thresholds = sparse.input_top_k_thresholds(x, norms, keep) if keep else threshold
            y = sparse.sparse_linear(x, w.t(), norms, thresholds, b)
            if mask_adapter_input:
                kept = sparse.channel_scores(x, norms) >= thresholds.view(-1)[:, None].float()
                x = x.masked_fill(~kept, 0)
        return y if layer_stacks is None else lora.lora_ref(y, x, layer_stacks[group], mapping)

    for layer, following, k_pool, v_pool, own, groups in zip(
        tensors, norms_after, keys, values, stacks, groups_of, strict=True
    ):
        qkv_w, qkv_b, qk_norm, o, o_b, post, gate_up, down = layer
        qkv = project(x, qkv_w, qkv_b, own, groups, 0)
        qk = qkv[:, : (hq + hk) * d].view(m, hq + hk, d)
        if qk_norm is not None:
            qk = cpu_ops.rms_norm(qk, qk_norm, EPS)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, (hq + hk) * d :].view(m, hk, d)
        cpu_ops.rope_store_kv(q, k, v, cos, sin, k_pool, v_pool, slot_mapping)
        attn = cpu_ops.decode_attention(q, k_pool, v_pool, gather[0], gather[1], SCALE)
        x = cpu_ops.add_rms_norm(
            hidden, project(attn.reshape(m, hq * d), o, o_b, own, groups, 1), post, EPS
        )
        act = cpu_ops.silu_mul(project(x, gate_up, None, own, groups, 2))
        x = cpu_ops.add_rms_norm(hidden, project(act, down, None, own, groups, 3), following, EPS)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("m", "qk_norm", "bias"), [(1, False, True), (5, True, False), (16, False, False)]
)
def test_one_call_is_the_kernels_one_by_one(
    dtype: torch.dtype, m: int, qk_norm: bool, bias: bool
) -> None:
    if not cpu_linear.kernel_available(dtype):
        pytest.skip(f"no {dtype} kernel on this CPU")
    tensors, norms_after = make_layers(dtype, 3, qk_norm, bias)
    # The LM head too: a vocabulary that is no multiple of a block's rows.
    lm_head = (0.2 * torch.randn(301, SHAPE.hidden_size, generator=torch.Generator())).to(dtype)
    step = DecodeLayers.prepare(tensors, norms_after, SHAPE, EPS, SCALE, lm_head=lm_head)
    assert step is not None and step.lm_head is lm_head
    hidden, x, keys, values, gather, cos, sin, slot_mapping = make_step(dtype, m, 3)
    copies = [t.clone() for t in (hidden, x, *keys, *values)]
    logits = torch.full((m, 301), float("nan"))
    assert step(hidden, x, keys, values, [gather] * 3, cos, sin, slot_mapping, logits=logits)
    ref_hidden, ref_x = copies[0], copies[1]
    ref_keys, ref_values = copies[2:5], copies[5:8]
    ref_x = one_by_one(
        tensors,
        norms_after,
        ref_hidden,
        ref_x,
        ref_keys,
        ref_values,
        gather,
        cos,
        sin,
        slot_mapping,
    )
    assert torch.equal(x, ref_x) and torch.equal(hidden, ref_hidden)
    for got, wanted in zip((*keys, *values), (*ref_keys, *ref_values), strict=True):
        assert torch.equal(got, wanted)
    assert torch.equal(logits, cpu_linear.linear(ref_x, lm_head).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [3, cpu_linear.MAX_ROWS + 5])
def test_from_token_ids_is_from_their_rows(dtype: torch.dtype, m: int) -> None:
    """A call from token ids and positions (the embedding, the first norm and the rotary rows
    read in C) equals one given the rows the Python path gathers; an id or a position outside
    its table raises IndexError, having written nothing."""
    if not cpu_linear.kernel_available(dtype):
        pytest.skip(f"no {dtype} kernel on this CPU")
    generator = torch.Generator().manual_seed(9)
    tensors, norms_after = make_layers(dtype, 3, qk_norm=True, bias=True)
    embed = (0.5 * torch.randn(50, SHAPE.hidden_size, generator=generator)).to(dtype)
    first_norm = (1 + 0.2 * torch.randn(SHAPE.hidden_size, generator=generator)).to(dtype)
    angles = torch.rand(20, SHAPE.head_dim // 2, generator=generator) * 6
    cos_table, sin_table = angles.cos().to(dtype), angles.sin().to(dtype)
    step = DecodeLayers.prepare(
        tensors, norms_after, SHAPE, EPS, SCALE, embedding=(embed, first_norm)
    )
    assert step is not None and step.embedding is not None
    _, _, keys, values, gather, _, _, slot_mapping = make_step(dtype, m, 3)
    ids = torch.randint(0, 50, (m,), generator=generator)
    positions = torch.randint(0, 20, (m,), generator=generator)
    pools = [t.clone() for t in (*keys, *values)]
    hidden = embed[ids]
    x = cpu_ops.rms_norm(hidden, first_norm, EPS)
    assert step(hidden, x, keys, values, [gather] * 3, cos_table[positions],
                sin_table[positions], slot_mapping)  # fmt: skip
    from_ids = torch.full_like(hidden, float("nan")), torch.full_like(x, float("nan"))
    assert step(*from_ids, pools[:3], pools[3:], [gather] * 3, cos_table, sin_table,
                slot_mapping, tokens=(ids, positions))  # fmt: skip
    assert torch.equal(from_ids[0], hidden) and torch.equal(from_ids[1], x)
    for got, wanted in zip(pools, (*keys, *values), strict=True):
        assert torch.equal(got, wanted)
    before = [t.clone() for t in pools]
    bad_id, bad_position = ids.clone(), positions.clone()
    bad_id[m - 1], bad_position[m - 1] = 50, 20  # the last row: past the first chunk's
    for tokens in ((bad_id, positions), (ids, bad_position)):
        with pytest.raises(IndexError):
            step(*from_ids, pools[:3], pools[3:], [gather] * 3, cos_table, sin_table,
                 slot_mapping, tokens=tokens)  # fmt: skip
        for got, wanted in zip(pools, before, strict=True):
            assert torch.equal(got, wanted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["dense", "top-k"])
def test_more_rows_than_the_kernels_take_are_each_row_alone(dtype: torch.dtype, mode: str) -> None:
    """MAX_ROWS + 5 rows run in chunks: each row ends as the kernels one by one leave it run
    alone (rows attend to their own slots only, so alone means the same pools)."""
    if not cpu_linear.kernel_available(dtype) or (mode != "dense" and SPARSE_MISSING):
        pytest.skip(f"no {dtype} kernel, or this CPU lacks {SPARSE_MISSING}")
    m = cpu_linear.MAX_ROWS + 5
    tensors, norms_after = make_layers(dtype, 3, qk_norm=True, bias=True)
    sparsity = None
    if mode != "dense":
        tensors, sparsity = sparse_model(tensors, mode)
    lm_head = (0.2 * torch.randn(77, SHAPE.hidden_size, generator=torch.Generator())).to(dtype)
    step = DecodeLayers.prepare(tensors, norms_after, SHAPE, EPS, SCALE, sparsity, lm_head)
    assert step is not None
    hidden, x, keys, values, gather, cos, sin, slot_mapping = make_step(dtype, m, 3)
    copies = [t.clone() for t in (hidden, x, *keys, *values)]
    logits = torch.empty(m, 77)
    assert step(hidden, x, keys, values, [gather] * 3, cos, sin, slot_mapping, logits=logits)
    ref_hidden, ref_keys, ref_values = copies[0], copies[2:5], copies[5:8]
    slots, lengths = gather
    for r in range(m):
        row = slice(r, r + 1)
        ref_x = one_by_one(
            tensors, norms_after, ref_hidden[row], copies[1][row], ref_keys, ref_values,
            (slots[row], lengths[row]), cos[row], sin[row], slot_mapping[row],
            sparsity=sparsity,
        )  # fmt: skip
        assert torch.equal(x[row], ref_x), f"row {r}"
        assert torch.equal(logits[row], cpu_linear.linear(ref_x, lm_head).float()), f"row {r}"
    assert torch.equal(hidden, ref_hidden)
    for got, wanted in zip((*keys, *values), (*ref_keys, *ref_values), strict=True):
        assert torch.equal(got, wanted)


# Large enough for every op to be shared by the threads at 16 rows (as a 4096-wide model's are).
WIDE = DecodeShape(
    hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=4096
)


def make_adapters(dtype: torch.dtype, m: int, shape: DecodeShape, slots: int = 4, rank: int = 16):
    """A LoraStack per projection group (rank-16 slots), and a mapping in which row i uses slot
    i % (slots + 1), the last choice being no adapter."""
    generator = torch.Generator().manual_seed(3)
    h, d, f = shape.hidden_size, shape.head_dim, shape.intermediate_size
    q, kv = shape.num_heads * d, shape.num_kv_heads * d
    groups = [
        (h, ((0, q), (q, kv), (q + kv, kv))),
        (q, ((0, h),)),
        (h, ((0, f), (f, f))),
        (f, ((0, h),)),
    ]
    stacks = []
    for k, slices in groups:
        a = torch.randn(len(slices), slots * rank, k, generator=generator) / k**0.5
        b = torch.randn(sum(w for _, w in slices), slots * rank, generator=generator) * 0.05
        stacks.append(LoraStack(a.to(dtype), b.to(dtype), slices, (rank,) * slots))
    runs = [(i, 1, [(i % (slots + 1), 1.0)] if i % (slots + 1) < slots else []) for i in range(m)]
    return stacks, LoraMapping.build(m, slots, runs)


def adapter_params(stacks, mapping, m: int, dtype: torch.dtype) -> list:
    """Each group's multi-LoRA params for m rows (what LoraBatch.decode_params hands the step)."""
    params = [
        stack.dense_call().params(
            m,
            mapping.column_mask(stack.slot_ranks, dtype),
            mapping.idle_groups(stack.slot_ranks, len(stack.slices)),
        )
        for stack in stacks
    ]
    assert all(p is not None for p in params)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("variant", ["default", "avx2"])
def test_one_call_shares_every_op_between_threads(dtype: torch.dtype, m: int, variant: str) -> None:
    """A layer wide enough that two threads share every projection, the LoRA shrink and
    expands, the attention and (at 16 rows) the norms, rotary and activation: the same bits as
    the kernels one by one; with the default kernels, and with the AVX2 ones (their own
    multi-LoRA expand, shared by the team; the default where the CPU has no AVX-512)."""
    if not cpu_linear.kernel_available(dtype):
        pytest.skip(f"no {dtype} kernel on this CPU")
    default = cpu_linear.variants(dtype)[0]
    if variant != "default":
        cpu_linear.set_variant(dtype, variant)  # every CPU with a kernel has the AVX2 one
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tensors, norms_after = make_layers(dtype, 1, qk_norm=True, bias=True, shape=WIDE)
        step = DecodeLayers.prepare(tensors, norms_after, WIDE, EPS, SCALE)
        assert step is not None
        hidden, x, keys, values, gather, cos, sin, slot_mapping = make_step(dtype, m, 1, shape=WIDE)
        stacks, mapping = make_adapters(dtype, m, WIDE)
        params = adapter_params(stacks, mapping, m, dtype)
        copies = [t.clone() for t in (hidden, x, *keys, *values)]
        assert step(hidden, x, keys, values, [gather], cos, sin, slot_mapping, [params])
        ref_x = one_by_one(
            tensors, norms_after, copies[0], copies[1], copies[2:3], copies[3:4], gather, cos,
            sin, slot_mapping, WIDE, ([stacks], mapping),
        )  # fmt: skip
        assert torch.equal(x, ref_x) and torch.equal(hidden, copies[0])
        assert torch.equal(keys[0], copies[2]) and torch.equal(values[0], copies[3])
    finally:
        torch.set_num_threads(threads)
        cpu_linear.set_variant(dtype, default)


def sparse_model(tensors, mode: str):
    """The layers with their projections stored input-channel-major (as engine.model keeps a
    sparse model's), and per layer the four groups' (norms, keep, threshold): WINA top-k keeping
    half of each group's channels, or TEAL with one threshold."""
    projections = (0, 3, 6, 7)
    stored = [
        tuple(
            t.t().contiguous().t() if i in projections and t is not None else t
            for i, t in enumerate(layer)
        )
        for layer in tensors
    ]
    sparsity = []
    for layer in tensors:
        groups = []
        for i in projections:
            k = layer[i].shape[1]
            if mode == "top-k":
                norms = torch.linalg.vector_norm(layer[i].float(), dim=0).contiguous()
                groups.append((norms, k // 2, None))
            else:
                groups.append((None, 0, torch.tensor([0.5])))
        sparsity.append(groups)
    return stored, sparsity


def run_both(
    tensors,
    norms_after,
    sparsity,
    shape: DecodeShape,
    m: int,
    dtype: torch.dtype,
    with_adapters: bool = False,
):
    """(the one call's x, hidden, keys, values; the kernels one by one's), every layer with
    make_adapters' adapters where with_adapters."""
    layers = len(tensors)
    step = DecodeLayers.prepare(tensors, norms_after, shape, EPS, SCALE, sparsity)
    assert step is not None and step.sparse
    hidden, x, keys, values, gather, cos, sin, slot_mapping = make_step(
        dtype, m, layers, shape=shape
    )
    adapters, params = None, None
    if with_adapters:
        stacks, mapping = make_adapters(dtype, m, shape)
        adapters = ([stacks] * layers, mapping)
        params = [adapter_params(stacks, mapping, m, dtype)] * layers
    copies = [t.clone() for t in (hidden, x, *keys, *values)]
    assert step(hidden, x, keys, values, [gather] * layers, cos, sin, slot_mapping, params)
    ref_keys, ref_values = copies[2 : 2 + layers], copies[2 + layers :]
    ref_x = one_by_one(
        tensors, norms_after, copies[0], copies[1], ref_keys, ref_values, gather, cos, sin,
        slot_mapping, shape, adapters, sparsity,
    )  # fmt: skip
    return (x, hidden, keys, values), (ref_x, copies[0], ref_keys, ref_values)


@pytest.mark.usefixtures("sparse_variant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["top-k", "threshold"])
@pytest.mark.parametrize(("m", "qk_norm", "bias"), [(1, False, True), (5, True, False)])
def test_sparse_one_call_is_the_sparse_kernels_one_by_one(
    dtype: torch.dtype, mode: str, m: int, qk_norm: bool, bias: bool
) -> None:
    if not cpu_linear.kernel_available(dtype) or SPARSE_MISSING:
        pytest.skip(f"no {dtype} kernel, or this CPU lacks {SPARSE_MISSING}")
    tensors, norms_after = make_layers(dtype, 3, qk_norm, bias)
    stored, sparsity = sparse_model(tensors, mode)
    (x, hidden, keys, values), (ref_x, ref_hidden, ref_keys, ref_values) = run_both(
        stored, norms_after, sparsity, SHAPE, m, dtype
    )
    assert torch.equal(x, ref_x) and torch.equal(hidden, ref_hidden)
    for got, wanted in zip((*keys, *values), (*ref_keys, *ref_values), strict=True):
        assert torch.equal(got, wanted)
    # Guard: channels were skipped (the same step dense ends elsewhere).
    assert not torch.allclose(one_by_one(tensors, norms_after, *make_step(dtype, m, 3)), ref_x)


@pytest.mark.usefixtures("sparse_variant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["top-k", "threshold"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_sparse_one_call_with_adapters_is_the_kernels_one_by_one(
    dtype: torch.dtype, mode: str, m: int
) -> None:
    """The adapters see each projection group's input with the channels its row dropped
    zeroed, as engine.model's Python path gives them (rows without an adapter among them)."""
    if not cpu_linear.kernel_available(dtype) or SPARSE_MISSING:
        pytest.skip(f"no {dtype} kernel, or this CPU lacks {SPARSE_MISSING}")
    if not cpu_linear.lora_entry_address(dtype):
        pytest.skip(f"no {dtype} multi-LoRA kernel on this CPU")
    tensors, norms_after = make_layers(dtype, 2, qk_norm=True, bias=True)
    stored, sparsity = sparse_model(tensors, mode)
    (x, hidden, keys, values), (ref_x, ref_hidden, ref_keys, ref_values) = run_both(
        stored, norms_after, sparsity, SHAPE, m, dtype, with_adapters=True
    )
    assert torch.equal(x, ref_x) and torch.equal(hidden, ref_hidden)
    for got, wanted in zip((*keys, *values), (*ref_keys, *ref_values), strict=True):
        assert torch.equal(got, wanted)
    # Guard: the adapters on the unmasked input end elsewhere.
    stacks, mapping = make_adapters(dtype, m, SHAPE)
    unmasked = one_by_one(
        stored, norms_after, *make_step(dtype, m, 2), SHAPE, ([stacks] * 2, mapping), sparsity,
        mask_adapter_input=False,
    )  # fmt: skip
    assert not torch.equal(unmasked, ref_x)


@pytest.mark.usefixtures("sparse_variant")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("with_adapters", [False, True])
def test_sparse_one_call_shares_every_projection_between_threads(
    dtype: torch.dtype, m: int, with_adapters: bool
) -> None:
    """Two threads share each sparse projection (thresholds, the gather of each half of the
    channels, and the stream: by halves of W.T at one row, by columns at 16) and its adapters:
    the same bits as the kernels called alone (the sparse kernel with its own team of
    threads)."""
    if not cpu_linear.kernel_available(dtype) or SPARSE_MISSING:
        pytest.skip(f"no {dtype} kernel, or this CPU lacks {SPARSE_MISSING}")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tensors, norms_after = make_layers(dtype, 1, qk_norm=True, bias=True, shape=WIDE)
        stored, sparsity = sparse_model(tensors, "top-k")
        (x, hidden, keys, values), (ref_x, ref_hidden, ref_keys, ref_values) = run_both(
            stored, norms_after, sparsity, WIDE, m, dtype, with_adapters
        )
        assert torch.equal(x, ref_x) and torch.equal(hidden, ref_hidden)
        assert torch.equal(keys[0], ref_keys[0]) and torch.equal(values[0], ref_values[0])
    finally:
        torch.set_num_threads(threads)


def test_refusals_leave_everything_as_it_was() -> None:
    dtype = torch.float32
    tensors, norms_after = make_layers(dtype, 2, qk_norm=False, bias=False)
    half = [tuple(t.half() if t is not None else None for t in layer) for layer in tensors]
    assert DecodeLayers.prepare(half, [n.half() for n in norms_after], SHAPE, EPS, SCALE) is None
    mixed = [tensors[0], make_layers(dtype, 1, qk_norm=True, bias=False)[0][0]]
    assert DecodeLayers.prepare(mixed, norms_after, SHAPE, EPS, SCALE) is None
    wide = [(*tensors[0][:6], tensors[0][6][:-1], tensors[0][7]), tensors[1]]
    assert DecodeLayers.prepare(wide, norms_after, SHAPE, EPS, SCALE) is None
    strided = [(tensors[0][0].t().contiguous().t(), *tensors[0][1:]), tensors[1]]
    assert DecodeLayers.prepare(strided, norms_after, SHAPE, EPS, SCALE) is None
    step = DecodeLayers.prepare(tensors, norms_after, SHAPE, EPS, SCALE)
    assert step is not None
    params = adapter_params(*make_adapters(dtype, 3, SHAPE), 3, dtype)
    hidden, x, keys, values, gather, cos, sin, slot_mapping = make_step(dtype, 17, 2)
    before = [t.clone() for t in (hidden, x, *keys, *values)]
    # More rows than the kernels take, with adapters (their params describe one whole batch).
    assert not step(hidden, x, keys, values, [gather] * 2, cos, sin, slot_mapping, [params] * 2)
    for got, wanted in zip((hidden, x, *keys, *values), before, strict=True):
        assert torch.equal(got, wanted)
    hidden, x, keys, values, gather, cos, sin, slot_mapping = make_step(dtype, 3, 2)
    before = [t.clone() for t in (hidden, x, *keys, *values)]
    refused = {
        "one gather for two layers": (keys, values, [gather], cos),
        "a pool too few": (keys[:1], values[:1], [gather] * 2, cos),
        "pools of another head count": (
            [k.view(SLOTS, 1, 2 * SHAPE.head_dim) for k in keys],
            values,
            [gather] * 2,
            cos,
        ),
        "cos of the wrong width": (keys, values, [gather] * 2, cos[:, :4].contiguous()),
        "lengths of int32": (keys, values, [(gather[0], gather[1].int())] * 2, cos),
    }
    for name, (k, v, gathers, c) in refused.items():
        assert not step(hidden, x, k, v, gathers, c, sin, slot_mapping), name
    # Logits from a step prepared without an LM head, or of the wrong shape or dtype; token
    # ids for one prepared without the embedding.
    assert not step(hidden, x, keys, values, [gather] * 2, cos, sin, slot_mapping, None, x)
    ids = torch.zeros(3, dtype=torch.int64)
    assert not step(
        hidden, x, keys, values, [gather] * 2, cos, sin, slot_mapping, tokens=(ids, ids)
    )
    lm_head = torch.randn(30, SHAPE.hidden_size)
    with_head = DecodeLayers.prepare(tensors, norms_after, SHAPE, EPS, SCALE, lm_head=lm_head)
    assert with_head is not None and with_head.lm_head is lm_head
    for logits in (torch.empty(3, 29), torch.empty(2, 30), torch.empty(3, 30).double()):
        assert not with_head(
            hidden, x, keys, values, [gather] * 2, cos, sin, slot_mapping, logits=logits
        )
    for got, wanted in zip((hidden, x, *keys, *values), before, strict=True):
        assert torch.equal(got, wanted)
    # An LM head the kernel cannot take: the step runs, but not with logits.
    narrow = DecodeLayers.prepare(tensors, norms_after, SHAPE, EPS, SCALE, lm_head=lm_head[:, :8])
    assert narrow is not None and narrow.lm_head is None
    assert step(*make_step(dtype, 3, 2)[:4], [gather] * 2, cos, sin, slot_mapping, [params] * 2)


@pytest.mark.skipif(bool(SPARSE_MISSING), reason=f"this CPU lacks {SPARSE_MISSING}")
def test_sparse_prepare_refuses_what_the_kernel_cannot_take() -> None:
    dtype = torch.float32
    tensors, norms_after = make_layers(dtype, 2, qk_norm=False, bias=False)
    stored, sparsity = sparse_model(tensors, "top-k")
    assert DecodeLayers.prepare(tensors, norms_after, SHAPE, EPS, SCALE, sparsity) is None
    assert DecodeLayers.prepare(stored, norms_after, SHAPE, EPS, SCALE) is None
    whole = [[(norms, norms.shape[0], None) for norms, _, _ in layer] for layer in sparsity]
    assert DecodeLayers.prepare(stored, norms_after, SHAPE, EPS, SCALE, whole) is None
    assert DecodeLayers.prepare(stored, norms_after, SHAPE, EPS, SCALE, sparsity) is not None
