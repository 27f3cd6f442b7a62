"""Sparse activation (WINA / TEAL) in the engine's model: dense bit for bit when off or at 0,
exactly the target fraction skipped in top-k mode, close to it with calibrated thresholds, and
the same logits as Hugging Face transformers (and PEFT) whose projections see inputs masked by
forward pre-hooks that choose the channels independently of the engine's code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

import engine.model as model_module
from engine.batch import ForwardBatch
from engine.lora import AdapterStacks, load_adapter
from engine.model import CausalLM
from engine.sparsity import (
    GROUPS,
    Calibration,
    SkipCounter,
    SparsityError,
    SparsitySettings,
    apply_sparsity,
    build_plan,
    calibrate,
    keep_count,
)
from kernels import cpu_linear
from kernels import sparse as sparse_kernels
from kernels.cpu_decode import DecodeLayers

BLOCK_SIZE = 4
NUM_BLOCKS = 16
PROMPT_LEN = 12
NEW_TOKENS = 6
ATOL = 1e-4
LEVELS = [0.25, 0.4, 0.5, 0.65]
# HF module names of each group's projections (q/k/v and gate/up share their input).
HF_GROUPS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


def random_tokens(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (length,), generator=generator).tolist()


def run(model: CausalLM, prompt: list[int], new_tokens: int, lora=None) -> torch.Tensor:
    """Prefill `prompt` (logits of every row), then greedy decode steps; [len + new - 1, V]."""
    kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    table = list(range(NUM_BLOCKS))
    batch = ForwardBatch.build([prompt], [len(prompt)], [table], BLOCK_SIZE)
    batch.logits_indices = torch.arange(len(prompt))
    rows = [model.forward(batch, kv, lora and lora([len(prompt)]))]
    tokens = list(prompt)
    for _ in range(new_tokens - 1):
        tokens.append(int(rows[-1][-1].argmax()))
        batch = ForwardBatch.build([tokens[-1:]], [len(tokens)], [table], BLOCK_SIZE)
        rows.append(model.forward(batch, kv, lora and lora([1])))
    return torch.cat(rows)


def with_sparsity(path: Path, **settings: object) -> CausalLM:
    model = CausalLM.from_dir(path)
    apply_sparsity(model, SparsitySettings(**settings))  # type: ignore[arg-type]
    return model


def calibration_of(model: CausalLM, seed: int = 100, sequences: int = 8) -> Calibration:
    return calibrate(model, [random_tokens(seed + i, 32) for i in range(sequences)])


@pytest.fixture(scope="module")
def sidecar(tiny_model: Callable, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama variant's sidecar, calibrated on random tokens (its "text")."""
    path = tmp_path_factory.mktemp("sparsity") / "llama.safetensors"
    calibration_of(CausalLM.from_dir(tiny_model("llama").path)).save(path)
    return path


# ---- dense when off or at 0 ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama", "qwen2_tied", "qwen3_untied"])
def test_off_and_zero_are_bit_identical_to_dense(tiny_model: Callable, variant: str) -> None:
    path = tiny_model(variant).path
    prompt = random_tokens(0, PROMPT_LEN)
    dense = run(CausalLM.from_dir(path), prompt, NEW_TOKENS)
    for rule in ("wina", "teal"):
        assert torch.equal(run(with_sparsity(path, sparsity=0.0, rule=rule), prompt, 6), dense)
    # Sparse, then off again: the weights go back to their dense layout.
    model = with_sparsity(path, sparsity=0.5)
    assert not torch.equal(run(model, prompt, NEW_TOKENS), dense)
    model.set_sparsity(None)
    assert all(getattr(layer, g).is_contiguous() for layer in model.weights.layers for g in GROUPS)
    assert torch.equal(run(model, prompt, NEW_TOKENS), dense)
    assert model.sparsity is None


def test_threshold_mode_at_zero_is_dense(tiny_model: Callable, sidecar: Path) -> None:
    path = tiny_model("llama").path
    prompt = random_tokens(0, PROMPT_LEN)
    model = with_sparsity(path, sparsity=0.0, mode="threshold", calibration_file=str(sidecar))
    assert torch.equal(run(model, prompt, NEW_TOKENS), run(CausalLM.from_dir(path), prompt, 6))


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_random_adapter(hf: transformers.PreTrainedModel, out: Path):
    """A rank-4 PEFT LoRA on every projection of `hf`, random, saved to `out`; the PEFT model."""
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    peft.save_pretrained(out)
    return peft


def adapter_batches(model: CausalLM, adapter_dir: Path) -> Callable:
    """lens -> the LoraBatch of one sequence with the adapter at `adapter_dir`."""
    stacks = AdapterStacks(model.config, dtype=model.dtype)
    adapter = load_adapter(str(adapter_dir), model.config)
    return lambda lens: stacks.batch([((adapter, 1.0),)], lens)


@pytest.mark.parametrize("with_adapter", [False, True])
@pytest.mark.parametrize("mode", ["top-k", "threshold"])
@pytest.mark.parametrize("variant", ["llama_attention_bias", "qwen3_untied"])
def test_decode_in_one_call_is_the_python_path(
    tiny_model: Callable, tmp_path: Path, variant: str, mode: str, with_adapter: bool
) -> None:
    """A sparse model's decode steps run in one C call (kernels.cpu_decode, the sparse kernel
    inside, and the adapters on the masked input); counting skipped channels runs them layer by
    layer from Python: the same logits, bit for bit, and the C call was really taken."""
    path = tiny_model(variant).path
    model = CausalLM.from_dir(path)
    if not sparse_kernels.variants():  # elsewhere the kernels must build: the one call is taken
        pytest.skip("this CPU has neither AVX-512 nor AVX2: no sparse kernel")
    file = ""
    if mode == "threshold":
        file = str(tmp_path / "sidecar.safetensors")
        calibration_of(model).save(file)
    settings = SparsitySettings(0.5, "wina", mode, file)
    apply_sparsity(model, settings)
    layered = CausalLM.from_dir(path)
    apply_sparsity(layered, settings)
    layered.skip_counter = SkipCounter()
    prompt = random_tokens(5, PROMPT_LEN)
    lora = layered_lora = None
    if with_adapter:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        save_random_adapter(hf, tmp_path / "adapter")
        lora = adapter_batches(model, tmp_path / "adapter")
        layered_lora = adapter_batches(layered, tmp_path / "adapter")
    assert torch.equal(
        run(model, prompt, NEW_TOKENS, lora), run(layered, prompt, NEW_TOKENS, layered_lora)
    )
    step = model._decode_layers
    assert isinstance(step, DecodeLayers) and step.sparse
    assert layered.skip_counter.fraction() > 0.4  # the layers were sparse
    linear_variant = cpu_linear.current_variant(model.dtype)
    sparse_variant = sparse_kernels.current_variant()
    assert model.decode_kernels() == (
        f"decode steps in one C call, linear {linear_variant}, sparse {sparse_variant}"
    )
    assert layered.decode_kernels().startswith("no decode step yet")  # counting: layer by layer


def test_sparse_layout_does_not_grow_memory(tiny_model: Callable) -> None:
    model = with_sparsity(tiny_model("llama").path, sparsity=0.4)
    for layer in model.weights.layers:
        for group in GROUPS:
            weight = getattr(layer, group)
            # [N, K] as before, a view of W.T stored contiguously: one copy of the weights.
            assert weight.t().is_contiguous()
            assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()


# ---- how much is skipped ---------------------------------------------------------------------


def capture_masks(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Every sparse projection's (K, skipped channels per row, channels per row that tie with
    the threshold), recomputed from what the model hands the kernel: its input, column norms
    and thresholds."""
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    original = model_module.sparse_linear

    def spy(x, weight_t, col_norms, thresholds, bias=None):
        scores = x.float().abs() * (1.0 if col_norms is None else col_norms)
        skipped = (scores < thresholds[:, None]).sum(dim=1)
        seen.append((x.shape[1], skipped, (scores == thresholds[:, None]).sum(dim=1)))
        return original(x, weight_t, col_norms, thresholds, bias)

    monkeypatch.setattr(model_module, "sparse_linear", spy)
    return seen


@pytest.mark.parametrize("rule", ["wina", "teal"])
@pytest.mark.parametrize("level", LEVELS)
def test_top_k_skips_exactly_the_target_per_group(
    tiny_model: Callable, monkeypatch: pytest.MonkeyPatch, rule: str, level: float
) -> None:
    model = with_sparsity(tiny_model("qwen3_untied").path, sparsity=level, rule=rule)
    model.skip_counter = SkipCounter()
    seen = capture_masks(monkeypatch)
    run(model, random_tokens(1, PROMPT_LEN), NEW_TOKENS)
    assert len(seen) == 4 * model.config.num_layers * NEW_TOKENS
    exact = 0
    for width, skipped, ties in seen:
        target = round(level * width)
        # Channels that tie with the k-th best are all kept. Real ties: at position 0 the
        # attention output is v, copied to each query head of the kv head (GQA).
        assert ((skipped == target) | ((skipped < target) & (ties > target - skipped))).all()
        exact += int((skipped == target).sum())
    assert exact >= 0.95 * sum(len(skipped) for _, skipped, _ in seen)
    widths = {"qkv": 64, "o": 128, "gate_up": 64, "down": 128}  # qwen3_untied: head_dim 32
    for group in GROUPS:
        expected = round(level * widths[group]) / widths[group]
        assert model.skip_counter.fraction(group) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("rule", ["wina", "teal"])
def test_threshold_mode_skips_close_to_the_target_on_calibration_like_text(
    tiny_model: Callable, sidecar: Path, rule: str
) -> None:
    path = tiny_model("llama").path
    for level in LEVELS:
        model = with_sparsity(
            path, sparsity=level, rule=rule, mode="threshold", calibration_file=str(sidecar)
        )
        model.skip_counter = SkipCounter()
        for seed in range(4):  # other random tokens than the calibration's
            run(model, random_tokens(500 + seed, 24), 1)
        # Upstream sparsity shifts the later groups' inputs a little from the dense
        # calibration's, and the tiny model has few channels: a few points either way.
        assert model.skip_counter.fraction() == pytest.approx(level, abs=0.04), level
        for group in GROUPS:
            assert model.skip_counter.fraction(group) == pytest.approx(level, abs=0.1), group


# ---- against transformers with masked inputs -------------------------------------------------


def hf_group_norms(hf: torch.nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """||W[:, j]|| of each group's projections stacked (they share one mask)."""
    block = hf.get_submodule(f"model.layers.{layer}")
    return {
        group: torch.cat([block.get_submodule(n).weight for n in names]).norm(dim=0)
        for group, names in HF_GROUPS.items()
    }


def mask_hooks(
    hf: torch.nn.Module, module_prefix: str, rule: str, choose: Callable
) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward pre-hooks zeroing the input channels that `choose(scores, layer, group)` (a bool
    keep mask) drops, on every projection under `module_prefix` (the base model or PEFT's)."""
    handles = []
    for layer in range(hf.config.num_hidden_layers):
        norms = hf_group_norms(hf, layer)
        for group, names in HF_GROUPS.items():
            for name in names:

                def hook(module, args, layer=layer, group=group, col=norms[group]):
                    x = args[0]
                    scores = x.abs() * (col if rule == "wina" else 1.0)
                    return (x * choose(scores, layer, group).to(x.dtype), *args[1:])

                module = hf.get_submodule(f"{module_prefix}model.layers.{layer}.{name}")
                handles.append(module.register_forward_pre_hook(hook))
    return handles


def top_k_chooser(level: float) -> Callable:
    def choose(scores: torch.Tensor, layer: int, group: str) -> torch.Tensor:
        width = scores.shape[-1]
        kept = scores.topk(width - round(level * width), dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kept, True)

    return choose


def hf_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens]), use_cache=False).logits[0].float()


def greedy_continuation(hf: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new_tokens - 1):
        tokens.append(int(hf_logits(hf, tokens)[-1].argmax()))
    return tokens


@pytest.mark.parametrize("rule", ["wina", "teal"])
@pytest.mark.parametrize("variant", ["llama", "llama_attention_bias", "qwen3_untied"])
def test_top_k_matches_transformers_with_masked_inputs(
    tiny_model: Callable, variant: str, rule: str
) -> None:
    tiny = tiny_model(variant)
    level = 0.5
    prompt = random_tokens(2, PROMPT_LEN)
    handles = mask_hooks(tiny.hf, "", rule, top_k_chooser(level))
    try:
        tokens = greedy_continuation(tiny.hf, prompt, NEW_TOKENS)
        expected = hf_logits(tiny.hf, tokens)
    finally:
        for handle in handles:
            handle.remove()
    logits = run(with_sparsity(tiny.path, sparsity=level, rule=rule), prompt, NEW_TOKENS)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0.0)
    # Guard: sparsity changed the logits, so the comparison above means something.
    assert (hf_logits(tiny.hf, tokens) - expected).abs().max() > 0.1


@pytest.mark.parametrize("rule", ["wina", "teal"])
def test_threshold_mode_matches_transformers_with_masked_inputs(
    tiny_model: Callable, sidecar: Path, rule: str
) -> None:
    tiny = tiny_model("llama")
    settings = SparsitySettings(0.4, rule, "threshold", str(sidecar))
    model = CausalLM.from_dir(tiny.path)
    plan = build_plan(model.config, model.weights, settings)
    model.set_sparsity(plan)

    def choose(scores: torch.Tensor, layer: int, group: str) -> torch.Tensor:
        return scores >= plan.layers[layer][group].threshold

    prompt = random_tokens(3, PROMPT_LEN)
    handles = mask_hooks(tiny.hf, "", rule, choose)
    try:
        tokens = greedy_continuation(tiny.hf, prompt, NEW_TOKENS)
        expected = hf_logits(tiny.hf, tokens)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(run(model, prompt, NEW_TOKENS), expected, atol=ATOL, rtol=0.0)


def test_lora_sees_the_sparse_input_like_peft_with_masked_inputs(
    tiny_model: Callable, tmp_path: Path
) -> None:
    tiny = tiny_model("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny.path, dtype=torch.float32, attn_implementation="eager"
    )
    peft = save_random_adapter(hf, tmp_path)
    level, prompt = 0.4, random_tokens(4, PROMPT_LEN)
    # Hooks on PEFT's wrappers: the base weight and the adapter both see the masked input.
    base = peft.base_model.model
    handles = mask_hooks(base, "", "wina", top_k_chooser(level))
    try:
        tokens = greedy_continuation(peft, prompt, NEW_TOKENS)
        expected = hf_logits(peft, tokens)
    finally:
        for handle in handles:
            handle.remove()
    model = with_sparsity(tiny.path, sparsity=level)
    logits = run(model, prompt, NEW_TOKENS, adapter_batches(model, tmp_path))
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0.0)


# ---- the sidecar -----------------------------------------------------------------------------


def test_sidecar_round_trip(tiny_model: Callable, sidecar: Path) -> None:
    model = CausalLM.from_dir(tiny_model("llama").path)
    fresh = calibration_of(model)
    loaded = Calibration.load(sidecar)
    assert loaded.header["num_layers"] == 2 and loaded.header["tokens"] == 8 * 32
    for layer in range(2):
        for group in GROUPS:
            assert torch.equal(loaded.col_norms[layer][group], fresh.col_norms[layer][group])
            for rule in ("wina", "teal"):
                low = loaded.threshold(rule, layer, group, 0.25)
                high = loaded.threshold(rule, layer, group, 0.5)
                assert 0 < low < high


def test_top_k_keep_counts() -> None:
    assert [keep_count(64, s) for s in (0.0, 0.25, 0.4, 0.5, 0.65)] == [64, 48, 38, 32, 22]


def test_bad_sidecars_are_refused_clearly(
    tiny_model: Callable, sidecar: Path, tmp_path: Path
) -> None:
    llama = tiny_model("llama").path

    def refused(file: Path, path: Path = llama, **settings: object) -> str:
        with pytest.raises(SparsityError) as error:
            with_sparsity(path, sparsity=0.4, calibration_file=str(file), **settings)
        return str(error.value)

    assert "not found" in refused(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert "not a safetensors file" in refused(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    assert "not a Tandem sparsity file" in refused(tmp_path / "other.safetensors")
    # Another model's shape (qwen3_untied: q heads of 32 dims make `o` 128 wide).
    assert "channels" in refused(sidecar, tiny_model("qwen3_untied").path)
    # The same shape, other weights.
    assert "calibrated on other weights" in refused(sidecar, tiny_model("qwen2_tied").path)
    with pytest.raises(SparsityError, match="needs a calibration file"):
        SparsitySettings(0.4, mode="threshold")
    with pytest.raises(SparsityError, match=r"\[0, 1\)"):
        SparsitySettings(1.0)
