"""Merged LoRA adapters (engine.lora_merge) against PEFT's add_weighted_adapter.

Oracle: one PEFT model holding three random adapters of different ranks and overlapping target
sets; PEFT merges them into a new adapter per combination type, and we compare each projection's
delta (B @ A, which the sign ambiguity of the SVD leaves alone) and the model's logits with the
merged adapter active. Our "linear" is PEFT's "cat" (PEFT's "linear" is another, inexact thing).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from engine.batch import ForwardBatch
from engine.llm_engine import EngineConfig, LLMEngine
from engine.lora import PROJECTIONS, AdapterStacks, LoraAdapter, LoraWeights, load_adapter
from engine.lora_merge import merge_adapters, save_adapter
from engine.model import CausalLM
from engine.types import AdapterError, InvalidRequest, Request, SamplingParams, StoppingCriteria

# name -> LoraConfig options: ranks 8 / 4 / 6, targets overlapping (q everywhere, down in two).
ADAPTERS: dict[str, dict] = {
    "one": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
    },
    "two": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,  # its scaling (8 / 2) must reach the merge
        "target_modules": ["q_proj", "k_proj", "up_proj", "down_proj"],
    },
    "three": {"r": 6, "lora_alpha": 3, "target_modules": ["q_proj", "gate_proj"]},
}
WEIGHTS = [0.7, -0.5, 1.2]
PEFT_TYPES = {
    "linear": "cat",
    "cat": "cat",
    "svd": "svd",
    "ties": "ties_svd",
    "dare_linear": "dare_linear_svd",
    "dare_ties": "dare_ties_svd",
}
PROMPT = [5, 17, 42, 99, 3, 150, 77, 8, 61, 120]
ATOL = 1e-5  # float32 deltas (entries O(0.1)) on both sides; the logits (O(10)) get 1e-4
BLOCK_SIZE = 4
# PEFT warns that density 1 prunes nothing, which is the point of those cases.
pytestmark = pytest.mark.filterwarnings("ignore:The density 1.0 is greater")


@dataclass
class Setup:
    tiny_path: Path
    peft: PeftModel  # holds "one", "two", "three" and every merged adapter the tests add
    model: CausalLM  # the engine's float32 model of the same checkpoint
    adapters: list[LoraAdapter]  # "one", "two", "three" loaded by the engine


@pytest.fixture(scope="module")
def setup(tiny_model: Callable, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    tiny = tiny_model("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny.path, dtype=torch.float32, attn_implementation="eager"
    )
    names = list(ADAPTERS)
    peft = get_peft_model(hf, LoraConfig(**ADAPTERS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, LoraConfig(**ADAPTERS[name]))
    peft.eval()
    # PEFT zeroes lora_B; draw both factors at scales that move the logits visibly.
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    out = tmp_path_factory.mktemp("lora-merge")
    model = CausalLM.from_dir(tiny.path)
    peft.save_pretrained(out)  # one directory per adapter
    adapters = [load_adapter(out / name, model.config) for name in names]
    return Setup(tiny.path, peft, model, adapters)


_merge_names = itertools.count()


def peft_merge(setup: Setup, method: str, **options) -> str:
    """PEFT's merge of the three adapters with WEIGHTS as a new adapter; its name."""
    name = f"{method}-{next(_merge_names)}"  # PEFT ignores a merge under an existing name
    setup.peft.add_weighted_adapter(
        list(ADAPTERS), WEIGHTS, name, combination_type=PEFT_TYPES[method], **options
    )
    return name


def peft_deltas(peft: PeftModel, adapter_name: str) -> dict[tuple[int, str], torch.Tensor]:
    out = {}
    for name, module in peft.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out[(layer, parts[-1])] = module.get_delta_weight(adapter_name).detach()
    return out


def deltas(adapter: LoraAdapter) -> dict[tuple[int, str], torch.Tensor]:
    return {key: w.b.float() @ w.a.float() for key, w in adapter.weights.items()}


def assert_deltas_match(merged: LoraAdapter, expected: dict, atol: float = ATOL) -> None:
    actual = deltas(merged)
    assert actual.keys() == expected.keys()
    for key, delta in expected.items():
        torch.testing.assert_close(actual[key], delta, atol=atol, rtol=0.0, msg=str(key))


def engine_logits(model: CausalLM, adapter: LoraAdapter | None) -> torch.Tensor:
    """Every prompt row's logits from one prefill of CausalLM.forward."""
    kv = model.new_kv_cache(8, BLOCK_SIZE)
    batch = ForwardBatch.build([PROMPT], [len(PROMPT)], [[0, 1, 2]], BLOCK_SIZE)
    batch.logits_indices = torch.arange(batch.num_tokens)
    uses = [((adapter, 1.0),)] if adapter is not None else [()]
    lora = AdapterStacks(model.config, dtype=model.dtype).batch(uses, [len(PROMPT)])
    return model.forward(batch, kv, lora)


def peft_logits(peft: PeftModel, adapter_name: str) -> torch.Tensor:
    peft.set_adapter(adapter_name)
    with torch.no_grad():
        return peft(torch.tensor([PROMPT]), use_cache=False).logits[0]


# ---- against PEFT ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "density"),
    [
        ("linear", 1.0),
        ("cat", 1.0),
        ("svd", 1.0),
        ("ties", 1.0),
        ("ties", 0.4),  # magnitude trimming is deterministic
        ("dare_linear", 1.0),  # density 1: no random drops
        ("dare_ties", 1.0),
    ],
)
def test_merge_matches_peft(setup: Setup, method: str, density: float) -> None:
    options = {"density": density} if method in ("ties", "dare_linear", "dare_ties") else {}
    name = peft_merge(setup, method, **options)  # PEFT needs a density for these
    merged = merge_adapters(setup.adapters, WEIGHTS, method, **options)
    assert_deltas_match(merged, peft_deltas(setup.peft, name))
    expected = peft_logits(setup.peft, name)
    torch.testing.assert_close(engine_logits(setup.model, merged), expected, atol=1e-4, rtol=0)
    # Guard: the merge moves the logits, so the comparison above means something.
    assert (engine_logits(setup.model, None) - expected).abs().max() > 0.1
    # Exact methods have rank sum of ranks; SVD methods the inputs' largest (8).
    ranks = {w.rank for w in merged.weights.values()}
    # q: one + two + three, down: one + two, v and o: one, gate: three, k and up: two.
    assert ranks == ({18, 12, 8, 6, 4} if method in ("linear", "cat") else {8})


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_the_same_draws_matches_peft(
    setup: Setup, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEFT draws its DARE masks from torch's global generator; fed the draws of a generator
    seeded like ours, its merge equals ours: same masks, in the same order."""
    bernoulli = torch.bernoulli
    generator = torch.Generator().manual_seed(11)
    monkeypatch.setattr(torch, "bernoulli", lambda p: bernoulli(p, generator=generator))
    name = peft_merge(setup, method, density=0.3)
    monkeypatch.undo()
    merged = merge_adapters(setup.adapters, WEIGHTS, method, density=0.3, seed=11)
    assert_deltas_match(merged, peft_deltas(setup.peft, name))


def test_explicit_rank_matches_peft(setup: Setup) -> None:
    name = peft_merge(setup, "ties", density=0.6, svd_rank=3)
    merged = merge_adapters(setup.adapters, WEIGHTS, "ties", density=0.6, rank=3)
    assert {w.rank for w in merged.weights.values()} == {3}
    assert_deltas_match(merged, peft_deltas(setup.peft, name))


def test_engine_serves_a_merged_adapter(setup: Setup, sentencepiece_tokenizer) -> None:
    merged = merge_adapters(setup.adapters, WEIGHTS, "dare_ties", density=0.5, seed=3)
    engine = LLMEngine(
        setup.model, sentencepiece_tokenizer, EngineConfig(kv_cache_bytes=1 << 20, block_size=4)
    )
    engine.add_adapter("merged", merged)
    request = Request(
        "r",
        PROMPT,
        SamplingParams(temperature=0.0),
        StoppingCriteria(max_new_tokens=6, ignore_eos=True),
        adapters=(("merged", 1.0),),
    )
    tokens = engine.generate([request])["r"].token_ids
    # The oracle: the checkpoint with the merged delta added to its weights.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        setup.tiny_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    state = reference.state_dict()
    prefix = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn"}
    prefix |= {"o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    with torch.no_grad():
        for (layer, proj), delta in deltas(merged).items():
            state[f"model.layers.{layer}.{prefix[proj]}.{proj}.weight"].add_(delta)
        expected = reference.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=6)
    assert tokens == expected[0, len(PROMPT) :].tolist()


# ---- the merged adapter itself ---------------------------------------------------------------


def test_merged_adapter_is_a_new_adapter_of_the_same_base(setup: Setup) -> None:
    merged = merge_adapters(setup.adapters, WEIGHTS, "ties", density=0.5)
    assert merged.fits(setup.model.config)
    assert merged.uid not in {a.uid for a in setup.adapters}
    assert merged.dtype == torch.float32
    assert merged.projections == set(PROJECTIONS)  # the union of the inputs' targets
    assert merged.config.scaling_for("model.layers.0.self_attn.q_proj", merged.max_rank) == 1.0
    again = merge_adapters(setup.adapters, WEIGHTS, "ties", density=0.5)
    assert again.uid != merged.uid


def test_bfloat16_inputs_give_a_bfloat16_merge(setup: Setup) -> None:
    bf16 = [a.to(torch.bfloat16) for a in setup.adapters]
    # The same values in float32: only the rounding of the merged factors differs (rounding
    # the inputs can flip a TIES sign election, so the float32 originals are no reference).
    widened = [a.to(torch.float32) for a in bf16]
    for method in ("linear", "ties"):
        merged = merge_adapters(bf16, WEIGHTS, method)
        assert merged.dtype == torch.bfloat16
        reference = deltas(merge_adapters(widened, WEIGHTS, method))
        for key, delta in deltas(merged).items():
            torch.testing.assert_close(delta, reference[key], atol=5e-3, rtol=0.02)


def test_dare_drops_and_rescales_reproducibly(setup: Setup) -> None:
    """One adapter at full rank (the SVD then loses nothing): the merge is w * delta * mask /
    density, with about `density` of the entries kept, the same for the same seed."""
    adapter, weight, density = setup.adapters[0], 1.5, 0.3
    original = deltas(adapter)

    def dare(seed: int) -> dict[tuple[int, str], torch.Tensor]:
        merged = merge_adapters(
            [adapter], [weight], "dare_linear", density=density, rank=128, seed=seed
        )
        return deltas(merged)

    merged = dare(seed=5)
    kept = total = 0
    for key, delta in merged.items():
        expected = weight * original[key] / density
        mask = delta.abs() > 1e-4
        torch.testing.assert_close(delta[mask], expected[mask], atol=1e-4, rtol=0)
        assert delta[~mask].abs().max() < 1e-4
        kept += int(mask.sum())
        total += mask.numel()
    # ~28k entries: the kept fraction is within 5 standard deviations (about 0.014) of 0.3.
    assert abs(kept / total - density) < 0.015
    assert all(torch.equal(dare(seed=5)[key], merged[key]) for key in merged)
    assert any(not torch.allclose(dare(seed=6)[key], merged[key]) for key in merged)


def test_ties_elects_signs_and_averages_the_agreeing_entries() -> None:
    """Two one-projection adapters whose deltas are known matrices (A = identity)."""
    signature = (1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2)

    def adapter(delta: list[list[float]]) -> LoraAdapter:
        weights = {(0, "q_proj"): LoraWeights(torch.eye(2), torch.tensor(delta))}
        return LoraAdapter("x", None, weights, signature)  # type: ignore[arg-type]

    first = adapter([[1.0, -2.0], [0.5, 0.0]])
    second = adapter([[3.0, 1.0], [-4.0, 0.0]])
    merged = merge_adapters([first, second], [1.0, 0.5], "ties", rank=2)
    # Entry by entry: signs elected from the summed deltas (+, -, -, none); the weighted
    # entries that agree averaged: (1 + 1.5) / 2, -2, 0.5 * -4, 0.
    expected = torch.tensor([[1.25, -2.0], [-2.0, 0.0]])
    torch.testing.assert_close(deltas(merged)[(0, "q_proj")], expected)


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "method", "options", "message"),
    [
        ([1.0], "linear", {}, "1 weights for 3 adapters"),
        ([1.0, float("nan"), 1.0], "linear", {}, "not a finite number"),
        ([1.0, float("inf"), 1.0], "ties", {}, "not a finite number"),
        ([1.0, "2", 1.0], "ties", {}, "not a finite number"),
        ([1.0, 1.0, 1.0], "magic", {}, "unknown merge method 'magic'"),
        ([1.0, 1.0, 1.0], "ties_svd", {}, "supported: linear, cat, svd, ties"),
        ([1.0, 1.0, 1.0], "ties", {"density": 0.0}, r"density 0.0 is not in \(0, 1\]"),
        ([1.0, 1.0, 1.0], "dare_ties", {"density": 1.5}, "density 1.5"),
        ([1.0, 1.0, 1.0], "dare_linear", {"density": float("nan")}, "density nan"),
        ([1.0, 1.0, 1.0], "linear", {"density": 0.5}, "density applies to ties"),
        ([1.0, 1.0, 1.0], "ties", {"rank": 0}, r"rank 0 is not in 1\.\.256"),
        ([1.0, 1.0, 1.0], "svd", {"rank": 257}, "rank 257"),
        ([1.0, 1.0, 1.0], "svd", {"rank": 2.5}, "rank 2.5"),
        ([1.0, 1.0, 1.0], "cat", {"rank": 8}, "takes no rank"),
    ],
)
def test_invalid_arguments(
    setup: Setup, weights: list, method: str, options: dict, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message) as error:
        merge_adapters(setup.adapters, weights, method, **options)
    assert error.value.kind == "invalid_argument"


def test_nothing_to_merge(setup: Setup) -> None:
    with pytest.raises(InvalidRequest, match="no adapters to merge"):
        merge_adapters([], [], "linear")


def test_adapters_of_other_bases_are_refused(setup: Setup) -> None:
    a = setup.adapters[0]
    other = LoraAdapter(a.path, a.config, a.weights, (3, *a.base_signature[1:]))
    with pytest.raises(AdapterError, match="other shapes") as error:
        merge_adapters([a, other], [1.0, 1.0], "ties")
    assert error.value.kind == "failed_precondition"


def test_exact_merge_over_the_rank_limit_is_refused(setup: Setup) -> None:
    many = [setup.adapters[0]] * 33  # 33 * 8 = 264 > 256
    with pytest.raises(AdapterError, match=r"rank 264.*use method 'svd'"):
        merge_adapters(many, [1.0] * 33, "linear")
    assert merge_adapters(many, [1.0] * 33, "svd").max_rank == 8


# ---- saved as a PEFT directory -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_saved_merge_reads_back_in_the_engine_and_in_peft(
    setup: Setup, method: str, tmp_path: Path
) -> None:
    options = {"density": 0.5} if method == "ties" else {}
    merged = merge_adapters(setup.adapters, WEIGHTS, method, **options)
    save_adapter(merged, tmp_path / "merged")
    # The engine reads back the same factors (per-module ranks, scaling 1).
    again = load_adapter(tmp_path / "merged", setup.model.config)
    assert again.weights.keys() == merged.weights.keys()
    for key, weights in merged.weights.items():
        assert torch.equal(again.weights[key].a, weights.a), key
        assert torch.equal(again.weights[key].b, weights.b), key
    # PEFT reads the directory as the same adapter: its logits are the engine's.
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        setup.tiny_path, dtype=torch.float32, attn_implementation="eager"
    )
    peft = PeftModel.from_pretrained(hf, tmp_path / "merged").eval()
    with torch.no_grad():
        expected = peft(torch.tensor([PROMPT]), use_cache=False).logits[0]
    torch.testing.assert_close(engine_logits(setup.model, merged), expected, atol=1e-4, rtol=0)
