"""The built-in model: reproducible build, loadable by transformers, cached, never half-written.

Every test uses a micro recipe (seconds to train); the full recipe is never trained here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import builtin
from engine.builtin import Recipe, build_model_dir, default_model_dir, recipe_hash

MICRO = Recipe(
    layers=1,
    hidden_size=32,
    heads=2,
    kv_heads=1,
    intermediate_size=64,
    max_position_embeddings=64,
    seq_len=32,
    batch_size=4,
    steps=8,
    warmup_steps=2,
    learning_rate=3e-2,
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def micro_dir(cache_root: Path) -> str:
    return default_model_dir(str(cache_root), progress=False, recipe=MICRO)


def test_micro_build_is_bit_for_bit_reproducible(micro_dir: str, tmp_path: Path) -> None:
    again = build_model_dir(tmp_path / "again", MICRO, progress=False)
    first = load_file(Path(micro_dir) / "model.safetensors")
    second = load_file(Path(again) / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, second[name]), name


def test_micro_model_loads_and_generates_with_transformers(micro_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(micro_dir)
    tokenizer = AutoTokenizer.from_pretrained(micro_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == builtin.FULL_VOCAB_SIZE
    assert model.config.tie_word_embeddings
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert model.generation_config.eos_token_id == 2

    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    output = model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert output.shape == (1, prompt.shape[1] + 4)


def test_saved_model_has_learned_its_corpus_with_full_vocabulary_logits(micro_dir: str) -> None:
    summary = json.loads((Path(micro_dir) / "tandem_builtin.json").read_text())
    assert summary["recipe"] == vars(MICRO)
    model = AutoModelForCausalLM.from_pretrained(micro_dir)
    assert summary["parameters"] == model.num_parameters()

    tokenizer = Tokenizer.from_file(str(Path(micro_dir) / "tokenizer.json"))
    windows = builtin._corpus_tokens(tokenizer, MICRO).view(-1, MICRO.seq_len + 1)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    full_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    # An untrained model is uniform over the 32768 tokens: loss ln(32768) = 10.4.
    assert full_loss < 10.0
    # The training objective (seen tokens' logits plus one constant for the unseen ones) is
    # what the saved full-vocabulary model actually scores.
    seen = torch.unique(windows)
    objective = builtin.full_vocab_cross_entropy(
        logits[..., seen],
        torch.searchsorted(seen, targets.contiguous()),
        builtin.FULL_VOCAB_SIZE - len(seen),
    )
    torch.testing.assert_close(objective, full_loss, atol=1e-3, rtol=0)


def test_unseen_tokens_keep_near_zero_embeddings(micro_dir: str) -> None:
    summary = json.loads((Path(micro_dir) / "tandem_builtin.json").read_text())
    embedding = load_file(Path(micro_dir) / "model.safetensors")["model.embed_tokens.weight"]
    row_norms = embedding.norm(dim=1)
    tiny = row_norms < 1e-2
    assert int((~tiny).sum()) == summary["distinct_tokens_trained"]
    # Near zero but distinct, so unseen logits never tie in argmax or top-k.
    assert torch.unique(embedding[tiny], dim=0).shape[0] == int(tiny.sum())


def test_full_vocab_cross_entropy_matches_explicit_zero_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    seen_logits = torch.randn(3, 5, 7, generator=generator) * 3
    targets = torch.randint(0, 7, (3, 5), generator=generator)
    unseen_count = 11
    explicit = torch.cat([seen_logits, torch.zeros(3, 5, unseen_count)], dim=-1)
    expected = torch.nn.functional.cross_entropy(explicit.reshape(-1, 18), targets.reshape(-1))
    actual = builtin.full_vocab_cross_entropy(seen_logits, targets, unseen_count)
    torch.testing.assert_close(actual, expected)


def test_second_call_uses_the_cache(
    micro_dir: str, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Path(micro_dir) == cache_root / f"builtin-{recipe_hash(MICRO)}"

    def must_not_build(*args: object, **kwargs: object) -> str:
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(builtin, "build_model_dir", must_not_build)
    assert default_model_dir(str(cache_root), progress=False, recipe=MICRO) == micro_dir


def test_cache_root_defaults_to_tandem_home(
    micro_dir: str, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(cache_root.parent / "home"))
    monkeypatch.setattr(builtin, "build_model_dir", lambda out, recipe, progress: str(out))
    path = default_model_dir(progress=False, recipe=MICRO)
    assert Path(path) == cache_root.parent / "home" / "models" / Path(micro_dir).name


def test_recipe_hash_changes_with_the_recipe() -> None:
    assert recipe_hash(MICRO) == recipe_hash(Recipe(**vars(MICRO)))
    assert recipe_hash(MICRO) != recipe_hash(Recipe(**{**vars(MICRO), "seed": 1}))


def test_failed_build_leaves_no_model_and_no_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(builtin, "_train", crash)
    with pytest.raises(RuntimeError, match="mid-training"):
        default_model_dir(str(tmp_path), progress=False, recipe=MICRO)
    # Only the lock file remains: no model directory, no staging directory.
    assert [path.name for path in tmp_path.iterdir()] == [f".builtin-{recipe_hash(MICRO)}.lock"]


def test_build_refuses_a_non_empty_directory_before_training(tmp_path: Path) -> None:
    existing = tmp_path / "model"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_model_dir(existing, MICRO, progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
    assert [path.name for path in existing.iterdir()] == ["notes.txt"]
