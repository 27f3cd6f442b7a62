"""Automatic prefix caching: the allocator's cached blocks, the block digests, and the engine
taking the blocks of a cached prefix.

Oracles: Hugging Face transformers for tokens and log-probs of requests whose prompts were
partly found in the cache; counts of the tokens the model actually computed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers

from engine.kv_cache import BlockAllocator, OutOfBlocks
from engine.llm_engine import EngineConfig, LLMEngine
from engine.model import CausalLM
from engine.prefix_cache import BlockDigests
from engine.sparsity import apply_sparsity
from engine.types import (
    OutputOptions,
    Request,
    SamplingParams,
    SparsitySettings,
    StoppingCriteria,
)

BLOCK = 4
SYSTEM = (
    "You are a careful assistant. Answer in one short sentence, and say so when you do not "
    "know. Question:"
)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_engine(model_dir: str, **overrides) -> LLMEngine:
    config = EngineConfig(**{"kv_cache_bytes": 8 << 20, "block_size": BLOCK, **overrides})
    return LLMEngine.from_dir(model_dir, config)


def greedy(request_id: str, prompt: list[int], new_tokens: int = 8, **kw) -> Request:
    stopping = StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True)
    return Request(request_id, prompt, SamplingParams(temperature=0.0), stopping, **kw)


def count_computed_tokens(engine: LLMEngine) -> list[int]:
    """Every forward's number of input tokens, appended as the engine runs."""
    counts: list[int] = []
    prepare = engine.model.prepare

    def counting(batch, *args, **kwargs):
        counts.append(batch.num_tokens)
        return prepare(batch, *args, **kwargs)

    engine.model.prepare = counting
    return counts


def hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, do_sample=False, max_new_tokens=new_tokens, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


def cacheable(prompt_len: int, common: int) -> int:
    """Tokens a request can take from the cache: the whole blocks of the prefix it shares, short
    of its own last token."""
    return min(common, prompt_len - 1) // BLOCK * BLOCK


# ---- the allocator ---------------------------------------------------------------------------


def test_freed_cached_blocks_stay_findable_until_the_pool_needs_them():
    allocator = BlockAllocator(4)
    a, b = allocator.allocate(), allocator.allocate()
    allocator.cache(a, b"a")
    allocator.cache(b, b"b")
    allocator.free_all([a, b])  # b is freed first: the tail of a sequence goes first
    assert allocator.num_free == 4 and allocator.num_used == 0 and allocator.num_cached == 2
    # Plain free blocks are handed out before cached ones.
    plain = [allocator.allocate(), allocator.allocate()]
    assert set(plain).isdisjoint({a, b}) and allocator.num_cached == 2
    # Taking a cached block revives it; taking it again shares it.
    assert allocator.take_cached(b"a") == a and allocator.refcount(a) == 1
    assert allocator.take_cached(b"a") == a and allocator.refcount(a) == 2
    assert allocator.num_free == 1
    # The pool's last free block is the cached b: allocating evicts it.
    assert allocator.allocate() == b
    assert allocator.take_cached(b"b") is None and allocator.num_cached == 1
    with pytest.raises(OutOfBlocks):
        allocator.allocate()


def test_eviction_takes_the_least_recently_freed_block():
    allocator = BlockAllocator(3)
    blocks = [allocator.allocate() for _ in range(3)]
    for block in blocks:
        allocator.cache(block, bytes([block]))
    for block in (blocks[1], blocks[0], blocks[2]):
        allocator.free(block)
    assert [allocator.allocate() for _ in range(2)] == [blocks[1], blocks[0]]
    assert allocator.take_cached(bytes([blocks[2]])) == blocks[2]


def test_cache_registers_a_digest_once_and_only_allocated_blocks():
    allocator = BlockAllocator(3)
    first, second = allocator.allocate(), allocator.allocate()
    allocator.cache(first, b"x")
    allocator.cache(second, b"x")  # the same content computed twice: the first stays
    allocator.free(second)
    assert allocator.num_cached == 1 and allocator.take_cached(b"x") == first
    with pytest.raises(ValueError):
        allocator.cache(second, b"y")  # freed


def test_clear_cache_forgets_every_digest():
    allocator = BlockAllocator(2)
    held, freed = allocator.allocate(), allocator.allocate()
    allocator.cache(held, b"held")
    allocator.cache(freed, b"freed")
    allocator.free(freed)
    allocator.clear_cache()
    assert allocator.num_cached == 0 and allocator.num_free == 1
    assert allocator.take_cached(b"held") is None and allocator.take_cached(b"freed") is None
    allocator.free(held)
    assert allocator.num_free == 2


# ---- the digests -----------------------------------------------------------------------------


def test_a_block_digest_covers_its_prefix_and_its_context():
    tokens = list(range(100, 112))
    base = BlockDigests((0, ())).upto(tokens, 3, BLOCK)
    assert len(base) == 3 and len(set(base)) == 3
    assert BlockDigests((0, ())).upto(tokens, 3, BLOCK) == base
    # Only whole blocks: a 12-token sequence has three.
    assert BlockDigests((0, ())).upto(tokens, 2, BLOCK) == base[:2]
    changed_first = BlockDigests((0, ())).upto([99, *tokens[1:]], 3, BLOCK)
    assert all(x != y for x, y in zip(changed_first, base, strict=True))
    changed_last = BlockDigests((0, ())).upto([*tokens[:-1], 99], 3, BLOCK)
    assert changed_last[:2] == base[:2] and changed_last[2] != base[2]
    for context in ((1, ()), (0, ((7, 1.0),)), (0, ((7, 0.5),))):
        other = BlockDigests(context).upto(tokens, 3, BLOCK)
        assert set(other).isdisjoint(base)


# ---- the engine ------------------------------------------------------------------------------


def test_shared_prefix_is_computed_once_and_outputs_equal_transformers(model_dir, hf_model):
    engine = make_engine(model_dir)
    counts = count_computed_tokens(engine)
    system = engine.tokenizer.encode(SYSTEM)
    questions = [" What is the capital of France?", " How many legs has a spider?", " Why?"]
    prompts = [system + engine.tokenizer.encode(q, add_special_tokens=False) for q in questions]
    for i, prompt in enumerate(prompts):
        counts.clear()
        out = engine.generate([greedy(f"r{i}", prompt)])[f"r{i}"]
        expected_cached = cacheable(len(prompt), len(system)) if i else 0
        assert out.cached_prompt_tokens == expected_cached
        # The prompt's forwards computed only what was not cached; then one token per step.
        assert sum(counts) == len(prompt) - expected_cached + len(out.token_ids) - 1
        assert out.token_ids == hf_greedy(hf_model, prompt, 8)
    stats = engine.stats()
    assert stats.prefix_cache_queries == sum(len(p) for p in prompts)
    assert stats.prefix_cache_hits == sum(cacheable(len(p), len(system)) for p in prompts[1:])
    assert stats.kv_blocks_used == 0


def test_repeated_prompt_and_next_turn_log_probs_equal_transformers(model_dir, hf_model):
    engine = make_engine(model_dir)
    prompt = engine.tokenizer.encode(SYSTEM + " Name a colour.")
    options = OutputOptions(logprobs=True, top_logprobs=3)
    first = engine.generate([greedy("a", prompt, 12, output=options)])["a"]
    # The same prompt, then a next turn whose prompt holds the first answer: the generated
    # tokens' full blocks are cached too.
    question = engine.tokenizer.encode(" And another?", add_special_tokens=False)
    turn = prompt + first.token_ids + question
    for rid, request_prompt, common in (
        ("b", prompt, len(prompt)),
        ("c", turn, len(prompt) + len(first.token_ids) - 1),  # the last output token: no KV
    ):
        out = engine.generate([greedy(rid, request_prompt, 6, output=options)])[rid]
        assert out.cached_prompt_tokens == cacheable(len(request_prompt), common) > 0
        ids = torch.tensor([request_prompt + out.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(ids).logits[0].float(), dim=-1)
        for step, lp in enumerate(out.logprobs):
            row = logp[len(request_prompt) - 1 + step]
            assert lp.token_id == out.token_ids[step] == int(row.argmax())
            assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
            top = torch.topk(row, 3)
            assert [t for t, _ in lp.top] == top.indices.tolist()


def test_concurrent_requests_share_blocks_and_free_them(model_dir, hf_model):
    engine = make_engine(model_dir)
    system = engine.tokenizer.encode(SYSTEM)
    engine.generate([greedy("warm", [*system, 500, 501])])
    prompts = {f"q{i}": [*system, 600 + i, 700 + i, 800 + i] for i in range(4)}
    engine.add_request(greedy("q0", prompts["q0"]))
    engine.add_request(greedy("q1", prompts["q1"]))
    outputs: dict[str, list[int]] = {}
    for out in engine.step():  # both admitted: they hold the same cached blocks
        outputs.setdefault(out.request_id, []).extend(out.token_ids)
    shared = engine._seqs["q0"].block_table[: len(system) // BLOCK]
    assert shared == engine._seqs["q1"].block_table[: len(system) // BLOCK]
    assert all(engine.allocator.refcount(block) == 2 for block in shared)
    for rid in ("q2", "q3"):
        engine.add_request(greedy(rid, prompts[rid]))
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    for rid, prompt in prompts.items():
        assert outputs[rid] == hf_greedy(hf_model, prompt, 8)
    assert engine.allocator.num_used == 0


def test_a_burst_computes_its_shared_prefix_once(model_dir, hf_model):
    """Requests admitted in the same step as the first one with their prefix take its blocks:
    that step's forward writes them before any row attends."""
    engine = make_engine(model_dir)
    counts = count_computed_tokens(engine)
    system = engine.tokenizer.encode(SYSTEM)
    prompts = {f"b{i}": [*system, 1000 + i, 1100 + i] for i in range(4)}
    outputs = engine.generate([greedy(rid, prompt) for rid, prompt in prompts.items()])
    share = cacheable(len(system) + 2, len(system))
    assert counts[0] == sum(len(p) for p in prompts.values()) - 3 * share
    for rid, prompt in prompts.items():
        assert outputs[rid].cached_prompt_tokens == (share if rid != "b0" else 0)
        assert outputs[rid].token_ids == hf_greedy(hf_model, prompt, 8)


def test_a_failed_step_empties_the_cache(model_dir):
    engine = make_engine(model_dir)
    engine.generate([greedy("a", engine.tokenizer.encode(SYSTEM))])
    assert engine.allocator.num_cached > 0
    engine.add_request(greedy("b", engine.tokenizer.encode(SYSTEM)))
    assert engine.abort_all() == ["b"]
    assert engine.allocator.num_cached == 0 and engine.allocator.num_used == 0


def test_eviction_takes_the_tail_of_the_least_recent_prefix_first(model_dir, hf_model):
    probe = make_engine(model_dir)
    first = probe.tokenizer.encode(SYSTEM)
    other = probe.tokenizer.encode(
        "A longer prompt that should be split into several prefill chunks when the token "
        "budget of a step is small, so that decoding goes on meanwhile."
    )
    assert len(other) > len(first)
    new_tokens = 8
    blocks = [-(-(len(p) + new_tokens - 1) // BLOCK) for p in (first, other)]
    # A pool where `other` takes every plain free block and all but two of `first`'s cached
    # full blocks: those are evicted from the tail (a sequence frees its last blocks first).
    num_blocks = blocks[1] + 2
    per_block = 2 * 2 * BLOCK * 2 * 16 * 4  # layers * (k, v) * block * kv_heads * head_dim * fp32
    engine = make_engine(model_dir, kv_cache_bytes=num_blocks * per_block)
    assert engine.allocator.num_blocks == num_blocks
    third = first + engine.tokenizer.encode(" Why?", add_special_tokens=False)
    expected_cached = [0, 0, 2 * BLOCK, cacheable(len(third), len(third))]
    for i, prompt in enumerate((first, other, third, third)):
        out = engine.generate([greedy(f"r{i}", prompt, new_tokens)])[f"r{i}"]
        assert out.cached_prompt_tokens == expected_cached[i]
        assert out.token_ids == hf_greedy(hf_model, prompt, new_tokens)
        assert engine.allocator.num_used == 0


def test_preempted_sequences_take_back_their_cached_blocks(model_dir, hf_model):
    per_block = 2 * 2 * BLOCK * 2 * 16 * 4
    engine = make_engine(model_dir, kv_cache_bytes=16 * per_block)
    system = engine.tokenizer.encode(SYSTEM)
    prompts = {f"p{i}": [*system, 900 + i] for i in range(3)}
    stopping = StoppingCriteria(max_new_tokens=20, ignore_eos=True)
    requests = [
        Request(rid, prompt, SamplingParams(temperature=0.0), stopping)
        for rid, prompt in prompts.items()
    ]
    preempted = []
    preempt = engine.scheduler._preempt

    def counting(seq):
        preempted.append(seq.request_id)
        preempt(seq)

    engine.scheduler._preempt = counting
    outputs = engine.generate(requests)
    assert preempted, "the pool is meant to be too small for the three at once"
    for rid, prompt in prompts.items():
        assert outputs[rid].token_ids == hf_greedy(hf_model, prompt, 20)
    assert engine.allocator.num_used == 0


def test_a_model_whose_kv_changed_takes_no_older_block(model_dir):
    engine = make_engine(model_dir)
    prompt = engine.tokenizer.encode(SYSTEM)
    dense = engine.generate([greedy("dense", prompt)])["dense"]
    apply_sparsity(engine.model, SparsitySettings(0.5))
    sparse = engine.generate([greedy("sparse", prompt)])["sparse"]
    assert sparse.cached_prompt_tokens == 0
    fresh = make_engine(model_dir)
    apply_sparsity(fresh.model, SparsitySettings(0.5))
    assert sparse.token_ids == fresh.generate([greedy("fresh", prompt)])["fresh"].token_ids
    assert sparse.token_ids != dense.token_ids  # the cache would have changed something
    again = engine.generate([greedy("again", prompt)])["again"]
    assert again.cached_prompt_tokens > 0 and again.token_ids == sparse.token_ids


@pytest.mark.parametrize(
    "variant", ["llama_rope_llama3", "mistral_window", "qwen2_window", "qwen3_untied"]
)
def test_cached_prefix_in_every_architecture(
    tiny_model: Callable, sentencepiece_tokenizer, variant: str
) -> None:
    """Sliding windows (shorter than the prompts), q/k norms, rope scaling: a suffix prefilled
    over cached blocks gives transformers' log-probs and tokens."""
    tiny = tiny_model(variant)
    engine = LLMEngine(
        CausalLM.from_dir(tiny.path),
        sentencepiece_tokenizer,
        EngineConfig(kv_cache_bytes=4 << 20, block_size=BLOCK),
    )
    generator = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 200, (17,), generator=generator).tolist()
    options = OutputOptions(logprobs=True)
    for rid, suffix in (("first", [10, 11, 12]), ("second", [20, 21, 22, 23, 24])):
        prompt = shared + suffix
        out = engine.generate([greedy(rid, prompt, 6, output=options)])[rid]
        assert out.cached_prompt_tokens == (16 if rid == "second" else 0)
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(tiny.hf(ids).logits[0].float(), dim=-1)
        for step, lp in enumerate(out.logprobs):
            row = logp[len(prompt) - 1 + step]
            assert lp.token_id == int(row.argmax())
            assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)


def test_prefix_caching_off(model_dir):
    engine = make_engine(model_dir, prefix_caching=False)
    counts = count_computed_tokens(engine)
    prompt = engine.tokenizer.encode(SYSTEM)
    for rid in ("a", "b"):
        counts.clear()
        out = engine.generate([greedy(rid, prompt)])[rid]
        assert out.cached_prompt_tokens == 0
        assert sum(counts) == len(prompt) + len(out.token_ids) - 1
    assert engine.allocator.num_cached == 0
    stats = engine.stats()
    assert stats.prefix_cache_queries == stats.prefix_cache_hits == 0
