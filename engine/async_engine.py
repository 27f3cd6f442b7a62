"""asyncio front of the engine: a background thread steps the engine, callers await deltas.

The engine itself is single-threaded: adds and aborts are posted to an inbox that the stepping
thread drains before each step, and each step's outputs are handed to the event loop in one
callback (not one per token), which keeps the loop's per-token work small.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.llm_engine import EngineConfig, EngineLimits, EngineStats, LLMEngine
from engine.types import (
    EngineError,
    InvalidRequest,
    QueueFull,
    Request,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
)

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineConfig", "EngineLimits", "EngineStats"]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, model_id: str, engine: LLMEngine) -> None:
        self.model_id = model_id
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.limits: EngineLimits = engine.limits
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams between the loop and the step thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = engine.stats()
        self._ids = itertools.count()

    @classmethod
    def from_dir(cls, model_id: str, path: str, config: EngineConfig | None = None) -> AsyncEngine:
        return cls(model_id, LLMEngine.from_dir(path, config))

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"engine-{self.model_id}", daemon=True
        )
        self._thread.start()

    def warmup(self) -> None:
        """Run one short generation so the first real request does not pay for lazy set-up."""
        prompt = self.tokenizer.encode("Hello")[:8] or [0]
        request = Request(
            request_id=f"warmup-{self.model_id}",
            prompt_token_ids=prompt,
            sampling=SamplingParams(temperature=0.0),
            stopping=StoppingCriteria(max_new_tokens=4, ignore_eos=True),
        )
        done = threading.Event()
        self._inbox.put(("add", request, done))
        if not done.wait(timeout=600):
            raise EngineError("warm-up did not finish in 600 s")

    def shutdown(self) -> None:
        self._stopping = True
        self._inbox.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    def stats(self) -> EngineStats:
        return self._stats

    # ---- requests ---------------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        if not request.request_id:
            request.request_id = f"req-{next(self._ids)}"
        self.engine.validate(request)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request.request_id in self._streams:
                raise InvalidRequest(f"request id {request.request_id!r} is already running")
            if len(self._streams) >= self.limits.max_queue + self.engine.config.max_num_seqs:
                raise QueueFull(f"too many requests in flight ({len(self._streams)})")
            self._streams[request.request_id] = stream
        request.arrival_time = time.monotonic()
        self._inbox.put(("add", request, None))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self._inbox.put(("abort", request.request_id, None))

    def abort(self, request_id: str) -> bool:
        with self._lock:
            known = request_id in self._streams
        if known:
            self._inbox.put(("abort", request_id, None))
        return known

    # ---- the stepping thread ----------------------------------------------------------------

    def _run(self) -> None:
        warmups: dict[str, threading.Event] = {}
        while not self._stopping:
            block = not self.engine.has_unfinished()
            self._drain_inbox(block, warmups)
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a broken step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(EngineError(f"engine step failed: {exc}"))
                continue
            self._stats = self.engine.stats()
            self._deliver(outputs, warmups)

    def _drain_inbox(self, block: bool, warmups: dict[str, threading.Event]) -> None:
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            self._handle(item, warmups)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._stats = self.engine.stats()

    def _handle(self, item: tuple, warmups: dict[str, threading.Event]) -> None:
        kind, payload, done = item
        if kind == "add":
            try:
                self.engine.add_request(payload)
            except EngineError as exc:
                self._deliver_error(payload.request_id, exc)
                if done is not None:
                    done.set()
                return
            if done is not None:
                warmups[payload.request_id] = done
        elif kind == "abort":
            out = self.engine.abort(payload)
            if out is not None:
                self._deliver([out], warmups)

    def _deliver(self, outputs: list[RequestOutput], warmups: dict[str, threading.Event]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
                elif out.finished and out.request_id in warmups:
                    warmups.pop(out.request_id).set()
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)

    def _fail_all(self, exc: EngineError) -> None:
        for request_id in self.engine.abort_all():
            self._deliver_error(request_id, exc)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
