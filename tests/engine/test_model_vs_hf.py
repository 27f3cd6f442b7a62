"""The engine's model against Hugging Face transformers (eager attention) on tiny random
checkpoints of every supported architecture, through a paged KV cache with scattered blocks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.batch import ForwardBatch
from engine.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from engine.kv_cache import KVCache
from engine.model import CausalLM
from engine.types import UnsupportedModel
from kernels import cpu_linear

BLOCK_SIZE = 4
NUM_BLOCKS = 12
# Deliberately out of order so that a sequence's tokens are scattered over the pool.
TABLE_A = [5, 2, 7, 0, 9, 3]
TABLE_B = [1, 8, 4, 6, 10, 11]
ATOL = 1e-4  # float32 engine vs float32 transformers
PROMPT_LEN = 12
NEW_TOKENS = 10

ALL_VARIANTS = [
    "llama",
    "llama_attention_bias",
    "llama_rope_linear",
    "llama_rope_llama3",
    "mistral_window",
    "qwen2_tied",
    "qwen2_window",
    "qwen3_tied",
    "qwen3_untied",
]
WINDOW_VARIANTS = ["mistral_window", "qwen2_window"]


def random_tokens(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (length,), generator=generator).tolist()


def hf_logits(hf: transformers.PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] float32: one full forward, no cache."""
    with torch.no_grad():
        return hf(torch.tensor([tokens]), use_cache=False).logits[0].float()


def step(
    model: CausalLM,
    kv: KVCache,
    chunks: list[tuple[list[int], int, list[int]]],
    all_rows: bool = False,
) -> torch.Tensor:
    """One forward pass; chunks are (new tokens, context length after them, block table)."""
    batch = ForwardBatch.build(
        [new for new, _, _ in chunks],
        [length for _, length, _ in chunks],
        [table for _, _, table in chunks],
        BLOCK_SIZE,
    )
    if all_rows:
        batch.logits_indices = torch.arange(batch.num_tokens)
    return model.forward(batch, kv)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_prefill_decode_and_greedy_match_hf(tiny_model: Callable, variant: str) -> None:
    tiny = tiny_model(variant)
    model = CausalLM.from_dir(tiny.path)
    prompt = random_tokens(0, PROMPT_LEN)
    generated = tiny.hf.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS
    )[0].tolist()
    expected = hf_logits(tiny.hf, generated)
    kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)

    logits = step(model, kv, [(prompt, PROMPT_LEN, TABLE_A)], all_rows=True)
    assert logits.dtype == torch.float32
    assert_close(logits, expected[:PROMPT_LEN])
    ours = [int(logits[-1].argmax())]
    for position in range(PROMPT_LEN, len(generated) - 1):
        logits = step(model, kv, [([ours[-1]], position + 1, TABLE_A)])
        assert_close(logits[0], expected[position])
        ours.append(int(logits[0].argmax()))
    assert ours == generated[PROMPT_LEN:]


@pytest.mark.parametrize("variant", ["llama", "qwen3_untied", *WINDOW_VARIANTS])
def test_chunked_prefill_matches_hf(tiny_model: Callable, variant: str) -> None:
    tiny = tiny_model(variant)
    model = CausalLM.from_dir(tiny.path)
    tokens = random_tokens(1, 20)
    expected = hf_logits(tiny.hf, tokens)
    kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    start = 0
    # The last chunk starts past the sliding windows, so they cut into its cached prefix.
    for end in (5, 12, 20):
        logits = step(model, kv, [(tokens[start:end], end, TABLE_A)], all_rows=True)
        assert_close(logits, expected[start:end])
        start = end


@pytest.mark.parametrize("variant", ["llama", "qwen2_window"])
def test_prefill_runs_torchs_fused_attention(tiny_model: Callable, variant: str) -> None:
    """torch's fused CPU attention takes only 4-D inputs; 3-D ones fall back to the unfused math
    path (about 10x slower on 512-token prompts). With only the fused kernel allowed, a prompt
    chunk and a chunk over its cached prefix (an explicit mask) still run and match."""
    tiny = tiny_model(variant)
    model = CausalLM.from_dir(tiny.path)
    tokens = random_tokens(2, 20)
    expected = hf_logits(tiny.hf, tokens)
    kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        first = step(model, kv, [(tokens[:12], 12, TABLE_A)], all_rows=True)
        rest = step(model, kv, [(tokens[12:], 20, TABLE_A)], all_rows=True)
    assert_close(torch.cat([first, rest]), expected)


@pytest.mark.parametrize("variant", ["llama", "qwen3_tied", *WINDOW_VARIANTS])
def test_sequences_batched_together_match_hf(tiny_model: Callable, variant: str) -> None:
    tiny = tiny_model(variant)
    model = CausalLM.from_dir(tiny.path)
    seq_a, seq_b = random_tokens(2, 20), random_tokens(3, 18)
    expected_a, expected_b = hf_logits(tiny.hf, seq_a), hf_logits(tiny.hf, seq_b)
    kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)

    # Two prefills of different lengths.
    logits = step(model, kv, [(seq_a[:12], 12, TABLE_A), (seq_b[:7], 7, TABLE_B)], all_rows=True)
    assert_close(logits[:12], expected_a[:12])
    assert_close(logits[12:], expected_b[:7])
    # A decodes while B prefills its next chunk.
    logits = step(
        model, kv, [(seq_a[12:13], 13, TABLE_A), (seq_b[7:11], 11, TABLE_B)], all_rows=True
    )
    assert_close(logits[0], expected_a[12])
    assert_close(logits[1:], expected_b[7:11])
    # Decode-only batches with contexts of different lengths, past the sliding windows.
    for a_len, b_len in zip(range(14, 21), range(12, 19), strict=True):
        logits = step(
            model,
            kv,
            [
                (seq_a[a_len - 1 : a_len], a_len, TABLE_A),
                (seq_b[b_len - 1 : b_len], b_len, TABLE_B),
            ],
        )
        assert_close(logits[0], expected_a[a_len - 1])
        assert_close(logits[1], expected_b[b_len - 1])


@pytest.mark.parametrize("variant", WINDOW_VARIANTS)
def test_sliding_window_matters_in_these_tests(tiny_model: Callable, variant: str) -> None:
    """Guard: without its window the reference would give other logits, so the tests above
    really check the window."""
    tiny = tiny_model(variant)
    config = transformers.AutoConfig.from_pretrained(tiny.path)
    config.sliding_window = None
    config.use_sliding_window = False
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(
        tiny.path, config=config, attn_implementation="eager"
    ).eval()
    tokens = random_tokens(1, 20)
    difference = (hf_logits(unwindowed, tokens) - hf_logits(tiny.hf, tokens)).abs().amax(-1)
    assert difference[-1] > 0.1


def test_sharded_checkpoint_with_index(tiny_model: Callable, tmp_path: Path) -> None:
    tiny = tiny_model("qwen3_untied")
    tiny.hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = CausalLM.from_dir(tmp_path)
    tokens = random_tokens(4, 9)
    kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    logits = step(model, kv, [(tokens, len(tokens), TABLE_B)], all_rows=True)
    assert_close(logits, hf_logits(tiny.hf, tokens))


def test_tied_embeddings_share_one_tensor(tiny_model: Callable) -> None:
    tied = CausalLM.from_dir(tiny_model("qwen3_tied").path)
    untied = CausalLM.from_dir(tiny_model("qwen3_untied").path)
    assert tied.weights.lm_head is tied.weights.embed
    assert untied.weights.lm_head is not untied.weights.embed


def _decode_run(
    model: CausalLM, tokens: list[int], prefill_ends: tuple[int, ...] = (PROMPT_LEN,)
) -> torch.Tensor:
    """Logits of every position: prefill of the first 12 tokens (in chunks ending at
    prefill_ends), then one decode step each."""
    kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    rows = []
    for start, end in zip((0, *prefill_ends), prefill_ends, strict=False):
        rows.append(step(model, kv, [(tokens[start:end], end, TABLE_A)], all_rows=True))
    for length in range(PROMPT_LEN + 1, len(tokens) + 1):
        rows.append(step(model, kv, [(tokens[length - 1 : length], length, TABLE_A)]))
    return torch.cat(rows)


def _hf_reference(path: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("prefill_ends", [(PROMPT_LEN,), (5, PROMPT_LEN)])
@pytest.mark.parametrize("variant", ["llama", "qwen2_tied", *WINDOW_VARIANTS])
def test_bf16_checkpoint_close_to_hf_bf16(
    tiny_model: Callable, variant: str, prefill_ends: tuple[int, ...]
) -> None:
    """bf16 runs kernels.cpu_attention's kernel for prompts where the CPU has AVX-512 BF16:
    whole and chunked, with and without a window."""
    tiny = tiny_model(variant, torch.bfloat16)
    model = CausalLM.from_dir(tiny.path)
    assert model.config.dtype == torch.bfloat16
    assert model.weights.layers[0].qkv.dtype == torch.bfloat16
    tokens = random_tokens(5, 20)
    ours = _decode_run(model, tokens, prefill_ends)
    theirs = hf_logits(_hf_reference(tiny.path, torch.bfloat16), tokens)
    # Both round differently at bf16 (~0.4% per op); a real mistake moves logits by whole units.
    assert (ours - theirs).abs().max() < 0.3
    assert (ours - theirs).abs().mean() < 0.03
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9


def test_dtype_override_both_ways(tiny_model: Callable) -> None:
    bf16_checkpoint = tiny_model("qwen3_untied", torch.bfloat16)
    # bf16 weights widened to float32 are exact, so this matches transformers doing the same.
    widened = CausalLM.from_dir(bf16_checkpoint.path, dtype=torch.float32)
    assert widened.weights.layers[0].gate_up.dtype == torch.float32
    tokens = random_tokens(6, 16)
    assert_close(_decode_run(widened, tokens), hf_logits(bf16_checkpoint.hf, tokens))

    fp32_checkpoint = tiny_model("qwen3_untied")
    narrowed = CausalLM.from_dir(fp32_checkpoint.path, dtype="bfloat16")
    assert narrowed.weights.layers[0].gate_up.dtype == torch.bfloat16
    theirs = hf_logits(_hf_reference(fp32_checkpoint.path, torch.bfloat16), tokens)
    assert (_decode_run(narrowed, tokens) - theirs).abs().mean() < 0.03


# --- config parsing -------------------------------------------------------------------------


def _write_config(model_dir: Path, **changes: object) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def _copy_of(tiny_model: Callable, variant: str, tmp_path: Path) -> Path:
    copy = tmp_path / variant
    shutil.copytree(tiny_model(variant).path, copy)
    return copy


def test_unsupported_architecture_names_the_supported_ones(
    tiny_model: Callable, tmp_path: Path
) -> None:
    model_dir = _copy_of(tiny_model, "llama", tmp_path)
    _write_config(model_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel") as error:
        CausalLM.from_dir(model_dir)
    for architecture in SUPPORTED_ARCHITECTURES:
        assert architecture in str(error.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn.*llama3"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"dtype": "float8_e4m3fn"}, "dtype"),
    ],
)
def test_unsupported_options(
    tiny_model: Callable, tmp_path: Path, changes: dict, message: str
) -> None:
    model_dir = _copy_of(tiny_model, "llama", tmp_path)
    _write_config(model_dir, **changes)
    with pytest.raises(UnsupportedModel, match=message):
        ModelConfig.from_dir(model_dir)


def test_missing_config_or_weights(tiny_model: Callable, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        CausalLM.from_dir(tmp_path)
    shutil.copy(tiny_model("llama").path / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        CausalLM.from_dir(tmp_path)


def test_pre_v5_rope_fields_and_generation_eos(tiny_model: Callable, tmp_path: Path) -> None:
    """Checkpoints written before transformers 5 keep rope_theta/rope_scaling at the top level."""
    model_dir = _copy_of(tiny_model, "llama", tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_theta"] = 500000.0
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config["torch_dtype"] = config.pop("dtype")
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    parsed = ModelConfig.from_dir(model_dir)
    assert parsed.rope_theta == 500000.0
    assert parsed.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert parsed.eos_token_ids == (7, 2)
    assert parsed.dtype == torch.float32

    _write_config(model_dir, rope_scaling={"type": "linear", "factor": 2.0})
    assert ModelConfig.from_dir(model_dir).rope_scaling == RopeScaling("linear", 2.0)


def test_sliding_windows_per_layer(tiny_model: Callable) -> None:
    assert ModelConfig.from_dir(tiny_model("mistral_window").path).sliding_windows == (8, 8)
    assert ModelConfig.from_dir(tiny_model("qwen2_window").path).sliding_windows == (None, 6)
    assert ModelConfig.from_dir(tiny_model("qwen2_tied").path).sliding_windows == (None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_decode_in_one_call_is_the_layers_one_by_one(
    tiny_model: Callable, variant: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps of two sequences (different lengths, scattered blocks, sliding windows that
    cut in) through kernels.cpu_decode's one C call, the LM head included, give the very logits
    and KV cache of the layers and the LM head run one by one in Python."""
    model = CausalLM.from_dir(tiny_model(variant, dtype).path)
    one_call = CausalLM._decode_in_one_call
    used = []

    def run(fast: bool) -> tuple[list[torch.Tensor], KVCache]:
        def decode_in_one_call(self, *args) -> tuple | None:
            prepared = one_call(self, *args) if fast else None
            used.append(prepared is not None and prepared[2] is not None)
            return prepared

        monkeypatch.setattr(CausalLM, "_decode_in_one_call", decode_in_one_call)
        kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
        a, b = random_tokens(3, PROMPT_LEN), random_tokens(4, 7)
        logits = [step(model, kv, [(a, len(a), TABLE_A), (b, len(b), TABLE_B)], all_rows=True)]
        for _ in range(NEW_TOKENS):
            next_a, next_b = (int(row.argmax()) for row in logits[-1][-2:])
            a, b = [*a, next_a], [*b, next_b]
            logits.append(
                step(model, kv, [([next_a], len(a), TABLE_A), ([next_b], len(b), TABLE_B)])
            )
        return logits, kv

    expected, expected_kv = run(fast=False)
    assert not any(used)
    used.clear()
    assert model.decode_kernels().startswith("no decode step yet")  # the Python path ran
    got, got_kv = run(fast=True)
    assert used == [False] + [True] * NEW_TOKENS  # the prefill is not a decode step
    wanted = f"decode steps in one C call, linear {cpu_linear.current_variant(dtype)}"
    assert model.decode_kernels() == wanted
    for actual, wanted in zip(got, expected, strict=True):
        assert torch.equal(actual, wanted)
    for pools, wanted_pools in (
        (got_kv.keys, expected_kv.keys),
        (got_kv.values, expected_kv.values),
    ):
        assert all(torch.equal(p, w) for p, w in zip(pools, wanted_pools, strict=True))
