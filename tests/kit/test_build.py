"""The kit build: every output loads (engine, transformers, PEFT), bit-for-bit reproducible, cached,
never half-written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.llm_engine import EngineConfig, LLMEngine
from engine.types import Request, SamplingParams, StoppingCriteria
from kernels.build import cpu_flags
from kit import build, data, train
from kit.build import KitPaths, build_kit, default_kit_dir, recipe_hash
from kit.tasks import TASKS

from .conftest import MICRO

MODEL_MEMBERS = (
    ["base-large", "base-small"]
    + [f"{kind}-{task}" for task in TASKS for kind in ("expert", "ft")]
    + ["ft-multi"]
)
ADAPTER_MEMBERS = [f"lora-{task}" for task in TASKS]


def test_kit_has_every_member_and_describes_its_tasks(micro_kit: str) -> None:
    kit = KitPaths.open(micro_kit)
    assert kit.task_names == tuple(TASKS)
    for name in MODEL_MEMBERS + ADAPTER_MEMBERS:
        assert kit.member(name).is_dir()
    described = json.loads((Path(micro_kit) / "tasks.json").read_text())["tasks"]
    assert [task["name"] for task in described] == list(TASKS)
    record = next(task for task in described if task["name"] == "record")
    assert record["answer_format"] == "json" and record["json_schema"]["type"] == "object"
    summary = json.loads((Path(micro_kit) / "kit.json").read_text())
    assert summary["recipe_hash"] == recipe_hash(MICRO)
    assert set(summary["jobs"]) == set(MODEL_MEMBERS + ADAPTER_MEMBERS)


@pytest.mark.parametrize("member", MODEL_MEMBERS)
def test_engine_loads_every_model_and_matches_transformers(micro_kit: str, member: str) -> None:
    path = str(Path(micro_kit) / member)
    engine = LLMEngine.from_dir(path, EngineConfig(kv_cache_bytes=4 << 20))
    reference = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(reference).__name__ == "LlamaForCausalLM"
    assert reference.config.vocab_size == len(tokenizer) == train.FULL_VOCAB_SIZE
    prompt = tokenizer("Add: 12 + 45 =").input_ids
    # Greedy by hand: generate() with min_new_tokens would also ban EOS, which the engine's
    # ignore_eos does not.
    expected = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            expected.append(int(reference(torch.tensor([expected])).logits[0, -1].argmax()))
    expected = expected[len(prompt) :]
    output = engine.generate(
        [
            Request(
                "r",
                prompt,
                SamplingParams(temperature=0.0),
                StoppingCriteria(max_new_tokens=6, ignore_eos=True),
            )
        ]
    )["r"]
    assert output.token_ids == expected


def test_micro_build_is_bit_for_bit_reproducible(micro_kit: str, tmp_path: Path) -> None:
    again = build_kit(tmp_path / "again", MICRO, progress=False)
    for name in MODEL_MEMBERS + ADAPTER_MEMBERS:
        weights = "adapter_model.safetensors" if name.startswith("lora") else "model.safetensors"
        first = load_file(Path(micro_kit) / name / weights)
        second = load_file(Path(again) / name / weights)
        assert first.keys() == second.keys(), name
        for key, tensor in first.items():
            assert torch.equal(tensor, second[key]), f"{name}: {key}"
    for name in ADAPTER_MEMBERS:
        config = "adapter_config.json"
        assert (Path(micro_kit) / name / config).read_text() == (
            Path(again) / name / config
        ).read_text()


def test_two_workers_build_the_same_bits_as_one(micro_kit: str, tmp_path: Path) -> None:
    """base-large alone on its threads first, then the other jobs in two worker processes: the
    same weights as every job one after the other in this process."""
    pooled = build_kit(tmp_path / "pooled", replace(MICRO, workers=2), progress=False)
    for name in MODEL_MEMBERS + ADAPTER_MEMBERS:
        weights = "adapter_model.safetensors" if name.startswith("lora") else "model.safetensors"
        first = load_file(Path(micro_kit) / name / weights)
        second = load_file(Path(pooled) / name / weights)
        assert all(torch.equal(tensor, second[key]) for key, tensor in first.items()), name


def test_training_precision_is_the_cpus_unless_set(micro_kit: str, tmp_path: Path) -> None:
    """ "auto" trains in bf16 only on CPUs that multiply it in hardware (their flags), and says
    so in kit.json; the other precision, set in the recipe, is another kit (name and weights)."""
    flags = cpu_flags()
    auto = "bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "fp32"
    assert json.loads((Path(micro_kit) / "kit.json").read_text())["precision"] == auto
    other = "fp32" if auto == "bf16" else "bf16"
    recipe = replace(MICRO, precision=other)
    assert recipe_hash(recipe) != recipe_hash(MICRO)
    built = Path(build_kit(tmp_path / other, recipe, progress=False))
    assert json.loads((built / "kit.json").read_text())["precision"] == other
    first = load_file(Path(micro_kit) / "base-large" / "model.safetensors")
    second = load_file(built / "base-large" / "model.safetensors")
    assert first.keys() == second.keys()
    assert any(not torch.equal(tensor, second[key]) for key, tensor in first.items())
    with pytest.raises(ValueError, match="precision 'fp16'"):
        recipe_hash(replace(MICRO, precision="fp16"))


def test_fine_tunes_start_from_their_base(micro_kit: str) -> None:
    """ft-T keeps base-large's unseen embedding rows; only seen rows and layers trained on."""
    base = load_file(Path(micro_kit) / "base-large" / "model.safetensors")
    tuned = load_file(Path(micro_kit) / "ft-add" / "model.safetensors")
    embedding, tuned_embedding = (
        base["model.embed_tokens.weight"],
        tuned["model.embed_tokens.weight"],
    )
    changed = (embedding != tuned_embedding).any(dim=1)
    summary = json.loads((Path(micro_kit) / "kit.json").read_text())
    assert 0 < int(changed.sum()) <= summary["distinct_tokens_trained"]
    assert not torch.equal(
        base["model.layers.0.mlp.down_proj.weight"], tuned["model.layers.0.mlp.down_proj.weight"]
    )


def test_unseen_tokens_keep_near_zero_embeddings(micro_kit: str) -> None:
    summary = json.loads((Path(micro_kit) / "kit.json").read_text())
    embedding = load_file(Path(micro_kit) / "base-large" / "model.safetensors")[
        "model.embed_tokens.weight"
    ]
    tiny = embedding.norm(dim=1) < 1e-2
    assert int((~tiny).sum()) == summary["distinct_tokens_trained"]
    # Near zero but distinct, so unseen logits never tie in argmax or top-k.
    assert torch.unique(embedding[tiny], dim=0).shape[0] == int(tiny.sum())


def test_training_objective_is_the_saved_models_full_vocabulary_loss(micro_kit: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(Path(micro_kit) / "base-large")
    tokenizer = AutoTokenizer.from_pretrained(Path(micro_kit) / "base-large")
    documents = data.general_documents(0, [], 0.0)
    ids = tokenizer(" ".join(next(documents) for _ in range(20))).input_ids
    inputs, targets = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    full_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    # The kit's token space: the embedding rows training moved away from near zero.
    trained_rows = model.get_input_embeddings().weight.norm(dim=1) > 1e-2
    space = train.TokenSpace(torch.nonzero(trained_rows).flatten())
    objective = train.full_vocab_cross_entropy(
        logits[..., space.seen_ids], space.compact(targets), space.unseen_count
    )
    # Exact up to the unseen tokens' logits, which are ~0 rather than 0.
    torch.testing.assert_close(objective, full_loss, atol=2e-3, rtol=0)


def test_full_vocab_cross_entropy_matches_explicit_zero_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    seen_logits = torch.randn(3, 5, 7, generator=generator) * 3
    targets = torch.randint(0, 7, (3, 5), generator=generator)
    explicit = torch.cat([seen_logits, torch.zeros(3, 5, 11)], dim=-1)
    expected = torch.nn.functional.cross_entropy(explicit.reshape(-1, 18), targets.reshape(-1))
    torch.testing.assert_close(train.full_vocab_cross_entropy(seen_logits, targets, 11), expected)
    mask = targets > 2
    masked = torch.nn.functional.cross_entropy(explicit[mask], targets[mask])
    torch.testing.assert_close(
        train.full_vocab_cross_entropy(seen_logits, targets, 11, mask), masked
    )


def test_second_call_uses_the_cache(
    micro_kit: str, kit_cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Path(micro_kit) == kit_cache_root / f"kit-{recipe_hash(MICRO)}"

    def must_not_build(*args: object, **kwargs: object) -> str:
        raise AssertionError("the cached kit was rebuilt")

    monkeypatch.setattr(build, "build_kit", must_not_build)
    assert default_kit_dir(str(kit_cache_root), progress=False, recipe=MICRO) == micro_kit


def test_cache_root_defaults_to_tandem_home(
    micro_kit: str, kit_cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(kit_cache_root.parent / "home"))
    monkeypatch.setattr(build, "build_kit", lambda out, recipe, progress: str(out))
    path = default_kit_dir(progress=False, recipe=MICRO)
    assert Path(path) == kit_cache_root.parent / "home" / "models" / Path(micro_kit).name


def test_recipe_hash_changes_with_the_recipe() -> None:
    assert recipe_hash(MICRO) == recipe_hash(build.Recipe(**vars(MICRO)))
    assert recipe_hash(MICRO) != recipe_hash(build.Recipe(**{**vars(MICRO), "seed": 1}))


def test_failed_build_leaves_no_kit_and_no_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(train, "train", crash)
    with pytest.raises(RuntimeError, match="mid-training"):
        default_kit_dir(str(tmp_path), progress=False, recipe=MICRO)
    # Only the lock file remains: no kit directory, no staging directory.
    assert [path.name for path in tmp_path.iterdir()] == [f".kit-{recipe_hash(MICRO)}.lock"]


def test_build_refuses_a_non_empty_directory_before_training(tmp_path: Path) -> None:
    existing = tmp_path / "kit"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_kit(existing, MICRO, progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["kit"]
