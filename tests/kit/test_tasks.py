"""Kit tasks: held-out sets never trained on, exact-match scoring, engine-consistent encoding."""

from __future__ import annotations

import json
from itertools import islice

import jsonschema
import pytest
from tokenizers import Tokenizer

from kit import data
from kit.tasks import (
    TASKS,
    Example,
    get_task,
    held_out_examples,
    perplexity_documents,
    train_examples,
)


@pytest.mark.parametrize("name", list(TASKS))
def test_held_out_prompts_never_appear_in_training(name: str) -> None:
    task = TASKS[name]
    held_out = held_out_examples(task)
    assert len({example.prompt for example in held_out}) == len(held_out) == 200
    assert held_out == held_out_examples(task)  # the same set on every call (and machine)
    trained = {example.prompt for example in islice(train_examples(task, seed=0), 50_000)}
    assert not trained & {example.prompt for example in held_out}


@pytest.mark.parametrize(
    ("output", "answer", "expected"),
    [
        (" 1234", " 1234", True),
        ("1234 ", " 1234", True),
        (" 1235", " 1234", False),
        (" 1234 1234", " 1234", False),
        ("", " 1234", False),
    ],
)
def test_text_scoring_is_exact_match_up_to_surrounding_space(
    output: str, answer: str, expected: bool
) -> None:
    assert get_task("add").score(output, answer) is expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ('{"name": "Ana", "age": 30, "city": "Rome", "job": "chef"}', True),
        ('{"age":30,"job":"chef","name":"Ana","city":"Rome"}', True),  # same value, other layout
        ('{"name": "Ana", "age": "30", "city": "Rome", "job": "chef"}', False),  # age a string
        ('{"name": "Ana", "age": 30, "city": "Rome"}', False),
        ('{"name": "Ana", "age": 30, "city": "Rome", "job": "chef"', False),  # not JSON
        ("chef", False),
    ],
)
def test_json_scoring_compares_values(output: str, expected: bool) -> None:
    answer = ' {"name": "Ana", "age": 30, "city": "Rome", "job": "chef"}'
    assert get_task("record").score(output, answer) is expected


def test_record_answers_validate_against_the_tasks_schema() -> None:
    task = get_task("record")
    for example in held_out_examples(task):
        record = json.loads(example.answer)
        jsonschema.validate(record, task.json_schema)
        assert str(record["age"]) in example.prompt and record["name"] in example.prompt


def test_reverse_and_add_answers_are_right() -> None:
    for example in held_out_examples(get_task("add"))[:50]:
        a, b = example.prompt.removeprefix("Add: ").removesuffix(" =").split(" + ")
        assert int(example.answer) == int(a) + int(b)
    for example in held_out_examples(get_task("reverse"))[:50]:
        words = example.prompt.removeprefix("Reverse: ").removesuffix("\nOutput:").split()
        assert example.answer.split() == words[::-1]


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="add, record, reverse"):
        get_task("sum")


@pytest.mark.parametrize("name", list(TASKS))
def test_examples_encode_as_the_engine_prompts_them(
    name: str, sentencepiece_tokenizer_dir: str
) -> None:
    tokenizer = Tokenizer.from_file(f"{sentencepiece_tokenizer_dir}/tokenizer.json")
    for example in held_out_examples(TASKS[name])[:50]:
        prompt, answer = data.encode_example(tokenizer, example)
        # What the engine feeds at evaluation: the tokenizer's own encoding, BOS included.
        assert prompt == tokenizer.encode(example.prompt).ids
        assert answer[-1] == 2 and "\n" not in tokenizer.decode(answer)


def test_encoding_refuses_a_prompt_whose_tokens_change_with_its_answer(
    sentencepiece_tokenizer_dir: str,
) -> None:
    tokenizer = Tokenizer.from_file(f"{sentencepiece_tokenizer_dir}/tokenizer.json")
    with pytest.raises(ValueError, match="change"):
        data.encode_example(tokenizer, Example("Say: app", "le"))


def test_perplexity_documents_are_fresh() -> None:
    documents = perplexity_documents()
    assert len(documents) == len(set(documents)) == 300
    from kit import corpus

    trained = set(islice(corpus.iter_documents(0), 200_000))
    assert not trained & set(documents)
