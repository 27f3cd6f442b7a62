"""Token streams and batches for the kit: the general mix (pretraining) and task examples.

Task examples are encoded exactly as the engine sees them at evaluation: BOS, the prompt's
tokens, then the answer's tokens and EOS. Only the answer and EOS count in the fine-tuning loss.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from itertools import islice

import torch
from tokenizers import Tokenizer

from kit import corpus
from kit.tasks import Example, Task, train_examples
from kit.train import BOS_ID, EOS_ID, Batch, TokenSpace

_DOCUMENTS_PER_CHUNK = 2048


def encode_example(tokenizer: Tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, answer ids with EOS), split where the engine's prompt ends."""
    prompt = tokenizer.encode(example.prompt, add_special_tokens=False).ids
    whole = tokenizer.encode(example.text, add_special_tokens=False).ids
    if whole[: len(prompt)] != prompt:
        raise ValueError(f"the prompt's tokens change when its answer follows: {example!r}")
    return [BOS_ID, *prompt], [*whole[len(prompt) :], EOS_ID]


def general_documents(seed: int, tasks: Sequence[Task], task_rate: float) -> Iterator[str]:
    """The general mix: corpus documents, with a task example in place of one in 1/task_rate."""
    rng = random.Random(f"mix-{seed}")
    documents = corpus.iter_documents(seed)
    examples = [train_examples(task, seed) for task in tasks]
    while True:
        if examples and rng.random() < task_rate:
            yield next(rng.choice(examples)).text
        else:
            yield next(documents)


def general_token_stream(tokenizer: Tokenizer, documents: Iterator[str]) -> Iterator[int]:
    """Documents as one token stream; every other document starts with BOS, each ends with EOS.

    Half with BOS, so the model works whether or not a caller's tokenization adds one.
    """
    index = 0
    while True:
        chunk = list(islice(documents, _DOCUMENTS_PER_CHUNK))
        for encoding in tokenizer.encode_batch_fast(chunk, add_special_tokens=False):
            if index % 2 == 0:
                yield BOS_ID
            yield from encoding.ids
            yield EOS_ID
            index += 1


def pretraining_batches(
    stream: Iterator[int], space: TokenSpace, batch_size: int, seq_len: int
) -> Iterator[Batch]:
    """Consecutive windows of seq_len + 1 tokens; every next-token target counts."""
    window = batch_size * (seq_len + 1)
    while True:
        ids = torch.tensor(list(islice(stream, window)), dtype=torch.int64)
        rows = space.compact(ids).view(batch_size, seq_len + 1)
        yield Batch(rows[:, :-1], rows[:, 1:], torch.ones(batch_size, seq_len, dtype=torch.bool))


def task_batches(
    tokenizer: Tokenizer,
    space: TokenSpace,
    tasks: Sequence[Task],
    seed: int,
    batch_size: int,
    prompt_loss: bool = False,
) -> Iterator[Batch]:
    """Batches of single examples, right-padded; the task of each example drawn uniformly.
    The loss counts the answer's tokens, and the prompt's too with `prompt_loss`."""
    rng = random.Random(f"tasks-{seed}")
    streams = [train_examples(task, seed) for task in tasks]
    while True:
        encoded = [encode_example(tokenizer, next(rng.choice(streams))) for _ in range(batch_size)]
        yield _padded_batch(encoded, space, prompt_loss)


def _padded_batch(
    encoded: list[tuple[list[int], list[int]]], space: TokenSpace, prompt_loss: bool
) -> Batch:
    length = max(len(prompt) + len(answer) for prompt, answer in encoded) - 1
    inputs = torch.full((len(encoded), length), EOS_ID, dtype=torch.int64)
    targets = torch.full((len(encoded), length), EOS_ID, dtype=torch.int64)
    mask = torch.zeros(len(encoded), length, dtype=torch.bool)
    for row, (prompt, answer) in enumerate(encoded):
        ids = torch.tensor(prompt + answer, dtype=torch.int64)
        inputs[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = ids[1:]
        # Target position p predicts token p + 1: the answer's tokens start at len(prompt).
        mask[row, 0 if prompt_loss else len(prompt) - 1 : len(ids) - 1] = True
    return Batch(space.compact(inputs), space.compact(targets), mask)
