"""asyncio front of the engine: a background thread steps the engine, callers await deltas.

The engine itself is single-threaded: adds and aborts are posted to an inbox that the stepping
thread drains before each step, and each step's outputs are handed to the event loop in one
callback (not one per token), which keeps the loop's per-token work small.

LoRA adapter files are read on a small pool of loader threads, never on the event loop or the
stepping thread: LoadAdapter's validation, and requests naming an adapter that is on disk,
which wait for it there before they reach the engine; other streams keep stepping meanwhile.
Constraints are compiled on the same threads (bounded in time by the compiler), also before
the request reaches the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.adapters import AdapterRefs
from engine.grammar import CompiledConstraint
from engine.llm_engine import EngineConfig, EngineLimits, EngineStats, LLMEngine
from engine.lora import AdapterUse
from engine.sparsity import SparsitySettings
from engine.types import (
    AdapterInfo,
    EngineError,
    ExpertInfo,
    InvalidRequest,
    MergeSpec,
    NotFound,
    QueueFull,
    Request,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
)

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineConfig", "EngineLimits", "EngineStats"]

# An idle engine gathers a burst of requests for at most this many times batch_wait_s.
_MAX_GATHER = 5
# Threads that read adapter files: a few, so that one slow disk read does not queue the others.
_LOADER_THREADS = 2


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, model_id: str, engine: LLMEngine) -> None:
        self.model_id = model_id
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config: EngineConfig = engine.config
        self.limits: EngineLimits = engine.limits
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams between the loop and the step thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = engine.stats()
        self._ids = itertools.count()
        self._loader = concurrent.futures.ThreadPoolExecutor(
            _LOADER_THREADS, thread_name_prefix=f"adapters-{model_id}"
        )
        if self.sparsity is not None:
            log.info("model %s: sparse activation, %s", model_id, self.sparsity.describe())

    @classmethod
    def from_dir(
        cls,
        model_id: str,
        path: str,
        config: EngineConfig | None = None,
        sparsity: SparsitySettings | None = None,
    ) -> AsyncEngine:
        return cls(model_id, LLMEngine.from_dir(path, config, sparsity))

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
        self._inbox.put(("add", (request, (), None), done))
        # Meanwhile: the grammar engines' vocabularies and the compile worker.
        self.engine.constraints.prepare()
        if not done.wait(timeout=600):
            raise EngineError("warm-up did not finish in 600 s")

    async def warm_up(self) -> str:
        """warmup() off the event loop; returns what runs the decode steps, for the logs."""
        await asyncio.get_running_loop().run_in_executor(None, self.warmup)
        return self.decode_kernels()

    def decode_kernels(self) -> str:
        """What runs the model's decode steps (CausalLM.decode_kernels), for the logs."""
        return self.engine.model.decode_kernels()

    @property
    def sparsity(self) -> SparsitySettings | None:
        """The model's sparse-activation settings; None runs it dense."""
        return self.engine.model.sparsity

    def shutdown(self) -> None:
        self._stopping = True
        self.engine.constraints.close()
        self._inbox.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loader.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def alive(self) -> bool:
        """The stepping thread runs (or has not started yet); it survives failed steps."""
        return self._thread is None or self._thread.is_alive() or self._stopping

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
        finished = False
        try:
            constraint = await self._compile(request)
            adapters = await self._hold_adapters(request)
            self._inbox.put(("add", (request, adapters, constraint), None))
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

    async def _compile(self, request: Request) -> CompiledConstraint | None:
        if request.constraint is None:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._loader, self.engine.compile_constraint, request.constraint
        )

    async def _hold_adapters(self, request: Request) -> AdapterUse:
        """The request's adapters held in host memory; one on disk is read on a loader thread.
        If the caller goes away meanwhile, the adapters are released when the read ends."""
        if not request.adapters:
            return ()
        held = self.engine.hold_adapters(request.adapters, may_load=False)  # no I/O
        if held is not None:
            return held
        future = self._loader.submit(self.engine.hold_adapters, request.adapters)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self.engine.release_adapters(future.result())

    # ---- LoRA adapters ------------------------------------------------------------------------

    async def load_adapter(self, adapter_id: str, path: str, pin: bool = False) -> AdapterInfo:
        """Read, validate and register an adapter on a loader thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._loader, self.engine.load_adapter, adapter_id, path, pin)
        return self._adapter_info(adapter_id)

    async def merge_adapters(
        self, adapter_id: str, sources: AdapterRefs, out_dir: str, spec: MergeSpec
    ) -> AdapterInfo:
        """Merge registered adapters into a new one on a loader thread (see LLMEngine)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._loader, self.engine.merge_adapters, adapter_id, sources, out_dir, spec
        )
        return self._adapter_info(adapter_id)

    async def remove_adapter(self, adapter_id: str) -> None:
        self.engine.remove_adapter(adapter_id)

    async def adapter_infos(self) -> list[AdapterInfo]:
        return self.engine.adapter_infos()

    def _adapter_info(self, adapter_id: str) -> AdapterInfo:
        infos = [info for info in self.engine.adapter_infos() if info.adapter_id == adapter_id]
        if not infos:  # unloaded again meanwhile
            raise NotFound(f"unknown adapter {adapter_id!r}")
        return infos[0]

    # ---- experts ------------------------------------------------------------------------------

    async def load_expert(self, expert_id: str, path: str, small_base: str) -> ExpertInfo:
        """Read, validate and register an expert (and its small base) on a loader thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._loader, self.engine.load_expert, expert_id, path, small_base
        )

    async def remove_expert(self, expert_id: str) -> None:
        self.engine.remove_expert(expert_id)

    async def expert_infos(self) -> list[ExpertInfo]:
        return self.engine.expert_infos()

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
        # An idle engine gathers a burst before its first step, so that the burst is prefilled
        # in one step rather than the first request alone and the rest a step later: it waits
        # while each item follows the last within batch_wait_s, for at most _MAX_GATHER of it.
        gap = self.config.batch_wait_s if block else 0.0
        give_up = time.monotonic() + _MAX_GATHER * gap
        while True:
            self._handle(item, warmups)
            wait = min(gap, give_up - time.monotonic())
            try:
                item = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
        self._stats = self.engine.stats()

    def _handle(self, item: tuple, warmups: dict[str, threading.Event]) -> None:
        kind, payload, done = item
        if kind == "add":
            request, adapters, constraint = payload
            try:
                self.engine.add_request(request, adapters, constraint)
            except EngineError as exc:
                self._deliver_error(request.request_id, exc)
                if done is not None:
                    done.set()
                return
            if done is not None:
                warmups[request.request_id] = done
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
