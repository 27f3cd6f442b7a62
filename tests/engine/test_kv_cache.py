"""The block allocator's reference counting, which SMC forks and shared prompts will rely on."""

from __future__ import annotations

import pytest

from engine.kv_cache import BlockAllocator, OutOfBlocks


def test_forked_block_returns_to_the_pool_after_its_last_owner_frees_it():
    allocator = BlockAllocator(2)
    block = allocator.allocate()
    allocator.fork(block)
    assert allocator.refcount(block) == 2
    allocator.free(block)
    assert allocator.num_free == 1 and allocator.refcount(block) == 1
    allocator.free(block)
    assert allocator.num_free == 2 and allocator.refcount(block) == 0


def test_exhaustion_double_free_and_fork_of_a_free_block_are_refused():
    allocator = BlockAllocator(1)
    block = allocator.allocate()
    with pytest.raises(OutOfBlocks):
        allocator.allocate()
    allocator.free(block)
    with pytest.raises(ValueError, match="double free"):
        allocator.free(block)
    with pytest.raises(ValueError, match="not allocated"):
        allocator.fork(block)
