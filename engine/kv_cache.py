"""Paged KV cache: a pool of fixed-size blocks per layer and an allocator that counts references.

A sequence owns a block table (list of block ids); token i of the sequence lives in block
`table[i // block_size]` at offset `i % block_size`. Blocks are reference counted so later
features (SMC particles, shared prompts) can fork a sequence and share its prefix copy-on-write.
"""

from __future__ import annotations

import torch


class OutOfBlocks(Exception):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._refcounts = [0] * num_blocks
        # Pop from the end: low block ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refcounts[block]

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("KV cache is full")
        block = self._free.pop()
        self._refcounts[block] = 1
        return block

    def fork(self, block: int) -> int:
        """Share `block` with one more owner."""
        if self._refcounts[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        self._refcounts[block] += 1
        return block

    def free(self, block: int) -> None:
        count = self._refcounts[block]
        if count <= 0:
            raise ValueError(f"double free of block {block}")
        self._refcounts[block] = count - 1
        if count == 1:
            self._free.append(block)

    def free_all(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self.free(block)


class KVCache:
    """Per-layer key and value pools shaped [num_blocks * block_size, num_kv_heads, head_dim].

    Stored flat over slots (slot = block * block_size + offset) so writes and gathers are single
    index operations.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    def copy_block(self, source: int, target: int) -> None:
        """Every layer's keys and values of block `source` into block `target`."""
        size = self.block_size
        src = slice(source * size, (source + 1) * size)
        dst = slice(target * size, (target + 1) * size)
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst] = keys[src]
            values[dst] = values[src]
