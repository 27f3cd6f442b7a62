"""The engine in a process of its own, behind AsyncEngine's interface.

In one process the server's event loop and the engine's stepping thread share one GIL: while
the loop writes a step's messages (grpc.aio costs about 120 us of CPU per streamed message),
the step's Python waits, and every message lengthens the step. Here the child process runs the
stepping thread (AsyncEngine's) and answers the parent over a socket pair; the parent's event
loop keeps the streams, the limits and the tokenizer, and writes while the engine steps. On a
machine whose cores the engine's threads all use, the writes still take a core from them; with
a core to spare they cost the engine nothing (bench/README.md, "gRPC against the engine").

Wire protocol (pickled tuples over a socket pair, multiprocessing.connection's framing):
    parent -> child: (model_id, path, EngineConfig, SparsitySettings | None, log level) first
    parent -> child: ("generate", Request) | ("abort", request_id) | ("call", id, name, args)
                     | ("stop",)
    child -> parent: ("ready", EngineFacts) | ("failed", exception)   once, at start
                     | ("outputs", [RequestOutput], EngineStats)      one per engine step
                     | ("stats", EngineStats)          counts changed between steps
                     | ("error", request_id, exception)               a request that failed
                     | ("reply", id, ok, value or exception)          a call's answer
The child sends each step's outputs from the stepping thread itself, in one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from engine.tokenizer import Tokenizer
from engine.types import (
    AdapterInfo,
    EngineConfig,
    EngineError,
    EngineLimits,
    EngineStats,
    ExpertInfo,
    InvalidRequest,
    QueueFull,
    Request,
    RequestOutput,
    SparsitySettings,
)

log = logging.getLogger(__name__)

# Loading a large model (and building kernels on first use) can take minutes.
_LOAD_TIMEOUT_S = 1800.0


class EngineDied(EngineError):
    """The engine process exited: its requests fail, the server reports NOT_SERVING."""

    kind = "unavailable"


@dataclass(frozen=True)
class EngineFacts:
    """What the parent needs to know of a loaded engine without asking again."""

    config: EngineConfig
    limits: EngineLimits
    stats: EngineStats
    sparsity: SparsitySettings | None


class EngineProcess:
    """AsyncEngine's interface for the server, the engine itself in a child process."""

    def __init__(
        self,
        model_id: str,
        tokenizer: Tokenizer,
        conn: Connection,
        process: subprocess.Popen,
        facts: EngineFacts,
    ) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.config = facts.config
        self.limits = facts.limits
        self.sparsity = facts.sparsity
        self._stats = facts.stats
        self._conn = conn
        self._process = process
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue[object]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._ids = itertools.count()
        self._kernels = "not warmed up"
        self._dead: EngineDied | None = None
        self._send_lock = threading.Lock()  # shutdown may run off the event loop

    @classmethod
    def spawn(
        cls,
        model_id: str,
        path: str,
        config: EngineConfig,
        sparsity: SparsitySettings | None = None,
    ) -> EngineProcess:
        """Blocking: starts the child, which loads the model; returns once it is loaded.

        A plain `python -m engine.engine_worker` with one end of a socket pair (multiprocessing
        would re-import the caller's __main__ module in the child); its log lines go to this
        process's stderr."""
        ours, theirs = socket.socketpair()
        with ours, theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "engine.engine_worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
            conn = Connection(ours.detach())
        try:
            conn.send((model_id, path, config, sparsity, logging.getLogger().level))
            tokenizer = Tokenizer.from_dir(path)
            facts = _wait_ready(conn, process)
        except BaseException:
            process.kill()
            process.wait()
            conn.close()
            raise
        return cls(model_id, tokenizer, conn, process, facts)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Called on the event loop: from now on it reads the child's messages."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    async def warm_up(self) -> str:
        """One short generation in the child; returns what runs its decode steps."""
        self._kernels = await self._call("warm_up")
        return self._kernels

    def decode_kernels(self) -> str:
        return self._kernels

    def shutdown(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        if self._dead is None:
            with contextlib.suppress(EngineError):
                self._send(("stop",))
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log.warning("engine process of %s did not stop; killing it", self.model_id)
            self._process.kill()
            self._process.wait()
        self._conn.close()

    @property
    def alive(self) -> bool:
        return self._dead is None

    def stats(self) -> EngineStats:
        return self._stats

    # ---- requests ---------------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        if not request.request_id:
            request.request_id = f"req-{next(self._ids)}"
        request_id = request.request_id
        if request_id in self._streams:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        if self._full():
            # A request that can never run gets its own error first, as in process: a client
            # retries RESOURCE_EXHAUSTED, and a retry cannot fix a bad request.
            await self._call("validate", request)
            if self._full():
                raise QueueFull(f"too many requests in flight ({len(self._streams)})")
        self._check_alive()
        stream: asyncio.Queue[object] = asyncio.Queue()
        self._streams[request_id] = stream
        request.arrival_time = time.monotonic()
        finished = False
        try:
            self._send(("generate", request))
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, RequestOutput)
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._dead is None:
                self._send(("abort", request_id))

    def _full(self) -> bool:
        return len(self._streams) >= self.limits.max_queue + self.config.max_num_seqs

    def abort(self, request_id: str) -> bool:
        known = request_id in self._streams
        if known:
            self._send(("abort", request_id))
        return known

    # ---- LoRA adapters and experts: answered by the child --------------------------------

    async def load_adapter(self, adapter_id: str, path: str, pin: bool = False) -> AdapterInfo:
        return await self._call("load_adapter", adapter_id, path, pin)

    async def merge_adapters(self, adapter_id: str, sources, out_dir: str, spec) -> AdapterInfo:
        return await self._call("merge_adapters", adapter_id, sources, out_dir, spec)

    async def remove_adapter(self, adapter_id: str) -> None:
        await self._call("remove_adapter", adapter_id)

    async def adapter_infos(self) -> list[AdapterInfo]:
        return await self._call("adapter_infos")

    async def load_expert(self, expert_id: str, path: str, small_base: str) -> ExpertInfo:
        return await self._call("load_expert", expert_id, path, small_base)

    async def remove_expert(self, expert_id: str) -> None:
        await self._call("remove_expert", expert_id)

    async def expert_infos(self) -> list[ExpertInfo]:
        return await self._call("expert_infos")

    # ---- the pipe ---------------------------------------------------------------------------

    async def _call(self, name: str, *args: object) -> Any:
        self._check_alive()
        assert self._loop is not None, "start() first"
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._calls[call_id] = future
        try:
            self._send(("call", call_id, name, args))
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _send(self, message: tuple) -> None:
        self._check_alive()
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as error:
            self._died(f"cannot reach the engine process: {error}")
            self._check_alive()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDied(str(self._dead))  # a fresh one: each raise adds its traceback

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            try:  # it has closed its end: it is exiting
                code = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self._died(f"the engine process of {self.model_id} exited (code {code})")

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            _, outputs, self._stats = message
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put_nowait(out)
        elif kind == "stats":
            self._stats = message[1]
        elif kind == "error":
            _, request_id, error = message
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(error)
        elif kind == "reply":
            _, call_id, ok, value = message
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _died(self, why: str) -> None:
        if self._dead is not None:
            return
        log.error("%s", why)
        self._dead = EngineDied(why)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        for stream in self._streams.values():
            stream.put_nowait(EngineDied(why))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDied(why))


def _wait_ready(conn: Connection, process: subprocess.Popen) -> EngineFacts:
    deadline = time.monotonic() + _LOAD_TIMEOUT_S
    while not conn.poll(1.0):
        if process.poll() is not None:
            raise EngineDied(f"the engine process exited while loading (code {process.returncode})")
        if time.monotonic() > deadline:
            raise EngineDied(f"the engine process did not load in {_LOAD_TIMEOUT_S:.0f} s")
    kind, payload = conn.recv()
    if kind == "failed":
        raise payload
    return payload


def as_engine_error(error: BaseException) -> BaseException:
    """What crosses the pipe: engine errors as they are (their kind maps to a status), other
    exceptions as EngineError with their text (their class may not unpickle in the parent)."""
    if isinstance(error, EngineError):
        return error
    log.exception("engine call failed", exc_info=error)
    return EngineError(f"{type(error).__name__}: {error}")


__all__ = ["EngineDied", "EngineFacts", "EngineProcess"]
