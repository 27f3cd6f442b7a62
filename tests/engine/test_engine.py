"""The engine loop end to end: scheduling, batching, chunked prefill, preemption, stopping.

Oracles: Hugging Face transformers for tokens and log-probs; the engine's own single-request run
for "batching changes nothing".
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
import transformers

from engine.async_engine import AsyncEngine
from engine.llm_engine import EngineConfig, LLMEngine
from engine.types import (
    FinishReason,
    InvalidRequest,
    OutputOptions,
    Request,
    SamplingParams,
    StoppingCriteria,
)

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3, 4,",
    "Tandem serves many adapters",
    "Hello",
    "A longer prompt that should be split into several prefill chunks when the token budget "
    "of a step is small, so that decoding of the other requests keeps going meanwhile.",
]


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_engine(model_dir: str, **overrides) -> LLMEngine:
    config = EngineConfig(**{"kv_cache_bytes": 8 << 20, "block_size": 4, **overrides})
    return LLMEngine.from_dir(model_dir, config)


def request(engine: LLMEngine, i: int, text: str, **kw) -> Request:
    sampling = kw.pop("sampling", SamplingParams(temperature=0.0))
    stopping = kw.pop("stopping", StoppingCriteria(max_new_tokens=12))
    return Request(f"r{i}", engine.tokenizer.encode(text), sampling, stopping, **kw)


def run_alone(engine: LLMEngine, req: Request) -> list[int]:
    return engine.generate([req])[req.request_id].token_ids


def run_mixed(engine: LLMEngine, probe: Request, others: list[Request], seed: int) -> list[int]:
    """Run `probe` while the others join at random steps; returns the probe's tokens."""
    rng = random.Random(seed)
    pending = list(others)
    rng.shuffle(pending)
    tokens: dict[str, list[int]] = {}
    engine.add_request(probe)
    while engine.has_unfinished() or pending:
        while pending and rng.random() < 0.4:
            engine.add_request(pending.pop())
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens[probe.request_id]


def test_greedy_matches_transformers_generate(model_dir, hf_model):
    engine = make_engine(model_dir)
    reqs = [request(engine, i, p) for i, p in enumerate(PROMPTS)]
    outputs = engine.generate(reqs)
    for req in reqs:
        ids = torch.tensor([req.prompt_token_ids])
        expected = hf_model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=2)
        got = outputs[req.request_id]
        assert got.token_ids == expected[0, ids.shape[1] :].tolist()
        assert got.prompt_tokens == len(req.prompt_token_ids)
        assert got.completion_tokens == len(got.token_ids)


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.9, seed=7)],
    ids=["greedy", "seeded"],
)
def test_batching_and_chunked_prefill_change_nothing(model_dir, sampling):
    # A 6-token step budget splits every prompt into chunks while others decode.
    engine = make_engine(model_dir, max_batched_tokens=6)
    stopping = StoppingCriteria(max_new_tokens=16, ignore_eos=True)
    probe_text = PROMPTS[5]
    alone = run_alone(engine, request(engine, 99, probe_text, sampling=sampling, stopping=stopping))
    for trial in range(2):
        others = [
            request(
                engine,
                i,
                PROMPTS[i % len(PROMPTS)],
                sampling=SamplingParams(temperature=1.0, seed=i) if i % 2 else SamplingParams(0.0),
                stopping=StoppingCriteria(max_new_tokens=4 + 3 * i, ignore_eos=True),
            )
            for i in range(8)
        ]
        probe = request(engine, 99, probe_text, sampling=sampling, stopping=stopping)
        assert run_mixed(engine, probe, others, seed=trial) == alone
    assert engine.allocator.num_used == 0


def test_same_seed_same_output_and_different_seed_differs(model_dir):
    engine = make_engine(model_dir)
    stopping = StoppingCriteria(max_new_tokens=24, ignore_eos=True)

    def draw(seed: int) -> list[int]:
        sampling = SamplingParams(temperature=1.5, seed=seed)
        return run_alone(engine, request(engine, 0, "Hello", sampling=sampling, stopping=stopping))

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_preemption_recomputes_without_changing_output(model_dir):
    stopping = StoppingCriteria(max_new_tokens=20, ignore_eos=True)
    roomy = make_engine(model_dir)
    expected = {
        f"r{i}": run_alone(roomy, request(roomy, i, p, stopping=stopping))
        for i, p in enumerate(PROMPTS[:4])
    }
    # 12 blocks of 4 tokens: not enough for four sequences of ~30 tokens at once.
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # layers * (k, v) * block * kv_heads * head_dim * fp32
    tight = make_engine(model_dir, kv_cache_bytes=12 * per_block)
    assert tight.allocator.num_blocks == 12
    outputs = tight.generate(
        [request(tight, i, p, stopping=stopping) for i, p in enumerate(PROMPTS[:4])]
    )
    assert {k: v.token_ids for k, v in outputs.items()} == expected
    assert tight.allocator.num_used == 0
    assert tight.stats().num_preemptions > 0 and roomy.stats().num_preemptions == 0


def test_stop_string_token_and_length(model_dir):
    engine = make_engine(model_dir)
    free = engine.generate(
        [
            request(
                engine,
                0,
                "Once upon",
                stopping=StoppingCriteria(max_new_tokens=30, ignore_eos=True),
            )
        ]
    )["r0"]
    assert free.finish_reason is FinishReason.LENGTH and len(free.token_ids) == 30
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "pick a stop string with visible characters"
    stopped = engine.generate(
        [
            request(
                engine, 1, "Once upon", stopping=StoppingCriteria(30, stop=(stop,), ignore_eos=True)
            )
        ]
    )["r1"]
    assert stopped.finish_reason is FinishReason.STOP_STRING
    assert stopped.text == text[: text.index(stop)]

    stop_id = free.token_ids[5]
    by_token = engine.generate(
        [request(engine, 2, "Once upon", stopping=StoppingCriteria(30, stop_token_ids=(stop_id,)))]
    )["r2"]
    assert by_token.finish_reason is FinishReason.STOP_TOKEN
    assert by_token.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]


def test_logprobs_match_transformers(model_dir, hf_model):
    engine = make_engine(model_dir)
    req = request(
        engine,
        0,
        PROMPTS[0],
        stopping=StoppingCriteria(max_new_tokens=5, ignore_eos=True),
        output=OutputOptions(logprobs=True, top_logprobs=3),
    )
    out = engine.generate([req])["r0"]
    ids = torch.tensor([req.prompt_token_ids + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0].float(), dim=-1)
    start = len(req.prompt_token_ids) - 1
    assert len(out.logprobs) == 5
    for step, lp in enumerate(out.logprobs):
        row = logp[start + step]
        assert lp.token_id == out.token_ids[step]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_abort_frees_blocks(model_dir):
    engine = make_engine(model_dir)
    engine.add_request(request(engine, 0, PROMPTS[1], stopping=StoppingCriteria(100)))
    engine.step()
    engine.step()
    assert engine.allocator.num_used > 0
    out = engine.abort("r0")
    assert out.finish_reason is FinishReason.ABORTED
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()


def test_invalid_requests_are_refused(model_dir):
    engine = make_engine(model_dir, max_prompt_tokens=16, max_new_tokens=64)
    with pytest.raises(InvalidRequest, match="prompt"):
        engine.add_request(Request("a", list(range(3, 20))))
    with pytest.raises(InvalidRequest, match="token ids"):
        engine.add_request(Request("b", [1, 40000]))
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        engine.add_request(Request("c", [1, 5], stopping=StoppingCriteria(max_new_tokens=65)))
    with pytest.raises(InvalidRequest, match="temperature"):
        engine.add_request(
            Request(
                "d", [1, 5], SamplingParams(temperature=-1.0), StoppingCriteria(max_new_tokens=8)
            )
        )
    assert not engine.has_unfinished()


def test_async_stream_and_cancellation(model_dir):
    engine = AsyncEngine("tiny", make_engine(model_dir))
    engine.start()
    engine.warmup()

    async def scenario():
        stopping = StoppingCriteria(max_new_tokens=10, ignore_eos=True)
        full = Request("full", engine.tokenizer.encode("Hello"), SamplingParams(0.0), stopping)
        pieces = [out async for out in engine.generate(full)]
        assert pieces[-1].finish_reason is FinishReason.LENGTH
        assert sum(len(p.token_ids) for p in pieces) == 10

        aborted = Request(
            "ab", engine.tokenizer.encode("Hi"), SamplingParams(0.0), StoppingCriteria(400)
        )
        stream = engine.generate(aborted)
        first = await stream.__anext__()
        assert not first.finished and engine.abort("ab")
        rest = [out async for out in stream]
        assert rest[-1].finish_reason is FinishReason.ABORTED

        long = Request(
            "long", engine.tokenizer.encode("Hello"), SamplingParams(0.0), StoppingCriteria(400)
        )
        stream = engine.generate(long)
        async for _ in stream:
            break
        await stream.aclose()  # what a cancelled gRPC call does
        for _ in range(200):
            if engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks not freed: {engine.stats()}")

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("batch_wait_s", [0.0, 0.5])
def test_idle_engine_gathers_a_burst_into_one_prefill(model_dir, batch_wait_s):
    """Requests sent 100 ms apart to an idle engine: within the wait, all four are prefilled in
    the first step; without it, the first is prefilled alone."""
    inner = make_engine(model_dir, batch_wait_s=batch_wait_s)
    engine = AsyncEngine("tiny", inner)
    step_sizes: list[int] = []
    schedule = inner.scheduler.schedule

    def recording_schedule():
        scheduled = schedule()
        step_sizes.append(len(scheduled))
        return scheduled

    inner.scheduler.schedule = recording_schedule
    engine.start()

    async def one(i: int) -> int:
        await asyncio.sleep(0.1 * i)
        stopping = StoppingCriteria(max_new_tokens=3, ignore_eos=True)
        req = Request(f"b{i}", engine.tokenizer.encode(PROMPTS[i]), SamplingParams(0.0), stopping)
        return sum([len(out.token_ids) async for out in engine.generate(req)])

    async def burst():
        return await asyncio.gather(*(one(i) for i in range(4)))

    try:
        assert asyncio.run(burst()) == [3, 3, 3, 3]
    finally:
        engine.shutdown()
    assert step_sizes[0] == (4 if batch_wait_s else 1)
