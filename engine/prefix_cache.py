"""Automatic prefix caching: a request whose prompt starts with the full KV blocks of an earlier
one (a shared system prompt, the earlier turns of a chat, few-shot examples) takes those blocks
instead of computing them again.

A block is found by a digest of everything its keys and values depend on: its tokens, the
blocks before it (each digest chains its parent's), and the request's context at the root (the
model's KV version, which sparse activation changes, and the LoRA adapters with their scales).
The digest is BLAKE2b keyed with a secret drawn per process, so no client can build a prompt
whose blocks collide with another tenant's (vLLM's CVE-2025-25183 was such a collision, with
Python's unkeyed hash).

The allocator (engine.kv_cache) keeps the cached blocks; the scheduler takes a new sequence's
longest cached prefix when it admits it, and registers each full block in the step that
computes it (a request admitted later in that step may take it: the forward writes a layer's
keys and values for every row before any row attends).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Sequence

_SECRET = os.urandom(32)
_DIGEST_SIZE = 16


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, key=_SECRET, digest_size=_DIGEST_SIZE).digest()


class BlockDigests:
    """The digests of a sequence's leading full blocks, computed as they are first needed."""

    __slots__ = ("digests", "root")

    def __init__(self, context: tuple) -> None:
        # repr of ints, floats and tuples of them is exact and stable within a process.
        self.root = _digest(repr(context).encode())
        self.digests: list[bytes] = []

    def upto(self, token_ids: Sequence[int], num_blocks: int, block_size: int) -> list[bytes]:
        """The digests of the first `num_blocks` full blocks of `token_ids`."""
        digests = self.digests
        for index in range(len(digests), num_blocks):
            tokens = array("I", token_ids[index * block_size : (index + 1) * block_size])
            parent = digests[-1] if digests else self.root
            digests.append(_digest(parent + tokens.tobytes()))
        return digests[:num_blocks]

    def copy(self) -> BlockDigests:
        twin = BlockDigests.__new__(BlockDigests)
        twin.root, twin.digests = self.root, list(self.digests)
        return twin
