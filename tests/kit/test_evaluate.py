"""`tandem eval`: the engine's answers and scores against transformers on the same examples."""

from __future__ import annotations

import json
import math
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
