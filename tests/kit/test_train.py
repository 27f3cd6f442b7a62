"""The kit's training step: batches cut into pieces of similar length train exactly as the whole
padded batch."""

from __future__ import annotations

import random
from itertools import combinations, islice
from pathlib import Path

import torch
from tokenizers import Tokenizer

from engine.tokenizer import build_sentencepiece_tokenizer_dir
from kit import data, train
from kit.tasks import TASKS, get_task, train_examples

from .conftest import MICRO_ARCH


def _set_partitions(items: list[int]) -> list[list[list[int]]]:
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    partitions = []
    for size in range(len(rest) + 1):
        for companions in combinations(rest, size):
            remaining = [item for item in rest if item not in companions]
            for partition in _set_partitions(remaining):
                partitions.append([[first, *companions], *partition])
    return partitions


def _cost(groups: list[list[int]], lengths: list[int], piece_cost: int) -> int:
    return sum(piece_cost + max(lengths[row] for row in group) * len(group) for group in groups)


def test_length_groups_costs_the_least_of_all_groupings() -> None:
    rng = random.Random(0)
    for trial in range(40):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 7))]
        piece_cost = rng.choice([0, 4, 16, 64])
        groups = train.length_groups(lengths, piece_cost)
        assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
        best = min(
            _cost(partition, lengths, piece_cost)
            for partition in _set_partitions(list(range(len(lengths))))
        )
        assert _cost(groups, lengths, piece_cost) == best, (trial, lengths, piece_cost)


def test_pieces_train_exactly_as_the_whole_padded_batch(tmp_path: Path) -> None:
    build_sentencepiece_tokenizer_dir(tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tasks = [get_task(name) for name in TASKS]
    seen = [
        token
        for task in tasks
        for example in islice(train_examples(task, 0), 500)
        for part in data.encode_example(tokenizer, example)
        for token in part
    ]
    space = train.TokenSpace(torch.tensor(seen))
    batch = next(data.task_batches(tokenizer, space, tasks, seed=0, batch_size=16))
    pieces = batch.pieces()
    assert len(pieces) > 1
    assert sum(int(piece.loss_mask.numel()) for piece in pieces) < batch.loss_mask.numel()

    torch.manual_seed(0)
    model = train.new_compact_model(MICRO_ARCH, space)

    def whole_batch_loss() -> torch.Tensor:
        # The oracle: one forward of the whole right-padded batch, the mean over its counted
        # targets.
        losses = train.full_vocab_token_losses(
            model(input_ids=batch.inputs).logits, batch.targets, space.unseen_count
        )
        return losses[batch.loss_mask].mean()

    def gradients(loss_of_model) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_of_model()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    whole_loss, whole_grads = gradients(whole_batch_loss)
    piece_loss, piece_grads = gradients(
        lambda: train.batch_loss(model, batch, space.unseen_count, bf16=False)
    )
    torch.testing.assert_close(piece_loss, whole_loss, rtol=1e-5, atol=1e-6)
    for piece_grad, whole_grad in zip(piece_grads, whole_grads, strict=True):
        torch.testing.assert_close(piece_grad, whole_grad, rtol=1e-4, atol=1e-6)
