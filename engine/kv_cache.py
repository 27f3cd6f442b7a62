"""Paged KV cache: a pool of fixed-size blocks per layer and an allocator that counts references.

A sequence owns a block table (list of block ids); token i of the sequence lives in block
`table[i // block_size]` at offset `i % block_size`. Blocks are reference counted so SMC
particles fork a sequence and share its prefix copy-on-write, and so requests share the full
blocks of a common prompt prefix (engine.prefix_cache): a full block registered under the
digest of its content stays findable after its last owner frees it, until the allocator needs
it for something else (least recently freed first).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from engine.huge_pages import HugePageArena


class OutOfBlocks(Exception):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._refcounts = [0] * num_blocks
        # Free blocks that hold nothing cached. Pop from the end: low block ids are handed out
        # first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))
        # Free blocks that hold a cached prefix block, least recently freed first: handed out
        # only when _free is empty, so cached content lives as long as the pool allows.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}  # content digest -> block
        self._digests: dict[int, bytes] = {}  # block -> its digest, while cached

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def refcount(self, block: int) -> int:
        return self._refcounts[block]

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._digests.pop(block)]
        else:
            raise OutOfBlocks("KV cache is full")
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
        if count > 1:
            return
        if block in self._digests:
            self._evictable[block] = None
        else:
            self._free.append(block)

    def free_all(self, blocks: list[int]) -> None:
        """Free in reverse, so a sequence's last cached blocks are evicted before its first:
        prefixes are what other requests share."""
        for block in reversed(blocks):
            self.free(block)

    # ---- prefix caching ---------------------------------------------------------------------

    def cache(self, block: int, digest: bytes) -> None:
        """Register an allocated block whose KV is complete under the digest of its content;
        no-op when another block already holds that content (or this one is registered)."""
        if self._refcounts[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        if digest in self._cached or block in self._digests:
            return
        self._cached[digest] = block
        self._digests[block] = digest

    def take_cached(self, digest: bytes) -> int | None:
        """One more reference to the block cached under `digest` (revived if it was free), or
        None when nothing is."""
        block = self._cached.get(digest)
        if block is None:
            return None
        if self._refcounts[block] == 0:
            del self._evictable[block]
        self._refcounts[block] += 1
        return block

    def clear_cache(self) -> None:
        """Forget every cached block: the free ones become plain free blocks, the owned ones
        stay with their owners."""
        self._free.extend(reversed(self._evictable))
        self._evictable.clear()
        self._cached.clear()
        self._digests.clear()


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
        if torch.device(device).type == "cpu":
            # Host caches in huge pages (engine.huge_pages): attention gathers scattered blocks.
            nbytes = math.prod(shape) * dtype.itemsize
            arena = HugePageArena.for_sizes([nbytes] * 2 * num_layers)

            def pool() -> torch.Tensor:
                return arena.empty(shape, dtype).zero_()
        else:

            def pool() -> torch.Tensor:
                return torch.zeros(shape, dtype=dtype, device=device)

        self.keys = [pool() for _ in range(num_layers)]
        self.values = [pool() for _ in range(num_layers)]

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
