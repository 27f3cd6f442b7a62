"""EngineProcess: the engine in a child process, against the same engine in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.engine_process import EngineDied, EngineProcess
from engine.llm_engine import EngineConfig, LLMEngine
from engine.types import (
    AdapterError,
    Constraint,
    ConstraintKind,
    FinishReason,
    InvalidRequest,
    NotFound,
    QueueFull,
    Request,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
    UnsupportedModel,
)

SCHEMA = (
    '{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},'
    ' "required": ["name", "age"]}'
)
CONFIG = EngineConfig(kv_cache_bytes=8 << 20, block_size=4, max_queue=2, max_num_seqs=4)
PROMPTS = ["The quick brown fox", "Once upon a time", "1, 2, 3, 4,", "Hello", "Tandem serves"]


@pytest.fixture(scope="module")
def process_engine(model_dir: str) -> Iterator[EngineProcess]:
    engine = EngineProcess.spawn("tiny", model_dir, CONFIG)
    yield engine
    engine.shutdown()


def run(engine: EngineProcess, scenario) -> object:
    """Runs `scenario()` on a fresh event loop with the engine reading the child's messages."""

    async def main():
        engine.start()
        try:
            return await asyncio.wait_for(scenario(), timeout=120)
        finally:
            asyncio.get_running_loop().remove_reader(engine._conn.fileno())

    return asyncio.run(main())


def requests(tokenizer, **stopping) -> list[Request]:
    """Greedy and seeded sampled requests, one per prompt."""
    made = []
    for i, text in enumerate(PROMPTS):
        sampling = SamplingParams(temperature=0.0) if i % 2 else SamplingParams(0.9, seed=i)
        made.append(
            Request(
                f"r{i}",
                tokenizer.encode(text),
                sampling,
                StoppingCriteria(max_new_tokens=12, ignore_eos=True, **stopping),
            )
        )
    return made


async def collect(engine: EngineProcess, request: Request) -> list[RequestOutput]:
    return [out async for out in engine.generate(request)]


def test_streams_equal_the_engine_in_this_process(process_engine, model_dir) -> None:
    """Five requests at once (one more than a batch holds, so one waits): every token, text and
    count equals what the same engine computes in this process."""
    expected = LLMEngine.from_dir(model_dir, CONFIG).generate(requests(process_engine.tokenizer))

    async def scenario():
        sent = requests(process_engine.tokenizer)
        return await asyncio.gather(*(collect(process_engine, r) for r in sent))

    for pieces in run(process_engine, scenario):
        final = pieces[-1]
        want = expected[final.request_id]
        assert [t for p in pieces for t in p.token_ids] == want.token_ids
        assert "".join(p.text for p in pieces) == want.text
        assert final.finish_reason is FinishReason.LENGTH
        assert (final.prompt_tokens, final.completion_tokens) == (
            want.prompt_tokens,
            want.completion_tokens,
        )
        assert not any(p.finished for p in pieces[:-1])


def test_errors_cross_the_pipe_with_their_kind(process_engine) -> None:
    tokenizer = process_engine.tokenizer

    async def scenario():
        request = requests(tokenizer)[0]
        with pytest.raises(InvalidRequest, match="token ids must be in"):
            await collect(process_engine, dataclasses.replace(request, prompt_token_ids=[1 << 20]))
        with pytest.raises(NotFound, match="nope"):
            await collect(process_engine, dataclasses.replace(request, adapters=(("nope", 1.0),)))
        with pytest.raises(AdapterError) as error:
            await process_engine.load_adapter("a", "/does/not/exist")
        assert error.value.kind == "not_found"
        with pytest.raises(NotFound):
            await process_engine.remove_expert("nope")
        assert await process_engine.adapter_infos() == []
        # The same id twice, and more requests than the batch and the queue hold.
        first = process_engine.generate(dataclasses.replace(request, request_id="same"))
        await first.__anext__()
        with pytest.raises(InvalidRequest, match="already running"):
            await collect(process_engine, dataclasses.replace(request, request_id="same"))
        await first.aclose()
        many = [
            process_engine.generate(dataclasses.replace(request, request_id=f"m{i}"))
            for i in range(CONFIG.max_queue + CONFIG.max_num_seqs + 1)
        ]
        for stream in many[:-1]:
            await stream.__anext__()
        with pytest.raises(QueueFull):
            await many[-1].__anext__()
        for stream in many[:-1]:
            await stream.aclose()
        # Still serving after all that.
        return await collect(process_engine, request)

    assert run(process_engine, scenario)[-1].finish_reason is FinishReason.LENGTH


def test_abort_and_closed_streams_free_the_cache(process_engine) -> None:
    tokenizer = process_engine.tokenizer

    async def scenario():
        long = StoppingCriteria(max_new_tokens=400, ignore_eos=True)
        aborted = Request("ab", tokenizer.encode("Hi"), SamplingParams(0.0), long)
        stream = process_engine.generate(aborted)
        assert not (await stream.__anext__()).finished
        assert process_engine.abort("ab")
        rest = [out async for out in stream]
        assert rest[-1].finish_reason is FinishReason.ABORTED

        closed = process_engine.generate(dataclasses.replace(aborted, request_id="closed"))
        await closed.__anext__()
        assert process_engine.stats().kv_blocks_used > 0
        await closed.aclose()  # what a cancelled gRPC call does
        for _ in range(500):
            stats = process_engine.stats()
            if stats.kv_blocks_used == 0 and stats.num_running == 0:
                return stats
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks not freed: {process_engine.stats()}")

    run(process_engine, scenario)


def test_constrained_requests_compile_in_the_child_and_abort_while_compiling(
    process_engine,
) -> None:
    """A regex-constrained request's text matches the regex (compiled on the child's loader
    threads); one aborted as soon as it is sent ends ABORTED, whether or not it had reached
    the engine, and leaves no blocks behind."""
    tokenizer = process_engine.tokenizer
    pattern = r"(yes|no), [0-9]{3}\."
    constraint = Constraint(kind=ConstraintKind.REGEX, source=pattern)

    async def scenario():
        stopping = StoppingCriteria(max_new_tokens=40)
        made = Request("c", tokenizer.encode("Answer:"), SamplingParams(0.8, seed=3), stopping)
        made.constraint = constraint
        pieces = await collect(process_engine, made)
        # Another constraint (the first one's compilation is cached), slower to compile.
        aborted = dataclasses.replace(made, request_id="c-abort")
        aborted.constraint = Constraint(kind=ConstraintKind.JSON_SCHEMA, source=SCHEMA)
        stream = process_engine.generate(aborted)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the request is sent
        assert process_engine.abort("c-abort")
        outputs = [await first] + [out async for out in stream]
        for _ in range(500):
            if process_engine.stats().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        return pieces, outputs

    pieces, aborted = run(process_engine, scenario)
    assert pieces[-1].finish_reason is FinishReason.EOS  # the match is complete
    assert re.fullmatch(pattern, "".join(p.text for p in pieces))
    assert aborted[-1].finish_reason is FinishReason.ABORTED
    assert process_engine.stats().kv_blocks_used == 0


def test_a_dead_engine_fails_its_streams_and_later_calls(model_dir) -> None:
    engine = EngineProcess.spawn("doomed", model_dir, CONFIG)
    tokenizer = engine.tokenizer

    async def scenario():
        long = StoppingCriteria(max_new_tokens=400, ignore_eos=True)
        stream = engine.generate(Request("x", tokenizer.encode("Hi"), SamplingParams(0.0), long))
        await stream.__anext__()
        engine._process.kill()
        with pytest.raises(EngineDied):
            async for _ in stream:
                pass
        assert not engine.alive
        with pytest.raises(EngineDied):
            await engine.adapter_infos()
        with pytest.raises(EngineDied):
            await collect(engine, Request("y", [5], SamplingParams(0.0), long))

    try:
        run(engine, scenario)
    finally:
        engine.shutdown()
    assert engine._process.returncode is not None


def test_a_model_that_fails_to_load_raises_its_error_in_the_parent(
    tmp_path, sentencepiece_tokenizer_dir
) -> None:
    """The child's loader refuses the architecture; the parent raises that error."""
    for f in Path(sentencepiece_tokenizer_dir).iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2"]}')
    with pytest.raises(UnsupportedModel, match=r"unsupported architecture \['GPT2'\]"):
        EngineProcess.spawn("bad", str(tmp_path), CONFIG)
