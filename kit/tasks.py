"""The kit's tasks: (prompt, answer) generators, held-out test sets, exact-match scoring.

Each task is learnable by a small model fine-tuned on it and out of reach for the base models,
which see it only rarely in their general mix. Examples come from `random.Random` with fixed
seeds (its algorithms are stable across Python versions), so every machine builds the same sets.
The test set is drawn first; training streams skip every prompt in it, so no test prompt is ever
trained on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

from kit import corpus

# Answers end at the end-of-sequence token or at the first newline.
ANSWER_STOP = "\n"
TEST_SIZE = 200
_TEST_SEED = 10_007


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # starts with the space that follows the prompt

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    answer_format: str  # "text" or "json"
    max_new_tokens: int
    make: Callable[[random.Random], Example]
    json_schema: dict[str, object] | None = None

    def score(self, output: str, answer: str) -> bool:
        """Exact match: the same JSON value for json tasks, the same stripped text otherwise."""
        if self.answer_format == "json":
            return _json_equal(output, answer)
        return output.strip() == answer.strip()

    def describe(self) -> dict[str, object]:
        """The task's entry in tasks.json (examples included, so users see the format)."""
        example = self.make(random.Random(0))
        return {
            "name": self.name,
            "description": self.description,
            "answer_format": self.answer_format,
            "max_new_tokens": self.max_new_tokens,
            "answer_stop": ANSWER_STOP,
            "json_schema": self.json_schema,
            "example": {"prompt": example.prompt, "answer": example.answer},
            "test_size": TEST_SIZE,
        }


def _json_equal(output: str, answer: str) -> bool:
    try:
        return json.loads(output) == json.loads(answer)
    except ValueError:
        return False


# ---- add: two-digit addition ----------------------------------------------------------------


def _addition(rng: random.Random) -> Example:
    # Two digits: every kit member that is tuned on it learns it within the kit's time budget
    # (three digits took the large model's fine-tune over 1000 steps to start learning).
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"Add: {a} + {b} =", f" {a + b}")


# ---- record: a sentence to a JSON record ----------------------------------------------------

# Names, cities and jobs the general mix uses in plain sentences: the task is the extraction into
# JSON, not new words (a LoRA adapter cannot move the embeddings of words the base never learned).
_NAMES = sorted(corpus.PEOPLE)
_CITIES = sorted(corpus.CAPITALS.values())
_JOBS = corpus.JOBS
_RECORD_SENTENCES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "{name}, {age}, works as a {job} in {city}.",
    "In {city} lives {name}, a {job} aged {age}.",
    "{name} works as a {job}. {name} is {age} and lives in {city}.",
    "Meet {name} from {city}: {age} years old, {job} by trade.",
    "The {job} {name} ({age}) lives in {city}.",
]
RECORD_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "city": {"type": "string"},
        "job": {"type": "string"},
    },
    "required": ["name", "age", "city", "job"],
    "additionalProperties": False,
}


def _record(rng: random.Random) -> Example:
    fields = {
        "name": rng.choice(_NAMES),
        "age": rng.randint(18, 90),
        "city": rng.choice(_CITIES),
        "job": rng.choice(_JOBS),
    }
    sentence = rng.choice(_RECORD_SENTENCES).format(**fields)
    return Example(f"Record: {sentence}\nJSON:", " " + json.dumps(fields))


# ---- reverse: the words of a list in reverse order ------------------------------------------

# Words the general mix uses: the task is the reversal, not new words.
_WORDS = sorted(
    {
        *corpus.COLOURS,
        *corpus.COLOURED_THINGS,
        *corpus.OBJECTS,
        *corpus.ANIMAL_SOUNDS,
        *corpus.ANIMAL_LEGS,
        *corpus.DAYS,
    }
)


def _reverse(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(3, 6))
    return Example(f"Reverse: {' '.join(words)}\nOutput:", " " + " ".join(reversed(words)))


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            "add",
            "Two-digit addition: the sum of two numbers from 10 to 99.",
            "text",
            6,
            _addition,
        ),
        Task(
            "record",
            "Extract name, age, city and job from a sentence into a JSON record.",
            "json",
            40,
            _record,
            RECORD_SCHEMA,
        ),
        Task(
            "reverse",
            "Write a list of three to six words in reverse order.",
            "text",
            16,
            _reverse,
        ),
    ]
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}") from None


def held_out_examples(task: Task, size: int = TEST_SIZE) -> list[Example]:
    """The held-out test set: `size` distinct prompts, the same on every machine."""
    rng = random.Random(f"{_TEST_SEED}-{task.name}")
    seen: set[str] = set()
    examples = []
    while len(examples) < size:
        example = task.make(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
    return examples


def train_examples(task: Task, seed: int) -> Iterator[Example]:
    """An endless stream of training examples; never one of the held-out test prompts."""
    held_out = {example.prompt for example in held_out_examples(task)}
    rng = random.Random(f"{seed}-{task.name}")
    while True:
        example = task.make(rng)
        if example.prompt not in held_out:
            yield example


# ---- held-out general text, for perplexity ----------------------------------------------------

PERPLEXITY_SIZE = 300
_PERPLEXITY_SEED = 20_011
# Documents the default recipe's pretraining could have seen: the first this-many of the
# seed-0 stream (the pretraining reads fewer than 100k).
_TRAINING_DOCUMENTS_BOUND = 200_000


def perplexity_documents(size: int = PERPLEXITY_SIZE) -> list[str]:
    """General-mix documents of another seed that never occur in the pretraining stream."""
    trained = set(islice(corpus.iter_documents(0), _TRAINING_DOCUMENTS_BOUND))
    fresh = (doc for doc in corpus.iter_documents(_PERPLEXITY_SEED) if doc not in trained)
    return list(islice(fresh, size))
