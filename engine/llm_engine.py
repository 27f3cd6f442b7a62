"""The synchronous engine: one `step()` is schedule -> run -> sample -> postprocess."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.batch import ForwardBatch
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import BlockAllocator, KVCache
from engine.model import CausalLM
from engine.sampling import compute_logprobs, request_generator, sample
from engine.scheduler import ScheduledSequence, Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.stopping import StopStringMatcher
from engine.tokenizer import Tokenizer
from engine.types import (
    FinishReason,
    InvalidRequest,
    Request,
    RequestOutput,
    TokenLogprob,
)

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_batched_tokens: int = 512  # per-step token budget: the prefill chunk size
    max_prompt_tokens: int | None = None  # default: what the context and the cache can hold
    max_new_tokens: int = 4096
    max_queue: int = 1024
    dtype: str | None = None  # None keeps the checkpoint's dtype
    seed: int = 0  # seeds the generators of requests that give no seed


@dataclass(frozen=True)
class EngineLimits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_queue: int
    max_seq_tokens: int  # prompt + output, bounded by the context length and the KV cache


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        mc = model.config
        per_block = KVCache.bytes_per_block(
            mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim, model.dtype
        )
        num_blocks = max(1, config.kv_cache_bytes // per_block)
        self.kv = model.new_kv_cache(num_blocks, config.block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.scheduler = Scheduler(
            SchedulerConfig(config.block_size, config.max_num_seqs, config.max_batched_tokens),
            self.allocator,
        )
        max_seq_tokens = min(mc.max_position_embeddings, num_blocks * config.block_size)
        max_prompt = max_seq_tokens - 1
        if config.max_prompt_tokens is not None:
            max_prompt = min(max_prompt, config.max_prompt_tokens)
        self.limits = EngineLimits(
            max_prompt_tokens=max_prompt,
            max_new_tokens=config.max_new_tokens,
            max_queue=config.max_queue,
            max_seq_tokens=max_seq_tokens,
        )
        self.eos_token_ids = frozenset(mc.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        # Unseeded rows share one batched draw from this generator each step.
        self._rng = torch.Generator().manual_seed(config.seed)
        self._seqs: dict[str, Sequence] = {}

    @classmethod
    def from_dir(cls, path: str, config: EngineConfig | None = None) -> LLMEngine:
        config = config or EngineConfig()
        dtype = _DTYPES[config.dtype] if config.dtype else None
        model = CausalLM.from_dir(path, dtype=dtype)
        return cls(model, Tokenizer.from_dir(path), config)

    # ---- requests -------------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        """Raise InvalidRequest when the request can never run; cheap, no engine state."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        if len(prompt) > self.limits.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt has {len(prompt)} tokens, the limit is {self.limits.max_prompt_tokens}"
            )
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequest(f"token ids must be in [0, {vocab})")
        if request.stopping.max_new_tokens > self.limits.max_new_tokens:
            raise InvalidRequest(
                f"max_new_tokens {request.stopping.max_new_tokens} is over the limit "
                f"{self.limits.max_new_tokens}"
            )
        request.sampling.validate()
        request.stopping.validate()
        request.output.validate()

    def add_request(self, request: Request) -> None:
        self.validate(request)
        if request.request_id in self._seqs:
            raise InvalidRequest(f"request id {request.request_id!r} is already running")
        if not request.arrival_time:
            request.arrival_time = time.monotonic()
        seq = Sequence(
            request=request,
            token_ids=list(request.prompt_token_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids),
            stop_matcher=StopStringMatcher(request.stopping.stop)
            if request.stopping.stop
            else None,
            generator=request_generator(request.sampling.seed),
        )
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish_reason = FinishReason.ABORTED
        return self._take_output(seq)

    def abort_all(self) -> list[str]:
        """Abort every request (after a failed step); returns their ids."""
        ids = list(self._seqs)
        for request_id in ids:
            self.abort(request_id)
        return ids

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.allocator.num_used,
            kv_blocks_total=self.allocator.num_blocks,
        )

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits = self.model.forward(self._forward_batch(scheduled), self.kv)
        sampling = [s.seq for s in scheduled if s.samples]
        for s in scheduled:
            s.seq.num_computed += s.num_new_tokens
        if sampling:
            self._sample_and_append(sampling, logits)
        return [self._take_output(seq) for seq in sampling]

    def _forward_batch(self, scheduled: list[ScheduledSequence]) -> ForwardBatch:
        return ForwardBatch.build(
            token_ids=[
                s.seq.token_ids[s.seq.num_computed : s.seq.num_computed + s.num_new_tokens]
                for s in scheduled
            ],
            context_lens=[s.seq.num_computed + s.num_new_tokens for s in scheduled],
            block_tables=[s.seq.block_table for s in scheduled],
            block_size=self.config.block_size,
            logits_rows=[s.samples for s in scheduled],
        )

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        params = [seq.request.sampling for seq in seqs]
        tokens = sample(
            logits,
            params,
            [seq.generator for seq in seqs],
            [seq.token_ids for seq in seqs],
            engine_generator=self._rng,
        ).tolist()
        top_n = [
            seq.request.output.top_logprobs if seq.request.output.logprobs else -1 for seq in seqs
        ]
        logprobs = compute_logprobs(logits, tokens, top_n) if max(top_n) >= 0 else None
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if not seq.first_token_time:
                seq.first_token_time = now
            self._append_token(seq, token, logprobs[i] if logprobs and top_n[i] >= 0 else None)

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        seq.token_ids.append(token)
        seq.pending_token_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        stopping = seq.request.stopping
        reason = None
        if token in stopping.stop_token_ids:
            reason = FinishReason.STOP_TOKEN
        elif token in self.eos_token_ids and not stopping.ignore_eos:
            reason = FinishReason.EOS
        else:
            reason = self._push_text(seq, seq.detokenizer.push([token]))
        if reason is None and (
            seq.num_output_tokens >= stopping.max_new_tokens
            or len(seq.token_ids) >= self.limits.max_seq_tokens
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, reason)

    def _push_text(self, seq: Sequence, text: str) -> FinishReason | None:
        if seq.stop_matcher is None:
            seq.pending_text.append(text)
            return None
        safe, matched = seq.stop_matcher.push(text)
        seq.pending_text.append(safe)
        return FinishReason.STOP_STRING if matched else None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if reason is not FinishReason.STOP_STRING:
            self._push_text(seq, seq.detokenizer.flush())
            if seq.stop_matcher is not None:
                seq.pending_text.append(seq.stop_matcher.flush())
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)

    def _take_output(self, seq: Sequence) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            token_ids=seq.pending_token_ids,
            text="".join(seq.pending_text),
            logprobs=seq.pending_logprobs,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            arrival_time=seq.request.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
        )
        seq.pending_token_ids, seq.pending_text, seq.pending_logprobs = [], [], []
        return out

    # ---- convenience for tests and benchmarks ----------------------------------------------

    def generate(self, requests: list[Request]) -> dict[str, RequestOutput]:
        """Run requests to completion; returns each request's whole output, merged."""
        merged: dict[str, RequestOutput] = {}
        for request in requests:
            self.add_request(request)
        while self.has_unfinished():
            for out in self.step():
                merged[out.request_id] = _merge(merged.get(out.request_id), out)
        return merged


def _merge(acc: RequestOutput | None, out: RequestOutput) -> RequestOutput:
    if acc is None:
        return out
    acc.token_ids = acc.token_ids + out.token_ids
    acc.text += out.text
    acc.logprobs = acc.logprobs + out.logprobs
    acc.finish_reason = out.finish_reason
    acc.completion_tokens = out.completion_tokens
    acc.first_token_time = out.first_token_time
    return acc
