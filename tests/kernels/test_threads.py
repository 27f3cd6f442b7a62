from __future__ import annotations

import threading

import pytest
import torch

from kernels.threads import SERIAL_LIMIT, serial_ops


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_operands_run_on_the_calling_thread_only_within_the_block(two_threads) -> None:
    with serial_ops(SERIAL_LIMIT):
        assert torch.get_num_threads() == 1
        logits = torch.randn(8, 32768)
        assert torch.equal(logits.argmax(-1), torch.tensor([int(r.argmax()) for r in logits]))
    assert torch.get_num_threads() == 2


def test_large_operands_keep_the_threads(two_threads) -> None:
    with serial_ops(SERIAL_LIMIT + 1):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


def test_restored_after_an_error(two_threads) -> None:
    with pytest.raises(RuntimeError), serial_ops(1):
        raise RuntimeError
    assert torch.get_num_threads() == 2


def test_other_threads_keep_their_team(two_threads) -> None:
    seen: list[int] = []
    with serial_ops(1):
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
    assert seen == [2]
