"""The child side of engine_process: AsyncEngine's stepping thread, its callers over a pipe.

The pipe's reader (the main thread) checks each request and posts it to the stepping thread's
inbox; constraints to compile and adapters to read from disk go through the loader threads
first, as in AsyncEngine. Each step's outputs leave in one message sent by the stepping thread.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from engine.async_engine import AsyncEngine
from engine.engine_process import EngineFacts, as_engine_error
from engine.llm_engine import LLMEngine
from engine.lora import AdapterUse
from engine.types import (
    AdapterInfo,
    EngineConfig,
    EngineError,
    ExpertInfo,
    Request,
    RequestOutput,
    SparsitySettings,
)

log = logging.getLogger(__name__)


class EngineWorker(AsyncEngine):
    """AsyncEngine whose caller is the parent process."""

    def __init__(self, conn: Connection, model_id: str, engine: LLMEngine) -> None:
        super().__init__(model_id, engine)
        self._conn = conn
        self._send_lock = threading.Lock()  # the stepping, reading and loader threads send
        # Under self._lock: requests the parent streams, and those of them still being
        # prepared on a loader thread (not yet in the engine).
        self._live: set[str] = set()
        self._admitting: dict[str, Request] = {}
        self._sent_stats = self._stats  # what the parent's metrics last heard

    @classmethod
    def load(
        cls,
        conn: Connection,
        model_id: str,
        path: str,
        config: EngineConfig,
        sparsity: SparsitySettings | None,
    ) -> EngineWorker:
        return cls(conn, model_id, LLMEngine.from_dir(path, config, sparsity))

    def serve(self) -> None:
        """Runs until the parent says stop or goes away."""
        self._send(("ready", EngineFacts(self.config, self.limits, self.stats(), self.sparsity)))
        self.start()
        try:
            self._read_commands()
        finally:
            self.shutdown()

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _read_commands(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            kind = message[0]
            if kind == "generate":
                self._admit(message[1])
            elif kind == "abort":
                self._abort(message[1])
            elif kind == "call":
                _, call_id, name, args = message
                self._loader.submit(self._answer, call_id, name, args)
            elif kind == "stop":
                return

    # ---- requests ---------------------------------------------------------------------------

    def _admit(self, request: Request) -> None:
        """Checked here; a constraint to compile or an adapter on disk goes to a loader."""
        with self._lock:
            self._live.add(request.request_id)
        try:
            self.engine.validate(request)
            held = self.engine.hold_adapters(request.adapters, may_load=False)  # no I/O
        except EngineError as error:
            self._fail(request.request_id, error)
            return
        if held is None or request.constraint is not None:
            with self._lock:
                self._admitting[request.request_id] = request
            self._loader.submit(self._admit_slowly, request, held)
        else:
            self._inbox.put(("add", (request, held, None), None))

    def _admit_slowly(self, request: Request, held: AdapterUse | None) -> None:
        try:
            if held is None:
                held = self.engine.hold_adapters(request.adapters)
            constraint = None
            if request.constraint is not None:
                constraint = self.engine.compile_constraint(request.constraint)
        except Exception as error:
            if held is not None:
                self.engine.release_adapters(held)
            with self._lock:
                self._admitting.pop(request.request_id, None)
            self._fail(request.request_id, as_engine_error(error))
            return
        with self._lock:
            admitted = self._admitting.pop(request.request_id, None) is not None
        if admitted:
            self._inbox.put(("add", (request, held, constraint), None))
        else:  # aborted while its adapter was read or its constraint compiled
            self.engine.release_adapters(held)

    def _abort(self, request_id: str) -> None:
        """The engine's final ABORTED output goes to the parent as any other; a request still
        being prepared never reaches the engine and gets its final output here."""
        with self._lock:
            request = self._admitting.pop(request_id, None)
            if request is not None:
                self._live.discard(request_id)
        if request is None:
            self._inbox.put(("abort", request_id, None))
            return
        self._send(("outputs", [RequestOutput.aborted(request)], self._stats))

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            self._live.discard(request_id)
        self._send(("error", request_id, error))

    # ---- AsyncEngine's delivery, over the pipe ----------------------------------------------

    def _deliver(self, outputs: list[RequestOutput], warmups: dict[str, threading.Event]) -> None:
        sent = []
        with self._lock:
            for out in outputs:
                if out.request_id in self._live:
                    sent.append(out)
                    if out.finished:
                        self._live.discard(out.request_id)
                elif out.finished and out.request_id in warmups:
                    warmups.pop(out.request_id).set()
        if sent:
            self._sent_stats = self._stats
            self._send(("outputs", sent, self._stats))

    def _drain_inbox(self, block: bool, warmups: dict[str, threading.Event]) -> None:
        super()._drain_inbox(block, warmups)
        # Adds and aborts change the counts between steps too (an aborted request's blocks
        # are free before any next step): the parent's metrics must not keep the old ones.
        if self._stats != self._sent_stats:
            self._sent_stats = self._stats
            self._send(("stats", self._stats))

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            live = request_id in self._live
        if live:
            self._fail(request_id, exc)

    # ---- calls: the registry, on the loader threads ------------------------------------------

    def _answer(self, call_id: int, name: str, args: tuple) -> None:
        handler: Callable[..., object] | None = getattr(self, f"_call_{name}", None)
        try:
            if handler is None:
                raise EngineError(f"unknown engine call {name!r}")
            reply = ("reply", call_id, True, handler(*args))
        except Exception as error:
            reply = ("reply", call_id, False, as_engine_error(error))
        self._send(reply)

    def _call_warm_up(self) -> str:
        self.warmup()
        return self.decode_kernels()

    def _call_validate(self, request: Request) -> None:
        self.engine.validate(request)

    def _call_load_adapter(self, adapter_id: str, path: str, pin: bool) -> AdapterInfo:
        self.engine.load_adapter(adapter_id, path, pin)
        return self._adapter_info(adapter_id)

    def _call_merge_adapters(self, adapter_id, sources, out_dir, spec) -> AdapterInfo:
        self.engine.merge_adapters(adapter_id, sources, out_dir, spec)
        return self._adapter_info(adapter_id)

    def _call_remove_adapter(self, adapter_id: str) -> None:
        self.engine.remove_adapter(adapter_id)

    def _call_adapter_infos(self) -> list[AdapterInfo]:
        return self.engine.adapter_infos()

    def _call_load_expert(self, expert_id: str, path: str, small_base: str) -> ExpertInfo:
        return self.engine.load_expert(expert_id, path, small_base)

    def _call_remove_expert(self, expert_id: str) -> None:
        self.engine.remove_expert(expert_id)

    def _call_expert_infos(self) -> list[ExpertInfo]:
        return self.engine.expert_infos()


def main() -> None:
    """`python -m engine.engine_worker FD`: FD is this end of the socket pair to the server."""
    conn = Connection(int(sys.argv[1]))
    model_id, path, config, sparsity, log_level = conn.recv()
    logging.basicConfig(
        level=log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s",
    )
    # A terminal's Ctrl-C reaches the whole process group: the server drains, then says stop
    # (or closes its end); the engine must keep stepping until then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        worker = EngineWorker.load(conn, model_id, path, config, sparsity)
    except BaseException as error:  # reported to the server, which raises it
        conn.send(("failed", as_engine_error(error)))
        return
    worker.serve()


if __name__ == "__main__":
    main()
