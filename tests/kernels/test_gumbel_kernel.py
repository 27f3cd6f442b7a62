"""kernels.gumbel: the PyTorch reference against a full sort and against the law of sampling
without replacement, and the Triton kernel (interpreted on CPU tensors, TRITON_INTERPRET=1)
against the reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kernels import gumbel
from kernels.gumbel import gumbel_topk, gumbel_topk_ref, gumbel_topk_triton

INF = math.inf


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton kernel in Triton's interpreter (read when it is first launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(batch: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] and uniform noise [B, V] in (0, 1), as row views of wider buffers (both
    paths take any row stride)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab + 3, generator=generator)[:, :vocab] * 3.0
    uniform = torch.rand(batch, vocab + 5, generator=generator)[:, :vocab]
    # torch.rand is in [0, 1): keep the noise finite as the engine's must be.
    return logits, uniform.clamp_min(torch.finfo(torch.float32).tiny)


def add_masks(logits: torch.Tensor, k: int) -> None:
    """-inf logits in place (needs B >= 3): row 0 keeps fewer than k finite entries (its top k
    ends in -inf keys), row 1 loses its first half, row 2 every entry."""
    vocab = logits.shape[1]
    finite = torch.zeros(vocab, dtype=torch.bool)
    finite[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[: k // 2]] = True
    logits[0, ~finite] = -INF
    logits[1, : vocab // 2] = -INF
    logits[2] = -INF


def sort_oracle(logits: torch.Tensor, uniform: torch.Tensor, k: int) -> tuple:
    """The k first entries of the whole row sorted by key (float32, the reference's formula)."""
    keys = logits + -torch.log(-torch.log(uniform))
    values, ids = torch.sort(keys, dim=1, descending=True)
    return values[:, :k], ids[:, :k]


def assert_same_topk(got: tuple, expected: tuple, vocab: int, exact: bool = True) -> None:
    """Equal keys (-inf included), equal ids where the key is finite, valid ids elsewhere."""
    (keys, ids), (keys_e, ids_e) = got, expected
    assert keys.dtype == torch.float32 and ids.dtype == torch.int64
    assert keys.shape == ids.shape == keys_e.shape
    if exact:
        assert torch.equal(keys, keys_e)
    else:
        torch.testing.assert_close(keys, keys_e)
    finite = torch.isfinite(keys_e)
    assert torch.equal(torch.isfinite(keys), finite)
    assert torch.equal(ids[finite], ids_e[finite])
    assert ((ids >= 0) & (ids < vocab)).all()


# ---------------------------------------------------------------------------------------------
# The reference


# (B, V, k): V not a multiple of the kernel's block, k = 1, k = V.
REF_CASES = [(2, 1000, 10), (3, 1537, 1), (2, 300, 300), (4, 50_000, 64), (3, 2500, 2500)]


@pytest.mark.parametrize(("batch", "vocab", "k"), REF_CASES)
def test_reference_equals_a_full_sort(batch: int, vocab: int, k: int) -> None:
    logits, uniform = make_inputs(batch, vocab, seed=vocab)
    got = gumbel_topk_ref(logits, uniform, k)
    assert_same_topk(got, sort_oracle(logits, uniform, k), vocab)
    # Decreasing keys, distinct ids.
    assert (got[0][:, 1:] <= got[0][:, :-1]).all()
    assert all(len(set(row.tolist())) == k for row in got[1])


@pytest.mark.parametrize("k", [1, 8, 300])
def test_reference_with_masked_logits(k: int) -> None:
    logits, uniform = make_inputs(4, 300, seed=k)
    add_masks(logits, k)
    keys, ids = gumbel_topk_ref(logits, uniform, k)
    assert_same_topk((keys, ids), sort_oracle(logits, uniform, k), 300)
    # The -inf keys are at the end of the rows, and exactly the -inf logits' (row 0 has
    # k // 2 finite entries, row 2 none).
    finite = torch.isfinite(keys)
    assert finite[0].sum() == k // 2 and not finite[2].any() and finite[3].all()
    assert torch.equal(finite, finite.cummin(1).values)
    assert torch.isfinite(logits.gather(1, ids)[finite]).all()


# Critical values of the chi-square law at p = 0.001 (scipy.stats.chi2.ppf(0.999, dof)).
CHI2_CRITICAL = {4: 18.467, 19: 43.820}


def chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    expected = probabilities.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_reference_samples_without_replacement() -> None:
    """With 5 tokens and 20000 seeded draws: the first id follows softmax(logits) and the pair
    (first, second) follows P(i, j) = p_i p_j / (1 - p_i) (j != i), the law of two draws
    without replacement."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)
    draws, vocab = 20_000, 5
    logits = p.log().float().expand(draws, vocab)
    uniform = torch.rand(draws, vocab, generator=torch.Generator().manual_seed(1234))
    _, ids = gumbel_topk_ref(logits, uniform.clamp_min(torch.finfo(torch.float32).tiny), 2)
    assert (ids[:, 0] != ids[:, 1]).all()

    first = torch.bincount(ids[:, 0], minlength=vocab)
    assert chi_square(first, p) < CHI2_CRITICAL[vocab - 1]
    # The test has power: the law at temperature 1/1.2 is rejected by far.
    sharper = torch.softmax(p.log() * 1.2, 0)
    assert chi_square(first, sharper) > 5 * CHI2_CRITICAL[vocab - 1]

    pairs = [(i, j) for i, j in itertools.product(range(vocab), repeat=2) if i != j]
    index = {pair: n for n, pair in enumerate(pairs)}
    joint = torch.tensor([float(p[i] * p[j] / (1 - p[i])) for i, j in pairs])
    assert math.isclose(float(joint.sum()), 1.0)
    cells = torch.tensor([index[(i, j)] for i, j in ids.tolist()])
    counts = torch.bincount(cells, minlength=len(pairs))
    assert chi_square(counts, joint) < CHI2_CRITICAL[len(pairs) - 1]
    # ... while the second id's law is not the first's (what drawing with replacement gives).
    second = torch.bincount(ids[:, 1], minlength=vocab)
    assert chi_square(second, p) > 5 * CHI2_CRITICAL[vocab - 1]


def test_bad_arguments_are_refused() -> None:
    logits, uniform = make_inputs(2, 10)
    for fn in (gumbel_topk_ref, gumbel_topk_triton):
        with pytest.raises(ValueError, match="k = 0"):
            fn(logits, uniform, 0)
        with pytest.raises(ValueError, match="k = 11"):
            fn(logits, uniform, 11)
        with pytest.raises(ValueError, match="uniform"):
            fn(logits, uniform[:, :9], 3)
        with pytest.raises(ValueError, match="expected"):
            fn(logits[0], uniform[0], 3)


# ---------------------------------------------------------------------------------------------
# The Triton kernel (interpreted)

# (B, V, k): one block (V = 200), a partial last block (5000), 32 blocks (32768).
TRITON_CASES = [
    (1, 200, 1),
    (3, 200, 64),
    (3, 5000, 1),
    (1, 5000, 8),
    (3, 5000, 64),
    (3, 32768, 8),
    (1, 32768, 64),
]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("batch", "vocab", "k"), TRITON_CASES)
def test_triton_equals_reference(batch: int, vocab: int, k: int) -> None:
    logits, uniform = make_inputs(batch, vocab, seed=batch * vocab + k)
    got = gumbel_topk_triton(logits, uniform, k)
    # The interpreter's numpy log may differ from torch's by an ulp: keys close, ids exact.
    assert_same_topk(got, gumbel_topk_ref(logits, uniform, k), vocab, exact=False)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("vocab", "k"), [(200, 64), (5000, 8), (5000, 64)])
def test_triton_with_masked_logits(vocab: int, k: int) -> None:
    logits, uniform = make_inputs(4, vocab, seed=vocab + k)
    add_masks(logits, k)
    got = gumbel_topk_triton(logits, uniform, k)
    assert_same_topk(got, gumbel_topk_ref(logits, uniform, k), vocab, exact=False)


@pytest.mark.usefixtures("interpret")
def test_triton_without_rows() -> None:
    keys, ids = gumbel_topk_triton(torch.zeros(0, 5000), torch.full((0, 5000), 0.5), 4)
    assert keys.shape == ids.shape == (0, 4) and ids.dtype == torch.int64


def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU tensors the kernel runs only under TRITON_INTERPRET=1, and never above
    KERNEL_MAX_K."""
    calls = []

    def spy(logits, uniform, k):
        calls.append(k)
        return gumbel_topk_ref(logits, uniform, k)

    monkeypatch.setattr(gumbel, "gumbel_topk_triton", spy)
    logits, uniform = make_inputs(2, 1000)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expected = gumbel_topk_ref(logits, uniform, 4)
    got = gumbel_topk(logits, uniform, 4)
    assert calls == [] and all(map(torch.equal, got, expected))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gumbel_topk(logits, uniform, 4)
    gumbel_topk(logits, uniform, gumbel.KERNEL_MAX_K + 1)
    assert calls == [4]


def test_triton_kernel_compiles_for_a_gpu(compile_for_h100) -> None:
    """No GPU here: compile the kernel to SASS for an H100 (sm_90), which catches what the
    interpreter lets through (types, reductions of tuples, control flow)."""
    kernel = gumbel._jitted(False)
    compile_for_h100(kernel, {"BLOCK_V": gumbel.BLOCK_V}, {"ids_ptr": "i32"}, "fp32")
