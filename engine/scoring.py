"""Scoring a given text: the log-probability of each of its tokens under the engine's model.

Used for perplexity. It borrows KV blocks from the engine's pool for one forward pass and
returns them, so it must not run while another thread steps the engine.
"""

from __future__ import annotations

import torch

from engine.batch import ForwardBatch
from engine.llm_engine import LLMEngine
from engine.types import InvalidRequest


def token_logprobs(engine: LLMEngine, token_ids: list[int]) -> list[float]:
    """log p(token_ids[i] | token_ids[:i]) for i = 1 .. len - 1, in one forward pass."""
    if len(token_ids) < 2:
        raise InvalidRequest("scoring needs at least two tokens")
    if len(token_ids) > engine.limits.max_seq_tokens:
        raise InvalidRequest(
            f"{len(token_ids)} tokens, the limit is {engine.limits.max_seq_tokens}"
        )
    block_size = engine.config.block_size
    blocks = [engine.allocator.allocate() for _ in range(-(-len(token_ids) // block_size))]
    try:
        batch = ForwardBatch.build([token_ids], [len(token_ids)], [blocks], block_size)
        batch.logits_indices = torch.arange(len(token_ids) - 1)
        logits = engine.model.forward(batch, engine.kv)
    finally:
        engine.allocator.free_all(blocks)
    targets = torch.tensor(token_ids[1:]).unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).tolist()
