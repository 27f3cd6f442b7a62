"""`tandem eval`: the engine's answers and scores against transformers on the same examples."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kit.evaluate import EvalOptions, evaluate
from kit.tasks import TASKS, held_out_examples, perplexity_documents
from server.cli import main

LIMIT = 12


def _transformers_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2)
    # The continuation's text as it reads after the prompt (a lone decode drops a leading space).
    whole = tokenizer.decode(out[0], skip_special_tokens=True)
    prefix = tokenizer.decode(ids[0], skip_special_tokens=True)
    return whole[len(prefix) :].split("\n")[0]


@pytest.mark.parametrize("task_name", list(TASKS))
def test_accuracy_is_the_exact_match_rate_of_greedy_answers(micro_kit: str, task_name: str) -> None:
    task = TASKS[task_name]
    model_dir = str(Path(micro_kit) / f"ft-{task_name}")
    result = evaluate(EvalOptions(task=task_name, model=model_dir, limit=LIMIT, details=True))
    assert result["task"] == task_name and result["n"] == LIMIT
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected_correct = 0
    for example, scored in zip(held_out_examples(task)[:LIMIT], result["examples"], strict=True):
        answer = _transformers_answer(model, tokenizer, example.prompt, task.max_new_tokens)
        assert scored["prompt"] == example.prompt
        assert scored["output"] == answer
        expected_correct += task.score(answer, example.answer)
    assert result["correct"] == expected_correct
    assert result["accuracy"] == expected_correct / LIMIT


def test_perplexity_matches_transformers(micro_kit: str) -> None:
    model_dir = str(Path(micro_kit) / "base-small")
    result = evaluate(EvalOptions(task="ppl", model=model_dir, limit=LIMIT))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    for document in perplexity_documents()[:LIMIT]:
        ids = torch.tensor([[*tokenizer(document).input_ids, tokenizer.eos_token_id]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        total -= logprobs.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_eval_command_prints_one_json_object(
    micro_kit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = str(Path(micro_kit) / "ft-add")
    assert main(["eval", "--task", "add", "--model", model_dir, "--limit", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"task", "n", "accuracy"} <= set(result) and result["n"] == 3


def test_eval_command_rejects_an_unknown_task(
    micro_kit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = str(Path(micro_kit) / "ft-add")
    assert main(["eval", "--task", "poetry", "--model", model_dir]) == 2
    assert "unknown task 'poetry'" in capsys.readouterr().err


@torch.no_grad()
def _fused_answer(models: list, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy z_large + (z_expert - z_small), one full forward of each model per token."""
    large, small, expert = models
    ids = tokenizer(prompt).input_ids
    start = len(ids)
    for _ in range(max_new_tokens):
        x = torch.tensor([ids])
        z = large(x).logits[0, -1] + expert(x).logits[0, -1] - small(x).logits[0, -1]
        ids.append(int(z.argmax()))
        if ids[-1] == 2:
            break
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    return whole[len(tokenizer.decode(ids[:start], skip_special_tokens=True)) :].split("\n")[0]


def test_eval_with_an_expert_fuses_it_like_transformers(micro_kit: str) -> None:
    """Static fusion (alpha 1, proxy tuning) of expert-add into base-large, every answer
    against three transformers models stepped by hand."""
    kit = Path(micro_kit)
    options = EvalOptions(
        task="add",
        model=str(kit / "base-large"),
        limit=LIMIT,
        details=True,
        experts=(str(kit / "expert-add"),),
        small_base=str(kit / "base-small"),
        fusion="static",
    )
    result = evaluate(options)
    assert result["experts"] == [str(kit / "expert-add")] and result["fusion"] == "static"
    models = [
        AutoModelForCausalLM.from_pretrained(kit / name)
        for name in ("base-large", "base-small", "expert-add")
    ]
    tokenizer = AutoTokenizer.from_pretrained(kit / "base-large")
    task = TASKS["add"]
    for example, scored in zip(held_out_examples(task)[:LIMIT], result["examples"], strict=True):
        assert scored["output"] == _fused_answer(
            models, tokenizer, example.prompt, task.max_new_tokens
        )
    # The expert changes answers (else the comparison above would not show fusion at all).
    alone = evaluate(EvalOptions(task="add", model=options.model, limit=LIMIT, details=True))
    assert any(
        a["output"] != b["output"]
        for a, b in zip(alone["examples"], result["examples"], strict=True)
    )


def test_eval_command_with_several_experts_and_routing(
    micro_kit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = Path(micro_kit)
    experts = [arg for t in TASKS for arg in ("--expert", str(kit / f"expert-{t}"))]
    base = ["eval", "--task", "record", "--model", str(kit / "base-large"), "--limit", "3"]
    small = ["--small-base", str(kit / "base-small")]
    assert main([*base, *experts, *small, "--routing", "kl"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["routing"] == "kl" and len(result["experts"]) == len(TASKS)
    assert result["n"] == 3
    # Experts without their small base: a clear error, not a crash.
    assert main([*base, *experts]) == 2
    assert "--small-base" in capsys.readouterr().err


def test_report_fusion_tables(micro_kit: str) -> None:
    from kit.report import fusion_table

    table = fusion_table(micro_kit, limit=2, progress=False)
    lines = table.splitlines()
    assert lines[0].startswith("| task | base-large | + expert, static")
    assert sum(line.startswith("| mean |") for line in lines) == 2
    assert all(f"| {t} |" in table for t in TASKS)


# ---- sparse activation -----------------------------------------------------------------------


def test_eval_with_sparsity(micro_kit: str, capsys: pytest.CaptureFixture[str]) -> None:
    """At sparsity 0 the scores are the dense ones; in top-k mode exactly the fraction asked
    for is skipped (the micro model's groups are 32 and 64 wide: 0.5 is exact)."""
    model_dir = str(Path(micro_kit) / "base-large")
    dense = evaluate(EvalOptions(task="ppl", model=model_dir, limit=LIMIT))
    zero = evaluate(EvalOptions(task="ppl", model=model_dir, limit=LIMIT, sparsity=0.0))
    assert zero["perplexity"] == dense["perplexity"]
    assert zero["skipped"] == {"all": 0.0, "qkv": 0.0, "o": 0.0, "gate_up": 0.0, "down": 0.0}
    base = ["eval", "--task", "ppl", "--model", model_dir, "--limit", "3", "--sparsity", "0.5"]
    assert main([*base, "--sparsity-rule", "teal"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["sparsity"], result["sparsity_rule"], result["sparsity_mode"]) == (
        0.5,
        "teal",
        "top-k",
    )
    assert set(result["skipped"].values()) == {0.5}
    assert result["perplexity"] != dense["perplexity"]
    assert main([*base, "--sparsity-mode", "threshold"]) == 2
    assert "needs a calibration file" in capsys.readouterr().err


def test_report_sparsity_table(micro_kit: str) -> None:
    from kit.report import sparsity_table

    # Threshold mode without a file: the report calibrates base-large first.
    levels = (0.25, 0.5)
    table = sparsity_table(micro_kit, limit=2, mode="threshold", progress=False, levels=levels)
    lines = table.splitlines()
    assert lines[0].startswith("| sparsity | skipped WINA / TEAL | ppl WINA | ppl TEAL")
    assert all(f"{task} (lora) WINA / TEAL" in lines[0] for task in TASKS)
    assert lines[2].startswith("| 0% (dense) |")
    assert [line.split(" | ")[0] for line in lines[3:]] == [f"| {level:.0%}" for level in levels]


def _satisfies_or_ran_out(example: dict, accept) -> bool:
    """A constrained answer satisfies its constraint, unless the token budget cut it short."""
    return accept(example["output"]) or example["finish_reason"] == "length"


@pytest.mark.parametrize("method", ["awrs", "mask", "smc"])
def test_eval_under_the_task_schema_gives_valid_answers(micro_kit: str, method: str) -> None:
    """The micro kit's record model (a few training steps: its free answers rarely parse)
    constrained by the task's schema with every string and number bounded: its greedy answers
    may loop inside a string (what it learned depends on the CPU type), the bounded schema
    ends them within the budget. Every answer validates against the task's schema (Draft
    2020-12)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(TASKS["record"].json_schema)
    bounded = copy.deepcopy(TASKS["record"].json_schema)
    for field in bounded["properties"].values():
        field.update({"maxLength": 4} if field["type"] == "string" else {"maximum": 99})

    def accept(output: str) -> bool:
        if not output.startswith(" "):
            return False
        try:
            return validator.is_valid(json.loads(output[1:]))
        except json.JSONDecodeError:
            return False

    model_dir = str(Path(micro_kit) / "ft-record")
    options = EvalOptions(
        task="record", model=model_dir, limit=6, details=True,
        constraint=f"json-schema:{json.dumps(bounded)}", constraint_method=method, particles=3,
    )  # fmt: skip
    result = evaluate(options)
    examples = result["examples"]
    assert all(_satisfies_or_ran_out(example, accept) for example in examples), examples
    ended = [example for example in examples if example["finish_reason"] != "length"]
    assert result["constraint_valid"] == sum(accept(e["output"]) for e in examples) / 6
    assert result["schema_valid"] == result["constraint_valid"]
    assert ended, "no answer ended within the budget: the test checked nothing"
    # Unconstrained, the same model's answers do not parse (the constraint did the work).
    free = evaluate(EvalOptions(task="record", model=model_dir, limit=6))
    assert free["schema_valid"] < result["schema_valid"]
    if method == "awrs":
        assert result["constraint_checks_per_token"] >= 1.0
    if method == "mask":
        assert result["constraint_masks_per_token"] == 1.0


def test_eval_under_a_regex_constraint(micro_kit: str) -> None:
    model_dir = str(Path(micro_kit) / "base-small")
    options = EvalOptions(
        task="add", model=model_dir, limit=8, details=True, constraint="regex:[0-9]{1,3}"
    )
    result = evaluate(options)
    for example in result["examples"]:
        assert _satisfies_or_ran_out(
            example, lambda out: re.fullmatch(" [0-9]{1,3}", out) is not None
        ), example
    assert result["constraint_valid"] > 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("schema", "task 'add' has no JSON schema"),
        ("regex:(", "--constraint regex:"),
        ("json-schema:{", "not JSON"),
        ('json-schema:{"type": 5}', "--constraint json-schema:"),
        ("xml", "expected schema, regex:PATTERN or json-schema"),
    ],
)
def test_eval_command_refuses_bad_constraints(
    micro_kit: str, capsys: pytest.CaptureFixture[str], spec: str, message: str
) -> None:
    model_dir = str(Path(micro_kit) / "ft-add")
    assert main(["eval", "--task", "add", "--model", model_dir, "--constraint", spec]) == 2
    assert message in capsys.readouterr().err
