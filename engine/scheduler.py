"""Continuous batching with chunked prefill over a paged KV cache.

Every step: running sequences that decode get one token each first (decode latency never waits
for someone's long prompt), then the remaining token budget goes to prompts, in arrival order,
in chunks. A sequence joins the running set as soon as blocks and a batch slot are free, first
taking the cached blocks of its longest cached prompt prefix (engine.prefix_cache). When the
cache runs out, the newest running sequence is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from engine.kv_cache import BlockAllocator
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def new_token_ids(self) -> list[int]:
        """The tokens this step computes (a prefill chunk, or the last sampled token)."""
        return self.seq.token_ids[self.seq.num_computed : self.context_len]

    @property
    def context_len(self) -> int:
        """The sequence's length once this step's tokens are computed."""
        return self.seq.num_computed + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a next token is drawn."""
        return self.seq.num_computed + self.num_new_tokens == len(self.seq.token_ids)


@dataclass(frozen=True)
class SchedulerConfig:
    block_size: int
    max_num_seqs: int
    max_batched_tokens: int
    # Distinct LoRA adapters the running sequences may use together (the engine's adapter
    # slots); None: no limit.
    max_adapters: int | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Prefix caching, over the sequences admitted for the first time: their prompt tokens,
        # and those of them found cached.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.config.max_batched_tokens
        scheduled: list[ScheduledSequence] = []
        # Decodes first, oldest first; a sequence whose prefill is unfinished continues with
        # what is left of the budget.
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an older one
                continue
            want = min(seq.num_uncomputed, budget)
            if want <= 0:
                continue
            if not self._reserve(seq, want, scheduled):
                continue
            scheduled.append(ScheduledSequence(seq, want))
            self._cache_blocks(seq, seq.num_computed + want)
            budget -= want
        self._admit(scheduled, budget)
        return scheduled

    def _admit(self, scheduled: list[ScheduledSequence], budget: int) -> None:
        """Waiting sequences join in arrival order while blocks, batch places and budget last.

        One whose adapters would take the running set over max_adapters waits without holding
        up base-model sequences behind it; sequences with adapters behind it wait too, even for
        adapters already running: otherwise a steady stream of those would keep their adapters
        in the slots forever and starve it.
        """
        if not self.waiting:
            return
        adapters = self._running_adapters()
        passed_over: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            needed = adapters | _adapter_uids(seq)
            limit = self.config.max_adapters
            if limit is not None and (len(needed) > limit or (passed_over and seq.adapters)):
                passed_over.append(self.waiting.popleft())
                continue
            self._take_cached_prefix(seq)
            want = min(seq.num_uncomputed, budget)
            if not self._try_grow(seq, seq.num_computed + want):
                self._free_blocks(seq)  # the cached prefix it took: it stays waiting
                seq.num_computed = 0
                break
            self.waiting.popleft()
            adapters = needed
            seq.status = SequenceStatus.RUNNING
            if not seq.first_scheduled_time:
                seq.first_scheduled_time = time.monotonic()
                self._count_prefix(seq)
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, want))
            self._cache_blocks(seq, seq.num_computed + want)
            budget -= want
        self.waiting.extendleft(reversed(passed_over))

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Give a sequence about to be admitted the cached blocks of its longest cached prefix.
        Its last token is always computed (its logits are drawn from), in a block of its own:
        a block taken from the cache is never written to."""
        if seq.prefix is None or seq.block_table:
            return
        size = self.config.block_size
        for digest in seq.prefix.upto(seq.token_ids, (len(seq.token_ids) - 1) // size, size):
            block = self.allocator.take_cached(digest)
            if block is None:
                break
            seq.block_table.append(block)
        seq.num_cached_blocks = len(seq.block_table)
        seq.num_computed = seq.num_cached_blocks * size

    def _count_prefix(self, seq: Sequence) -> None:
        if seq.prefix is None:
            return
        seq.cached_prompt_tokens = min(seq.num_computed, seq.num_prompt_tokens)
        self.prefix_queries += seq.num_prompt_tokens
        self.prefix_hits += seq.cached_prompt_tokens

    def _cache_blocks(self, seq: Sequence, computed: int) -> None:
        """Register the blocks of `seq` that hold whole once its first `computed` tokens are
        computed, this step included: a sequence admitted after it in this step may take them.
        The forward writes every row's keys and values of a layer before any row attends, so
        its attention reads them complete."""
        if seq.prefix is None:
            return
        size = self.config.block_size
        full = computed // size
        if full <= seq.num_cached_blocks:
            return
        digests = seq.prefix.upto(seq.token_ids, full, size)
        for index in range(seq.num_cached_blocks, full):
            self.allocator.cache(seq.block_table[index], digests[index])
        seq.num_cached_blocks = full

    def _running_adapters(self) -> set[int]:
        if self.config.max_adapters is None:
            return set()
        return {uid for seq in self.running for uid in _adapter_uids(seq)}

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free_blocks(seq)
        seq.status = SequenceStatus.FINISHED

    def _reserve(self, seq: Sequence, want: int, scheduled: list[ScheduledSequence]) -> bool:
        """Grow seq's blocks for `want` more tokens, preempting the newest others if needed."""
        while not self._try_grow(seq, seq.num_computed + want):
            victim = self._newest_running(exclude=seq, scheduled=scheduled)
            if victim is None:
                self._preempt(seq)
                return False
            self._preempt(victim)
        return True

    def _newest_running(
        self, exclude: Sequence, scheduled: list[ScheduledSequence]
    ) -> Sequence | None:
        taken = {id(s.seq) for s in scheduled}
        for seq in reversed(self.running):
            if seq is not exclude and id(seq) not in taken:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Drop seq's cache; it goes back to the front of the queue and recomputes its tokens."""
        self.num_preemptions += 1
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _try_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` in the cache, and for each small-model row of a fused
        sequence in its small base's pool; all or nothing."""
        num_blocks = -(-num_tokens // self.config.block_size)
        needed = num_blocks - len(seq.block_table)
        if needed > self.allocator.num_free:
            return False
        if seq.fusion is not None:
            if not seq.fusion.can_grow(num_blocks):
                return False
            seq.fusion.grow(num_blocks)
        for _ in range(needed):
            seq.block_table.append(self.allocator.allocate())
        return True

    def _free_blocks(self, seq: Sequence) -> None:
        self.allocator.free_all(seq.block_table)
        seq.block_table = []
        seq.num_cached_blocks = 0
        if seq.fusion is not None:
            seq.fusion.free()


def _adapter_uids(seq: Sequence) -> set[int]:
    return {adapter.uid for adapter, _ in seq.adapters}
