"""kernels.cpu_ops: each C op against its PyTorch reference, plus a float64 oracle for attention
and the fallbacks for what the kernels do not take."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.nn import functional as F

from kernels import cpu_ops
from kernels.build import cpu_flags

DTYPES = [torch.bfloat16, torch.float32]
# One unit in the last place at 1.0, the size of a rounding difference of a reordered sum.
ULP = {torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}

pytestmark = pytest.mark.skipif(
    not cpu_ops._REQUIRED_CPU_FLAGS.issubset(cpu_flags()), reason="this CPU lacks AVX2/FMA"
)


@pytest.fixture(autouse=True)
def kernels_built() -> None:
    assert cpu_ops.kernel_available(), "gcc and Python's headers are part of the set-up"


def _within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float) -> None:
    scale = expected.float().abs().clamp_min(1.0)
    error = ((actual.float() - expected.float()).abs() / scale).max().item()
    assert error <= ulps * ULP[expected.dtype], error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (5, 7), (3, 33), (2, 4, 64), (1, 16, 128)])
def test_rms_norm_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=generator).to(dtype)
    got = cpu_ops.rms_norm(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    # The variance sums in another order: the normalised value may round one step apart, and
    # the weight multiplies that step.
    _within_ulps(got, cpu_ops.rms_norm_ref(x, weight, 1e-6), 2 * weight.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_strided_heads(dtype: torch.dtype) -> None:
    """The q/k heads of a fused qkv row: rows strided by the row width, heads contiguous."""
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(3, 10 * 16, generator=generator).to(dtype)
    heads = qkv[:, : 6 * 16].view(3, 6, 16)
    weight = torch.rand(16, generator=generator).to(dtype)
    _within_ulps(
        cpu_ops.rms_norm(heads, weight, 1e-5), cpu_ops.rms_norm_ref(heads, weight, 1e-5), 2
    )
    # One weight per head (Qwen3 stores q's norm for the q heads, then k's for the k heads).
    per_head = torch.rand(6, 16, generator=generator).to(dtype)
    got = cpu_ops.rms_norm(heads, per_head, 1e-5)
    _within_ulps(got, cpu_ops.rms_norm_ref(heads, per_head, 1e-5), 2)
    assert torch.equal(got[:, 4], cpu_ops.rms_norm(heads[:, 4], per_head[4], 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (5, 7), (3, 33), (64, 1100)])
def test_add_rms_norm_is_the_add_then_the_norm(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """The residual add as torch's add_ rounds it, bit for bit, then the norm of the sum as
    rms_norm computes it, bit for bit; hidden rows strided like a slice of a wider buffer. 64
    rows of 1100 take the threaded path."""
    generator = torch.Generator().manual_seed(5)
    rows, d = shape
    buffer = (torch.randn(rows, d + 9, generator=generator) * 3).to(dtype)
    delta = (torch.randn(rows, d, generator=generator) * 2).to(dtype)
    weight = torch.randn(d, generator=generator).to(dtype)
    hidden = buffer[:, 2 : 2 + d]
    expected_hidden = hidden.clone().add_(delta)
    expected = cpu_ops.rms_norm(expected_hidden, weight, 1e-6)
    left, right = buffer[:, :2].clone(), buffer[:, 2 + d :].clone()
    got = cpu_ops.add_rms_norm(hidden, delta, weight, 1e-6)
    assert torch.equal(hidden, expected_hidden)
    assert torch.equal(got, expected)
    assert torch.equal(buffer[:, :2], left) and torch.equal(buffer[:, 2 + d :], right)
    _within_ulps(got, cpu_ops.rms_norm_ref(expected_hidden, weight, 1e-6), 2 * weight.abs().max())


def test_add_rms_norm_fallbacks_add_in_place_too() -> None:
    """float16, autograd and a delta that shares hidden's memory go to the reference."""
    for hidden, delta in (
        (torch.randn(2, 16, dtype=torch.float16), torch.randn(2, 16, dtype=torch.float16)),
        (torch.randn(2, 16), torch.randn(2, 16, requires_grad=True)),
    ):
        weight = torch.randn(16, dtype=hidden.dtype)
        before = hidden.clone()
        with torch.no_grad() if not delta.requires_grad else torch.enable_grad():
            out = cpu_ops.add_rms_norm(hidden, delta, weight, 1e-6)
        torch.testing.assert_close(hidden, before + delta.detach())
        torch.testing.assert_close(out, cpu_ops.rms_norm_ref(hidden, weight, 1e-6))
    shared, weight = torch.randn(2, 32), torch.randn(16)
    copy = shared.clone()
    out = cpu_ops.add_rms_norm(shared[:, :16], shared[:, 8:24], weight, 1e-6)
    assert torch.equal(out, cpu_ops.add_rms_norm_ref(copy[:, :16], copy[:, 8:24], weight, 1e-6))
    assert torch.equal(shared, copy)


def _rope_case(dtype: torch.dtype, t: int, hq: int, hk: int, d: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=generator).to(dtype)
    angles = torch.rand(t, d // 2, generator=generator) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    caches = torch.zeros(2, 40, hk, d, dtype=dtype)
    slots = torch.randperm(40, generator=generator)[:t]
    return qkv, cos, sin, caches, slots


def _rope_views(qkv: torch.Tensor, hq: int, hk: int, d: int):
    t = qkv.shape[0]
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d :].view(t, hk, d)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "hq", "hk", "d"), [(1, 14, 2, 64), (7, 4, 4, 8), (3, 6, 2, 2)])
def test_rope_store_kv_equals_reference_bit_for_bit(
    dtype: torch.dtype, t: int, hq: int, hk: int, d: int
) -> None:
    results = []
    for op in (cpu_ops.rope_store_kv, cpu_ops.rope_store_kv_ref):
        qkv, cos, sin, caches, slots = _rope_case(dtype, t, hq, hk, d, seed=t + d)
        op(*_rope_views(qkv, hq, hk, d), cos, sin, caches[0], caches[1], slots)
        results.append((qkv, caches))
    (qkv, caches), (qkv_ref, caches_ref) = results
    assert torch.equal(qkv, qkv_ref)
    assert torch.equal(caches, caches_ref)
    assert caches.abs().sum() > 0


def test_rope_store_kv_matches_transformers_rotation() -> None:
    """An independent oracle: transformers' x * cos + rotate_half(x) * sin in float64."""
    from transformers.models.llama.modeling_llama import rotate_half

    qkv, cos, sin, caches, slots = _rope_case(torch.float32, 4, 4, 2, 16, seed=3)
    q, k, v = (x.clone() for x in _rope_views(qkv, 4, 2, 16))
    cos_full = torch.cat([cos, cos], dim=-1).double()[:, None]
    sin_full = torch.cat([sin, sin], dim=-1).double()[:, None]
    expected_q = q.double() * cos_full + rotate_half(q.double()) * sin_full
    expected_k = k.double() * cos_full + rotate_half(k.double()) * sin_full
    cpu_ops.rope_store_kv(q, k, v, cos, sin, caches[0], caches[1], slots)
    torch.testing.assert_close(q.double(), expected_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches[0][slots].double(), expected_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(caches[1][slots], v)


def _attention_case(dtype: torch.dtype, lengths: list[int], hq: int, hk: int, d: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    pool = 64
    caches = torch.randn(2, pool, hk, d, generator=generator).to(dtype)
    longest = max(lengths)
    slots = torch.zeros(len(lengths), longest, dtype=torch.int64)
    for row, length in zip(slots, lengths, strict=True):
        row[:length] = torch.randperm(pool, generator=generator)[:length]
    q = torch.randn(len(lengths), hq, d, generator=generator).to(dtype)
    return q, caches[0], caches[1], slots, torch.tensor(lengths, dtype=torch.int64)


def _attention_oracle(q, keys, values, slots, lengths, scale) -> torch.Tensor:
    """Per sequence and head in float64, by the definition."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // keys.shape[1]
    for s, length in enumerate(lengths.tolist()):
        used = slots[s, :length]
        for h in range(q.shape[1]):
            k = keys[used, h // group].double()
            v = values[used, h // group].double()
            weights = torch.softmax(k @ q[s, h].double() * scale, dim=0)
            out[s, h] = weights @ v
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lengths", "hq", "hk", "d"),
    [([1], 14, 2, 64), ([5, 33, 1], 4, 2, 16), ([20, 20], 3, 3, 7), ([64], 8, 1, 128)],
)
def test_decode_attention_matches_reference_and_oracle(
    dtype: torch.dtype, lengths: list[int], hq: int, hk: int, d: int
) -> None:
    q, keys, values, slots, lens = _attention_case(dtype, lengths, hq, hk, d, seed=len(lengths))
    scale = d**-0.5
    got = cpu_ops.decode_attention(q, keys, values, slots, lens, scale)
    reference = cpu_ops.decode_attention_ref(q, keys, values, slots, lens, scale)
    oracle = _attention_oracle(q, keys, values, slots, lens, scale)
    assert got.dtype == dtype and got.shape == q.shape
    tolerance = 1e-2 if dtype is torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), oracle, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got, reference, rtol=tolerance, atol=tolerance)


def test_decode_attention_ignores_padding_slots() -> None:
    """What sits past a sequence's length in its slot row must not matter."""
    q, keys, values, slots, lens = _attention_case(torch.float32, [3, 9], 2, 1, 8, seed=5)
    first = cpu_ops.decode_attention(q, keys, values, slots, lens, 0.3)
    slots[0, 3:] = torch.arange(6) + 50
    assert torch.equal(cpu_ops.decode_attention(q, keys, values, slots, lens, 0.3), first)


def test_decode_attention_is_batch_invariant() -> None:
    """A sequence's output is the same bits alone or among others of other lengths."""
    q, keys, values, slots, lens = _attention_case(torch.bfloat16, [7, 30, 2], 4, 2, 64, seed=9)
    together = cpu_ops.decode_attention(q, keys, values, slots, lens, 0.125)
    for s, length in enumerate(lens.tolist()):
        alone = cpu_ops.decode_attention(
            q[s : s + 1],
            keys,
            values,
            slots[s : s + 1, :length].contiguous(),
            lens[s : s + 1],
            0.125,
        )
        assert torch.equal(alone[0], together[s])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 4864), (6, 2 * 37), (300, 2 * 256)])
def test_silu_mul_matches_reference(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(shape[0])
    gate_up = (torch.randn(shape, generator=generator) * 4).to(dtype)
    got = cpu_ops.silu_mul(gate_up)
    gate, up = gate_up.double().chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    assert got.dtype == dtype and got.shape == (shape[0], shape[1] // 2)
    # silu rounds once (exp may round one unit apart), the product once more.
    _within_ulps(got, cpu_ops.silu_mul_ref(gate_up), 2 * up.abs().max().item())
    torch.testing.assert_close(got.double(), expected, rtol=3 * ULP[dtype], atol=1e-6)


def test_fallbacks_take_what_the_kernels_do_not() -> None:
    """float16 and autograd inputs go to the references and give their results."""
    x = torch.randn(2, 3, 16, dtype=torch.float16)
    weight = torch.randn(16, dtype=torch.float16)
    assert torch.equal(cpu_ops.rms_norm(x, weight, 1e-6), cpu_ops.rms_norm_ref(x, weight, 1e-6))
    gate_up = torch.randn(3, 8, requires_grad=True)
    out = cpu_ops.silu_mul(gate_up)
    assert out.requires_grad
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up)


@pytest.fixture(params=["avx512", "avx2"])
def fusion_variant(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each variant of fusion_sweep's and fusion_stats' C code this CPU runs, in turn."""
    if request.param not in cpu_ops.fusion_variants():
        pytest.skip(f"this CPU cannot run the {request.param} fusion passes")
    cpu_ops.set_fusion_variant(request.param)
    try:
        yield
    finally:
        cpu_ops.set_fusion_variant(cpu_ops.fusion_variants()[0])


def _sweep_case(batch: int, experts: int, vocab: int, masked: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, vocab, generator=generator) * 4
    d = torch.randn(batch * experts, vocab, generator=generator) * 2
    if masked:
        a[:, ::3] = -torch.inf  # the large model's masked tokens
        a[-1] = -torch.inf  # a row with no finite logit
        d[:, ::5] = 0.0  # tokens the pair has no opinion on
    return a, d, torch.linspace(0.0, 2.0, 21)


def _sweep_oracle(a: torch.Tensor, d: torch.Tensor, alphas: torch.Tensor):
    """LSE and softmax-weighted mean of d by the definition, in float64."""
    experts = d.shape[0] // a.shape[0]
    lse = torch.zeros(d.shape[0], alphas.numel(), dtype=torch.float64)
    mean = torch.zeros_like(lse)
    for p in range(d.shape[0]):
        for g, alpha in enumerate(alphas.double().tolist()):
            z = a[p // experts].double() + alpha * d[p].double()
            if torch.isfinite(z).any():
                lse[p, g] = torch.logsumexp(z, 0)
                mean[p, g] = (torch.softmax(z, 0) * d[p].double()).sum()
    return lse, mean


@pytest.mark.parametrize(
    ("batch", "experts", "vocab", "masked"),
    [(1, 1, 32768, False), (3, 2, 301, True), (2, 3, 7, True), (8, 1, 4096, False)],
)
@pytest.mark.usefixtures("fusion_variant")
def test_fusion_sweep_matches_oracle_and_reference(
    batch: int, experts: int, vocab: int, masked: bool
) -> None:
    a, d, alphas = _sweep_case(batch, experts, vocab, masked, seed=vocab)
    lse, mean = cpu_ops.fusion_sweep(a, d, alphas)
    lse_ref, mean_ref = cpu_ops.fusion_sweep_ref(a, d, alphas)
    lse_oracle, mean_oracle = _sweep_oracle(a, d, alphas)
    assert lse.shape == mean.shape == (batch * experts, 21) and lse.dtype == torch.float32
    for got, reference, oracle in ((lse, lse_ref, lse_oracle), (mean, mean_ref, mean_oracle)):
        torch.testing.assert_close(got.double(), oracle, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(got, reference, rtol=2e-5, atol=2e-5)
    if masked:  # no finite logit: both are exactly 0
        assert not lse[-experts:].any() and not mean[-experts:].any()


def _assert_sweep_matches_oracle(a: torch.Tensor, d: torch.Tensor, alphas: torch.Tensor) -> None:
    lse, mean = cpu_ops.fusion_sweep(a, d, alphas)
    lse_oracle, mean_oracle = _sweep_oracle(a, d, alphas)
    torch.testing.assert_close(lse.double(), lse_oracle, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(mean.double(), mean_oracle, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "alphas",
    [
        [0.0, 0.05, 0.1, 0.3, 0.6, 1.0, 1.1, 1.2, 1.5, 1.7, 1.8, 2.0],  # uneven
        [0.0, 0.5, 1.0, 1.5, 2.0],  # even, shorter than a chain
        [-1.0 + i / 8 for i in range(33)],  # even, negative alphas, three chains
    ],
)
@pytest.mark.usefixtures("fusion_variant")
def test_fusion_sweep_on_other_grids(alphas: list[float]) -> None:
    a, d, _ = _sweep_case(3, 2, 1000, True, seed=len(alphas))
    _assert_sweep_matches_oracle(a, d, torch.tensor(alphas))


@pytest.mark.usefixtures("fusion_variant")
def test_fusion_sweep_where_a_token_climbs_from_underflow() -> None:
    # Token 1 sits ~2000 nats under the rest at alpha 0 and ~100 nats per alpha step higher each
    # step, to lead at alpha 2: a chain that started from its underflowed term would miss it.
    a, d, alphas = _sweep_case(1, 1, 4096, False, seed=11)
    d *= 0.25  # the rest stay under token 1 at alpha 2
    a[0, 1], d[0, 1] = -2000.0, 1010.0
    _assert_sweep_matches_oracle(a, d, alphas)


@pytest.mark.usefixtures("fusion_variant")
def test_fusion_sweep_where_the_maximum_sags_far_below_the_ends() -> None:
    # Only two finite tokens: each leads at one end of the grid by 1000 nats, and both sit 500
    # below the ends' maxima in the middle, where a shift from the ends underflows every term.
    a = torch.full((1, 64), -torch.inf)
    d = torch.zeros(1, 64)
    a[0, 3], d[0, 3] = 0.0, -500.0
    a[0, 40], d[0, 40] = -1000.0, 500.0
    _assert_sweep_matches_oracle(a, d, torch.linspace(0.0, 2.0, 21))


def test_fusion_sweep_float64_takes_the_reference() -> None:
    a, d, alphas = _sweep_case(2, 2, 50, True, seed=4)
    a, d, alphas = a.double(), d.double(), alphas.double()
    for got, expected in zip(
        cpu_ops.fusion_sweep(a, d, alphas), cpu_ops.fusion_sweep_ref(a, d, alphas), strict=True
    ):
        assert got.dtype == torch.float64 and torch.equal(got, expected)


def _stats_case(batch: int, experts: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    large = torch.randn(batch, vocab, generator=generator) * 4
    small = torch.randn(batch, vocab, generator=generator) * 4
    expert = small[:, None] + torch.randn(batch, experts, vocab, generator=generator)
    large[0, ::4] = -torch.inf  # the large model's mask
    small[0, 1::5] = -torch.inf  # the small base's
    expert[0, 0, 2::7] = torch.nan  # counts as -inf
    expert[0, -1, 3::9] = torch.inf  # so does +inf
    large[-1] = -torch.inf  # a row with no finite large logit
    small[-1, :] = -torch.inf  # ... and no common finite token
    expert[:, -1] = small[:, None, :].expand(batch, 1, vocab)[:, 0]  # an expert that never moves
    return large, small, expert


@pytest.mark.usefixtures("fusion_variant")
@pytest.mark.parametrize(
    ("batch", "experts", "vocab"), [(1, 1, 32768), (3, 2, 301), (2, 3, 9), (4, 2, 1000)]
)
def test_fusion_stats_match_reference(batch: int, experts: int, vocab: int) -> None:
    large, small, expert = _stats_case(batch, experts, vocab, seed=vocab)
    d, stats = cpu_ops.fusion_stats(large, small, expert)
    d_ref, stats_ref = cpu_ops.fusion_stats_ref(large, small, expert)
    assert torch.equal(d, d_ref)  # one subtraction: the same bits
    assert stats.shape == (batch * experts, len(cpu_ops.FUSION_STATS))
    assert torch.isfinite(stats).all()
    torch.testing.assert_close(stats, stats_ref, rtol=2e-5, atol=2e-5)
    column = dict(zip(cpu_ops.FUSION_STATS, stats.T, strict=True))
    column_ref = dict(zip(cpu_ops.FUSION_STATS, stats_ref.T, strict=True))
    for flag in ("valid", "moved", "moved_a", "valid_a"):  # flags are exact
        assert torch.equal(column[flag], column_ref[flag])
    assert not column["valid_a"][-experts:].any() and not column["valid"][-experts:].any()
    assert not column["moved"].view(batch, experts)[:, -1].any()


@pytest.mark.usefixtures("fusion_variant")
def test_fusion_stats_against_their_definitions() -> None:
    """LSE and softmax means from torch.logsumexp / torch.softmax in float64 over the tokens
    where the pair is finite: an oracle independent of both implementations."""
    large, small, expert = _stats_case(2, 2, 500, seed=8)
    d, stats = cpu_ops.fusion_stats(large, small, expert)
    per_pair = stats.double().view(2, 2, -1).unbind(-1)
    column = dict(zip(cpu_ops.FUSION_STATS, per_pair, strict=True))
    b = 0  # row 1 has nothing finite
    for t in range(2):
        both = torch.isfinite(small[b]) & torch.isfinite(expert[b, t])
        zs, ze = small[b, both].double(), expert[b, t, both].double()
        dd = d[b, t, both].double()
        expected = {
            "lse_s": torch.logsumexp(zs, 0),
            "mean_s": (torch.softmax(zs, 0) * dd).sum(),
            "lse_e": torch.logsumexp(ze, 0),
            "mean_e": (torch.softmax(ze, 0) * dd).sum(),
            "lse_a": torch.logsumexp(large[b].double(), 0),
            "mean_a": (torch.softmax(large[b].double(), 0) * d[b, t].double()).sum(),
        }
        for name, value in expected.items():
            torch.testing.assert_close(column[name][b, t], value, rtol=1e-5, atol=1e-5)


def _apply_case(batch: int, experts: int, vocab: int, width: int, seed: int):
    """Large-model logits [batch + 2, width] (two rows no fusion touches) and per-row small and
    expert logits as the engine hands them over: 1-D views into wider tensors."""
    large, small, expert = _stats_case(batch, experts, vocab, seed)
    logits = torch.randn(batch + 2, width, generator=torch.Generator().manual_seed(seed))
    rows = [batch + 1 - i for i in range(batch)]  # reversed order, row 0 and the last left alone
    logits[rows, :vocab] = large
    small_wide = torch.cat([small, torch.zeros(batch, 5)], 1)
    expert_wide = torch.cat([expert, torch.zeros(batch, experts, 3)], 2)
    small_rows = [small_wide[b, :vocab] for b in range(batch)]
    expert_rows = [[expert_wide[b, t, :vocab] for t in range(experts)] for b in range(batch)]
    return logits, rows, small_rows, expert_rows, (large, small, expert)


@pytest.mark.parametrize(
    ("batch", "experts", "vocab", "width"),
    [(1, 1, 32768, 32768), (3, 2, 301, 320), (2, 3, 9, 9), (8, 1, 1000, 1024)],
)
def test_fusion_apply_equals_reference_and_fuse_static_bit_for_bit(
    batch: int, experts: int, vocab: int, width: int
) -> None:
    from kernels.fusion import fuse_static_ref

    logits, rows, small, expert, (large, small_t, expert_t) = _apply_case(
        batch, experts, vocab, width, seed=vocab
    )
    alphas = torch.randn(batch, experts, generator=torch.Generator().manual_seed(1))
    alphas[:, -1] = 0.0  # an expert no row uses: skipped
    if batch > 1:
        alphas[0, 0] = 0.0  # a row that does not use an expert others use
    out, out_ref = logits.clone(), logits.clone()
    cpu_ops.fusion_apply(out, rows, small, expert, alphas, vocab)
    cpu_ops.fusion_apply_ref(out_ref, rows, small, expert, alphas, vocab)
    assert torch.equal(out, out_ref)
    # The oracle: kernels.fusion's static fusion over the stacked rows, then the padding.
    expected = logits.clone()
    expected[rows, :vocab] = fuse_static_ref(large, small_t, expert_t, alphas)
    expected[rows, vocab:] = -torch.inf
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    untouched = [r for r in range(batch + 2) if r not in rows]
    assert torch.equal(out[untouched], logits[untouched])


def test_fusion_apply_takes_the_reference_for_what_the_kernel_does_not() -> None:
    logits, rows, small, expert, _ = _apply_case(2, 1, 50, 64, seed=3)
    alphas = torch.ones(2, 1)
    out = logits.clone()
    cpu_ops.fusion_apply(out, rows, small, expert, alphas.double(), 50)  # float64 alphas
    expected = logits.clone()
    cpu_ops.fusion_apply_ref(expected, rows, small, expert, alphas, 50)
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    wide = torch.zeros(logits.shape[0], 2 * logits.shape[1])
    wide[:, ::2] = logits
    strided = torch.zeros(len(small), 100)
    strided[:, ::2] = torch.stack(small)
    cpu_ops.fusion_apply(wide[:, ::2], rows, list(strided[:, ::2]), expert, alphas, 50)
    assert torch.equal(wide[:, ::2].nan_to_num(), expected.nan_to_num())


def test_choose_dynamic_is_fuse_dynamics_choice() -> None:
    from kernels.fusion import choose_dynamic, fuse_dynamic_naive, fuse_dynamic_ref

    large, small, expert = _stats_case(4, 3, 700, seed=11)
    index, alpha = choose_dynamic(large, small, expert)
    _, index_ref, alpha_ref = fuse_dynamic_ref(large, small, expert)
    _, index_naive, alpha_naive = fuse_dynamic_naive(large, small, expert)
    assert torch.equal(index, index_ref) and torch.equal(alpha, alpha_ref)
    assert torch.equal(index, index_naive) and torch.equal(alpha.double(), alpha_naive.double())


DEFAULT_ALPHAS = [i / 10 for i in range(21)]


@pytest.mark.usefixtures("fusion_variant")
@pytest.mark.parametrize(
    ("batch", "experts", "vocab", "width", "alphas"),
    [
        (1, 1, 32768, 32768, DEFAULT_ALPHAS),
        (3, 2, 301, 320, DEFAULT_ALPHAS),
        (2, 3, 9, 9, [-1.0, -0.25, 0.0, 0.5, 3.0]),
        (8, 1, 1000, 1024, DEFAULT_ALPHAS),
    ],
)
def test_fusion_dynamic_is_the_four_passes_bit_for_bit(
    batch: int, experts: int, vocab: int, width: int, alphas: list[float]
) -> None:
    """One call, the same bits as fusion_stats, fusion_sweep, fusion_choose and fusion_apply of
    the chosen expert's column, with the rows wherever they lie (reversed rows of the large
    logits, rows of wider small and expert tensors)."""
    logits, rows, small, expert, (large, small_t, expert_t) = _apply_case(
        batch, experts, vocab, width, seed=vocab + 1
    )
    grid = torch.tensor(alphas, dtype=torch.float32)
    out = logits.clone()
    index, alpha = cpu_ops.fusion_dynamic(out, rows, small, expert, grid, vocab)
    d, stats = cpu_ops.fusion_stats(large, small_t, expert_t)
    lse, mean = cpu_ops.fusion_sweep(large, d.view(batch * experts, vocab), grid)
    index_ref, alpha_ref = cpu_ops.fusion_choose(stats, lse, mean, grid, experts)
    assert index == index_ref.tolist() and alpha == alpha_ref.tolist()
    expected = logits.clone()
    steer = [[row[e]] for row, e in zip(expert, index, strict=True)]
    cpu_ops.fusion_apply(expected, rows, small, steer, alpha_ref[:, None], vocab)
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert torch.equal(out.isnan(), expected.isnan())


def test_fusion_dynamic_against_the_naive_fusion_and_its_reference() -> None:
    """The choice and the fused logits of kernels.fusion's oracle (a full softmax per candidate,
    float64), and of the PyTorch reference, on experts that move the small base by different
    amounts (so that rows choose different experts and alphas) and masked tokens."""
    from kernels.fusion import fuse_dynamic_naive

    batch, experts, vocab, width = 4, 3, 700, 704
    generator = torch.Generator().manual_seed(15)
    large = torch.randn(batch, vocab, generator=generator) * 3
    small_t = torch.randn(batch, vocab, generator=generator) * 3
    noise = torch.randn(batch, experts, vocab, generator=generator)
    expert_t = small_t[:, None] + noise * torch.rand(batch, experts, 1, generator=generator) * 2
    large[0, ::4], small_t[1, 1::5], expert_t[2, 0, 2::7] = -torch.inf, -torch.inf, torch.nan
    logits = torch.randn(batch + 2, width, generator=generator)
    rows = [batch - i for i in range(batch)]
    logits[rows, :vocab] = large
    small = list(small_t)
    expert = [list(row) for row in expert_t]
    grid = torch.tensor(DEFAULT_ALPHAS, dtype=torch.float32)
    out, out_ref = logits.clone(), logits.clone()
    index, alpha = cpu_ops.fusion_dynamic(out, rows, small, expert, grid, vocab)
    index_ref, alpha_ref = cpu_ops.fusion_dynamic_ref(out_ref, rows, small, expert, grid, vocab)
    fused, index_naive, alpha_naive = fuse_dynamic_naive(large, small_t, expert_t)
    assert index == index_ref == index_naive.tolist()
    assert alpha == alpha_ref == alpha_naive.float().tolist()
    assert len(set(index)) > 1 and len(set(alpha)) > 1  # the case tells choices apart
    for got in (out, out_ref):
        torch.testing.assert_close(got[rows, :vocab], fused, rtol=1e-6, atol=1e-5)
        assert torch.isneginf(got[rows, vocab:]).all()
        assert torch.equal(got[[0, batch + 1]], logits[[0, batch + 1]])


def test_fusion_dynamic_takes_the_reference_for_what_the_kernel_does_not() -> None:
    logits, rows, small, expert, _ = _apply_case(2, 2, 50, 64, seed=5)
    grid = torch.tensor(DEFAULT_ALPHAS, dtype=torch.float32)
    out, out_ref = logits.clone(), logits.clone()
    choice = cpu_ops.fusion_dynamic(out, rows, small, expert, grid.double(), 50)  # float64 grid
    choice_ref = cpu_ops.fusion_dynamic_ref(out_ref, rows, small, expert, grid, 50)
    assert choice == choice_ref
    torch.testing.assert_close(out.nan_to_num(), out_ref.nan_to_num())


def _choice_inputs(batch: int, experts: int, vocab: int, alphas: list[float], seed: int):
    """fusion_stats' statistics and fusion_sweep's lse and mean of a _stats_case (masked tokens,
    a row with nothing finite, an expert that never moves), as the dynamic choice gets them."""
    large, small, expert = _stats_case(batch, experts, vocab, seed)
    d, stats = cpu_ops.fusion_stats(large, small, expert)
    grid = torch.tensor(alphas, dtype=torch.float32)
    lse, mean = cpu_ops.fusion_sweep(large, d.view(batch * experts, vocab), grid)
    return stats, lse, mean, grid


def _argmin_choice(costs: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = costs.flatten(1).argmin(1)  # the first minimum, expert-major
    return flat // costs.shape[2], grid[flat % costs.shape[2]]


@pytest.mark.parametrize(
    ("batch", "experts", "vocab", "alphas"),
    [
        (1, 1, 32768, [i / 10 for i in range(21)]),
        (4, 3, 700, [i / 10 for i in range(21)]),
        (3, 2, 301, [-1.0, -0.25, 0.0, 0.5, 3.0]),
        (2, 3, 9, [0.0]),
    ],
)
def test_fusion_choose_is_the_argmin_of_the_reference_costs(
    batch: int, experts: int, vocab: int, alphas: list[float]
) -> None:
    stats, lse, mean, grid = _choice_inputs(batch, experts, vocab, alphas, seed=vocab)
    costs = cpu_ops.fusion_costs_ref(stats, lse, mean, grid, experts)
    assert costs.shape == (batch, experts, len(alphas)) and torch.isfinite(costs).all()
    written = torch.empty_like(costs)
    index, alpha = cpu_ops.fusion_choose(stats, lse, mean, grid, experts, written)
    assert torch.equal(written, costs)  # the same float32 operations in the same order
    expected_index, expected_alpha = _argmin_choice(costs, grid)
    assert index.dtype == torch.int64 and alpha.dtype == torch.float32
    assert torch.equal(index, expected_index) and torch.equal(alpha, expected_alpha)
    # The lowest cost is the one chosen (not merely the same position by accident).
    chosen = costs[torch.arange(batch), index, torch.searchsorted(grid, alpha)]
    assert torch.equal(chosen, costs.flatten(1).amin(1))


def test_fusion_choose_breaks_ties_and_nans_as_argmin() -> None:
    stats, lse, mean, grid = _choice_inputs(2, 3, 301, [0.0, 0.5, 1.0, 1.5], seed=4)
    # Row 0: expert 2 a copy of expert 1 (equal costs: the lower expert wins). Row 1: a NaN in
    # expert 1's sweep at the third alpha (a NaN cost: that one wins, as torch.argmin has it).
    pairs = stats.view(2, 3, -1)
    pairs[0, 2] = pairs[0, 1]
    lse.view(2, 3, -1)[0, 2] = lse.view(2, 3, -1)[0, 1]
    mean.view(2, 3, -1)[0, 2] = mean.view(2, 3, -1)[0, 1]
    lse.view(2, 3, -1)[1, 1, 2] = torch.nan
    pairs[1, :, cpu_ops.FUSION_STATS.index("valid_a")] = 1.0
    pairs[1, :, cpu_ops.FUSION_STATS.index("moved_a")] = 1.0
    lse.view(2, 3, -1)[:, :, 0] += 1.0  # alpha 0 leaves P as it is, whatever the sweep says
    costs = cpu_ops.fusion_costs_ref(stats, lse, mean, grid, 3)
    assert costs[1, 1, 2].isnan()
    written = torch.empty_like(costs)
    index, alpha = cpu_ops.fusion_choose(stats, lse, mean, grid, 3, written)
    assert torch.equal(written.isnan(), costs.isnan())
    assert torch.equal(written.nan_to_num(), costs.nan_to_num())
    expected_index, expected_alpha = _argmin_choice(costs, grid)
    assert torch.equal(index, expected_index) and torch.equal(alpha, expected_alpha)
    assert index[1] == 1 and alpha[1] == grid[2]
    assert costs[0, 1].amin() == costs[0].amin() and index[0] == 1  # the tie's lower expert


def test_fusion_choose_float64_takes_the_reference() -> None:
    stats, lse, mean, grid = _choice_inputs(3, 2, 301, [0.0, 0.5, 1.0], seed=5)
    as64 = [t.double() for t in (stats, lse, mean, grid)]
    index, alpha = cpu_ops.fusion_choose(*as64, 2)
    expected_index, expected_alpha = _argmin_choice(cpu_ops.fusion_costs_ref(*as64, 2), as64[3])
    assert alpha.dtype == torch.float64
    assert torch.equal(index, expected_index) and torch.equal(alpha, expected_alpha)


@pytest.mark.parametrize("vocab", [1, 7, 8, 1000, 32771])
def test_exponential_race_matches_reference(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    # Spread wide enough (x 10) that most tokens sit more than 21 below their row's maximum,
    # where the kernel skips them.
    logits = torch.randn(12, vocab, generator=generator) * 10
    logits[0, ::3] = -torch.inf  # a mask, as top-k / top-p leave
    logits[1] = -torch.inf  # nothing allowed: token 0
    logits[2, :] = 0.0
    logits[2, vocab // 2] = 30.0  # one token far above all others
    keys = torch.empty(12, dtype=torch.int64).random_(generator=generator)
    keys[3], keys[4] = -1, 0  # keys are any 64 bits
    tokens = cpu_ops.exponential_race(logits, keys)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, cpu_ops.exponential_race_ref(logits, keys))
    assert tokens[1] == 0 and tokens[2] == vocab // 2
    if vocab > 1:
        assert torch.isfinite(logits[0, tokens[0]])
    # Strided rows (a view of wider logits) and the same keys: the same tokens.
    wide = torch.full((12, vocab + 5), -torch.inf)
    wide[:, :vocab] = logits
    assert torch.equal(cpu_ops.exponential_race(wide[:, :vocab], keys), tokens)


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_exponential_race_draws_from_the_softmax(scale: float) -> None:
    """Counts over 40000 random keys against the float64 softmax (chi-square); at scale 8 the
    logits span over 21, so the kernel's skipping is in play."""
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(37, generator=generator) * scale
    draws = 40_000
    keys = torch.empty(draws, dtype=torch.int64).random_(generator=generator)
    tokens = cpu_ops.exponential_race(z.expand(draws, -1), keys)
    counts = torch.bincount(tokens, minlength=37).double()
    p = torch.softmax(z.double(), 0)
    seen = p * draws >= 5  # cells expected often enough for the chi-square approximation
    statistic = (((counts - p * draws) ** 2) / (p * draws))[seen].sum().item()
    dof = int(seen.sum()) - 1
    # A p-value of 1e-4 at these degrees of freedom (Wilson-Hilferty), without scipy.
    z_score = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / (2 / (9 * dof)) ** 0.5
    assert z_score < 3.72, (statistic, dof)
    assert counts[~seen].sum() <= draws * p[~seen].sum() * 3 + 10


def test_exponential_race_ties_go_to_the_lowest_id() -> None:
    """u takes 2^23 values, so tokens of one row share noise now and then: two such tokens with
    equal logits tie exactly. Pairs in the same lane of the kernel's vectors of eight, and with
    the lower id in a lower and in a higher lane."""
    vocab = 1 << 16
    keys = torch.tensor([12345])
    noise = cpu_ops.race_noise_ref(keys, vocab)[0]
    order = noise.argsort()
    same = (noise[order[1:]] == noise[order[:-1]]).nonzero().squeeze(-1)
    pairs = sorted(sorted((int(order[i]), int(order[i + 1]))) for i in same)
    same_lane = next(p for p in pairs if p[0] % 8 == p[1] % 8)
    lower_lane = next(p for p in pairs if p[0] % 8 < p[1] % 8)
    higher_lane = next(p for p in pairs if p[0] % 8 > p[1] % 8)
    for low, high in (same_lane, lower_lane, higher_lane):
        logits = torch.full((1, vocab), -torch.inf)
        logits[0, [low, high]] = 1.5
        assert cpu_ops.exponential_race(logits, keys).item() == low
        assert cpu_ops.exponential_race_ref(logits, keys).item() == low


def _threshold_rows(vocab: int, seed: int) -> torch.Tensor:
    """Rows of logits as samplers meet them: peaked, flat, masked, tied, nothing finite."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(8, vocab, generator=generator)
    rows[0] *= 6.0  # peaked: a small nucleus
    rows[1] *= 0.05  # flat: the nucleus spans most of the row
    rows[2, ::3] = -torch.inf  # masked (a constraint, an earlier filter)
    rows[3] = (rows[3] * 4).round() / 2  # many exact ties
    rows[4] = -torch.inf  # nothing finite
    rows[5, : vocab - 2] = -torch.inf  # two finite logits
    return rows


@pytest.mark.parametrize("vocab", [5, 301, 32768])
def test_sampling_thresholds_match_the_sorting_reference(vocab: int) -> None:
    logits = _threshold_rows(vocab, seed=vocab)
    settings = [  # (top_k, top_p, min_p) per row, every row under each
        (0, 1.0, 0.0),
        (1, 1.0, 0.0),
        (3, 1.0, 0.0),
        (vocab - 1, 1.0, 0.0),
        (vocab, 0.9, 0.0),  # k = V: off
        (0, 0.37, 0.0),
        (0, 1e-6, 0.0),  # just the most likely (and ties)
        (0, 0.999999, 0.0),
        (50, 0.9, 0.0),
        (0, 1.0, 0.2),
        (10, 0.8, 0.05),
    ]
    for k, p, m in settings:
        count = logits.shape[0]
        got = cpu_ops.sampling_thresholds(logits, [k] * count, [p] * count, [m] * count)
        expected = cpu_ops.sampling_thresholds_ref(logits, [k] * count, [p] * count, [m] * count)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), (k, p, m, got, expected)
    # Each row its own settings, in one call.
    ks, ps, ms = zip(*(settings[r % len(settings)] for r in range(8)), strict=True)
    got = cpu_ops.sampling_thresholds(logits, ks, ps, ms)
    assert torch.equal(got, cpu_ops.sampling_thresholds_ref(logits, ks, ps, ms))


@pytest.mark.parametrize("vocab", [7, 8, 29, 32768])
def test_min_p_finds_the_row_maximum_wherever_it_is(vocab: int) -> None:
    """min-p's cut hangs on the row's maximum: at the first token, inside a vector, in the
    partial last vector, the last token; NaN logits are not the maximum (next to it, and in its
    lane of the kernel's vectors of eight)."""
    generator = torch.Generator().manual_seed(vocab)
    for at in sorted({0, 3, vocab // 2, vocab - 2, vocab - 1}):
        row = torch.randn(1, vocab, generator=generator)
        row[0, at] = 9.0
        got = cpu_ops.sampling_thresholds(row, [0], [1.0], [0.5])
        assert torch.equal(got, cpu_ops.sampling_thresholds_ref(row, [0], [1.0], [0.5])), at
        for nan_at in {(at + 1) % vocab, (at + 8) % vocab} - {at}:
            row[0, nan_at] = torch.nan
        assert torch.equal(cpu_ops.sampling_thresholds(row, [0], [1.0], [0.5]), got), at


def test_sampling_thresholds_keep_what_the_filters_define() -> None:
    """Against the definitions themselves, on one flat row of 32k (where a sort was slowest):
    top-k keeps k, top-p keeps the fewest most likely tokens reaching p, min-p the ratio."""
    z = torch.randn(1, 32768, generator=torch.Generator().manual_seed(2)) * 0.3
    probs = torch.softmax(z[0].double(), 0)
    (theta,) = cpu_ops.sampling_thresholds(z, [1000], [1.0], [0.0])
    assert int((z >= theta).sum()) == 1000
    (theta,) = cpu_ops.sampling_thresholds(z, [0], [0.9], [0.0])
    kept = z[0] >= theta
    assert probs[kept].sum() >= 0.9 > probs[kept].sum() - probs[kept].min()
    (theta,) = cpu_ops.sampling_thresholds(z, [0], [1.0], [0.5])
    assert torch.equal(z[0] >= theta, probs >= 0.5 * probs.max() * (1 - 1e-6))


@pytest.mark.parametrize("vocab", [1, 7, 8, 33, 32768])
def test_argmax_rows_is_torch_argmax(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=generator)
    logits[1] = (logits[1] * 2).round()  # ties: the first maximum
    logits[2] = -torch.inf  # a row of -inf: 0
    logits[3, vocab // 2 :] = torch.nan  # NaN: the first one, as torch orders it
    logits[4, -1] = torch.inf
    logits[5] = 3.0  # all equal
    wide = torch.zeros(9, vocab + 3)
    wide[:, :vocab] = logits
    for rows in (logits, wide[:, :vocab], logits[:1]):
        assert torch.equal(cpu_ops.argmax_rows(rows), rows.argmax(dim=-1))


@pytest.mark.parametrize("vocab", [1, 7, 8, 32771])
def test_race_uniform_matches_reference_and_is_uniform(vocab: int) -> None:
    keys = torch.empty(5, dtype=torch.int64).random_(generator=torch.Generator().manual_seed(7))
    keys[0], keys[1] = -1, 0
    u = cpu_ops.race_uniform(keys, vocab)
    assert u.dtype == torch.float32 and u.shape == (5, vocab)
    assert torch.equal(u, cpu_ops.race_uniform_ref(keys, vocab))
    assert (u > 0).all() and (u < 1).all()
    if vocab > 10_000:  # deciles of 5 x 32771 draws: each within 5 standard errors of 1/10
        counts = torch.bincount((u * 10).long().flatten(), minlength=10).double() / u.numel()
        assert ((counts - 0.1).abs() < 5 * (0.09 / u.numel()) ** 0.5).all(), counts


@pytest.mark.parametrize("vocab", [5, 8, 1000, 32771])
def test_gumbel_keys_and_their_top_k(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=generator).log_softmax(-1)
    logits[0, ::2] = -torch.inf  # masked tokens: -inf keys
    logits[1, 2:] = -torch.inf  # fewer finite tokens than k
    uniform = torch.rand(6, vocab, generator=generator)
    uniform[2, 0] = 0.0  # counts as the smallest normal number: a finite key
    uniform[3] = uniform[3, :1].expand(vocab)  # equal noise ...
    logits[3] = -1.0  # ... and equal logits: every key ties, the lower ids come first
    keys = cpu_ops.gumbel_keys(logits, uniform)
    tiny = torch.finfo(torch.float32).tiny
    expected = logits.double() - (-uniform.double().clamp(min=tiny).log()).log()
    assert torch.equal(keys.isinf(), expected.isinf()) and torch.isfinite(keys[2, 0])
    finite = expected.isfinite()
    error = (keys.double() - expected)[finite].abs() / expected[finite].abs().clamp_min(1.0)
    assert error.max() < 8 * ULP[torch.float32]
    k = min(32, vocab)
    top_keys, top_ids = cpu_ops.gumbel_topk_keys(logits, uniform, k)
    ordered = torch.sort(keys, dim=-1, descending=True, stable=True)
    assert torch.equal(top_keys, ordered.values[:, :k])
    finite_top = top_keys.isfinite()
    assert torch.equal(top_ids[finite_top], ordered.indices[:, :k][finite_top])
    assert (top_ids[~finite_top] == 0).all() and not top_keys[1, 2:].isfinite().any()
    assert cpu_ops.gumbel_topk_keys(logits.double(), uniform, k) is None  # not the C path's
