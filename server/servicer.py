"""The gRPC servicers of tandem.v1 (Generation and Registry) on top of the loaded engines."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import grpc

from engine.types import EngineError, Request, RequestOutput
from server.mapping import (
    RequestRejected,
    adapter_info,
    adapter_to_load,
    engine_request,
    expert_info,
    expert_to_load,
    merge_of,
    prompt_of,
    responses,
    status_for,
)
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from server.engines import ServedEngine
    from server.metrics import Metrics, RequestMetrics

log = logging.getLogger(__name__)

_Handler = Callable[..., Awaitable[Any]]


class RunningRequest:
    """One Generate stream in flight.

    A small task forwards the engine's outputs into a queue that the RPC handler drains, so
    Abort can end the stream by cancelling that task (the engine then aborts the request and
    frees its KV blocks) and telling the handler, which sends the final message.
    """

    def __init__(self, engine: ServedEngine) -> None:
        self.engine = engine
        # Engine outputs, an engine error, or _ABORTED.
        self.outputs: asyncio.Queue[object] = asyncio.Queue()
        self._forwarder: asyncio.Task[None] | None = None

    def start(self, request: Request) -> None:
        self._forwarder = asyncio.create_task(self._forward(request))

    async def _forward(self, request: Request) -> None:
        try:
            async for output in self.engine.generate(request):
                self.outputs.put_nowait(output)
        except Exception as error:  # raised again in the handler, which maps it to a status
            self.outputs.put_nowait(error)

    def abort(self) -> None:
        self.stop()
        self.outputs.put_nowait(_ABORTED)

    def stop(self) -> None:
        if self._forwarder is not None:
            self._forwarder.cancel()


_ABORTED = object()


class ServingState:
    """What the servicers share: loaded engines, readiness, draining, and running requests."""

    def __init__(self) -> None:
        self.engines: dict[str, ServedEngine] = {}
        self.ready = False
        self.draining = False
        self.failure = ""  # why the server stops, when an engine died
        self._running: dict[str, RunningRequest] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_running(self) -> int:
        return len(self._running)

    def check_accepting(self) -> None:
        if self.draining:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if not self.ready:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "the models are still loading")

    def resolve(self, model: str) -> ServedEngine:
        """The engine of `model`; an empty name means the only model served."""
        served = ", ".join(self.engines) or "none yet"
        if not model:
            if len(self.engines) == 1:
                return next(iter(self.engines.values()))
            raise RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model is required when several models are served ({served})",
            )
        engine = self.engines.get(model)
        if engine is None:
            raise RequestRejected(
                grpc.StatusCode.NOT_FOUND, f"model {model!r} is not served; served: {served}"
            )
        return engine

    @contextmanager
    def track(self, request_id: str, engine: ServedEngine) -> Iterator[RunningRequest]:
        """Registers a running request under its id, unique across all models."""
        if request_id in self._running:
            raise RequestRejected(
                grpc.StatusCode.ALREADY_EXISTS, f"request id {request_id!r} is already running"
            )
        running = self._running[request_id] = RunningRequest(engine)
        self._idle.clear()
        try:
            yield running
        finally:
            running.stop()
            del self._running[request_id]
            if not self._running:
                self._idle.set()

    def abort(self, request_id: str) -> bool:
        running = self._running.get(request_id)
        if running is None:
            return False
        running.abort()
        return True

    def abort_all(self) -> None:
        for running in self._running.values():
            running.abort()

    async def wait_idle(self, timeout: float) -> bool:
        """True when no request is running (any more) within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _translate_errors(handler: _Handler) -> _Handler:
    """Turn refusals and engine errors into status codes; anything else is INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except RequestRejected as rejected:
            await context.abort(rejected.code, rejected.message)
        except EngineError as error:
            if status_for(error) == grpc.StatusCode.INTERNAL:
                log.error("engine error in %s: %s", handler.__name__, error)
            await context.abort(status_for(error), str(error))
        except Exception as error:  # a bug must fail one request, not the server
            log.exception("unexpected error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")

    return wrapper


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, state: ServingState, metrics: Metrics, stream_interval: int = 1) -> None:
        self._state = state
        self._metrics = metrics
        self._stream_interval = stream_interval

    @_translate_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        self._state.check_accepting()
        engine = self._state.resolve(request.model)
        request_id = request.request_id or uuid.uuid4().hex
        with self._state.track(request_id, engine) as running:
            prompt_token_ids = await _prompt_token_ids(engine, prompt_of(request))
            engine_req = engine_request(
                request_id, request, prompt_token_ids, engine.limits.max_new_tokens
            )
            running.start(engine_req)
            observer = self._metrics.for_request(engine.model_id)
            await _stream(running, engine_req, context, observer, self._stream_interval)

    @_translate_errors
    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        self._state.check_accepting()
        engine = self._state.resolve(request.model)
        return pb.TokenizeResponse(token_ids=await _prompt_token_ids(engine, request.text))

    @_translate_errors
    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        if not self._state.abort(request.request_id):
            raise RequestRejected(
                grpc.StatusCode.NOT_FOUND, f"no running request has id {request.request_id!r}"
            )
        return pb.AbortResponse()


async def _stream(
    running: RunningRequest,
    request: Request,
    context: grpc.aio.ServicerContext,
    observer: RequestMetrics,
    interval: int,
) -> None:
    """Write the engine's outputs as deltas, then the final message: the first token at once,
    then a delta whenever `interval` tokens are held (or fewer, see _next_output), and what is
    held when the request finishes. The metrics see every output as it comes.

    Written with context.write rather than yield so that a client cancel or deadline always
    lands in this coroutine; leaving `track` then stops the engine request.
    """
    sent_tokens = received_tokens = 0  # received: sent plus held
    held: list[RequestOutput] = []
    while True:
        output = await _next_output(running, request, received_tokens)
        observer.observe(output)
        held.append(output)
        received_tokens += len(output.token_ids)
        if sent_tokens and not output.finished and received_tokens - sent_tokens < interval:
            continue
        output, held = _merged(held), []
        sent_tokens = received_tokens
        for message in responses(request.request_id, output):
            await context.write(message)
        if output.finished:
            return


async def _next_output(
    running: RunningRequest, request: Request, sent_tokens: int
) -> RequestOutput:
    """The next engine output, merged with those queued up behind it.

    Outputs queue up only when the client or the network is slower than the engine; sending
    them as one delta lets the stream catch up instead of falling further behind.
    """
    outputs: list[RequestOutput] = []
    item = await running.outputs.get()
    while True:
        if isinstance(item, Exception):
            raise item
        if not isinstance(item, RequestOutput):  # _ABORTED
            item = RequestOutput.aborted(
                request, sent_tokens + sum(len(o.token_ids) for o in outputs)
            )
        outputs.append(item)
        if item.finished or running.outputs.empty():
            break
        item = running.outputs.get_nowait()
    return _merged(outputs)


def _merged(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one."""
    if len(outputs) == 1:
        return outputs[0]
    return dataclasses.replace(
        outputs[-1],  # counts, finish reason and timestamps are the latest
        token_ids=[token for output in outputs for token in output.token_ids],
        text="".join(output.text for output in outputs),
        logprobs=[entry for output in outputs for entry in output.logprobs],
        fusion_weights=[alphas for output in outputs for alphas in output.fusion_weights],
    )


async def _prompt_token_ids(engine: ServedEngine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    # Off the event loop: a long prompt takes milliseconds to encode.
    return await asyncio.to_thread(engine.tokenizer.encode, prompt)


class RegistryServicer(pb_grpc.RegistryServicer):
    def __init__(self, state: ServingState, merged_adapter_dir: str) -> None:
        self._state = state
        self._merged_adapter_dir = merged_adapter_dir

    @_translate_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        engines = list(self._state.engines.items())
        return pb.ListModelsResponse(
            models=[await _model_info(name, engine) for name, engine in engines]
        )

    @_translate_errors
    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadAdapterResponse:
        self._state.check_accepting()
        adapter_id, path = adapter_to_load(request)
        engine = self._state.resolve(request.model)
        # Reads and validates the files on the engine's loader threads: streams keep going.
        info = await engine.load_adapter(adapter_id, path, pin=request.pin)
        log.info("loaded adapter %s on %s from %s", adapter_id, engine.model_id, path)
        return pb.LoadAdapterResponse(adapter=adapter_info(info))

    @_translate_errors
    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        self._state.check_accepting()
        engine = self._state.resolve(request.model)
        await engine.remove_adapter(request.adapter_id)
        log.info("unloaded adapter %s from %s", request.adapter_id, engine.model_id)
        return pb.UnloadAdapterResponse()

    @_translate_errors
    async def MergeAdapters(
        self, request: pb.MergeAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.MergeAdaptersResponse:
        self._state.check_accepting()
        adapter_id, sources, spec = merge_of(request)
        engine = self._state.resolve(request.model)
        # A fresh directory per merge: ids may be reused after an unload, files never are.
        out_dir = os.path.join(
            self._merged_adapter_dir, engine.model_id, f"{adapter_id}-{uuid.uuid4().hex[:12]}"
        )
        info = await engine.merge_adapters(adapter_id, sources, out_dir, spec)
        log.info("merged %s into adapter %s on %s", sources, adapter_id, engine.model_id)
        return pb.MergeAdaptersResponse(adapter=adapter_info(info))

    @_translate_errors
    async def LoadExpert(
        self, request: pb.LoadExpertRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadExpertResponse:
        self._state.check_accepting()
        expert_id, path, small_base = expert_to_load(request)
        engine = self._state.resolve(request.model)
        # Reads and validates the models on the engine's loader thread: streams keep going.
        info = await engine.load_expert(expert_id, path, small_base)
        log.info(
            "loaded expert %s on %s from %s (small base %s)",
            expert_id,
            engine.model_id,
            path,
            small_base,
        )
        return pb.LoadExpertResponse(expert=expert_info(info))

    @_translate_errors
    async def UnloadExpert(
        self, request: pb.UnloadExpertRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadExpertResponse:
        self._state.check_accepting()
        engine = self._state.resolve(request.model)
        await engine.remove_expert(request.expert_id)
        log.info("unloaded expert %s from %s", request.expert_id, engine.model_id)
        return pb.UnloadExpertResponse()


async def _model_info(model_id: str, engine: ServedEngine) -> pb.ModelInfo:
    config = engine.config
    # The model's plain SparsitySettings (rule "wina"/"teal", mode "top-k"/"threshold").
    settings = engine.sparsity
    sparsity = None
    if settings is not None:
        sparsity = pb.SparsityInfo(
            sparsity=settings.sparsity,
            rule=pb.SparsityRule.Value(f"SPARSITY_RULE_{settings.rule.upper()}"),
            mode=pb.SparsityMode.Value(f"SPARSITY_MODE_{settings.mode.upper().replace('-', '_')}"),
            calibration_file=settings.calibration_file,
        )
    return pb.ModelInfo(
        id=model_id,
        vocab_size=engine.tokenizer.vocab_size,
        max_prompt_tokens=engine.limits.max_prompt_tokens,
        max_new_tokens=engine.limits.max_new_tokens,
        adapters=[adapter_info(info) for info in await engine.adapter_infos()],
        experts=[expert_info(info) for info in await engine.expert_infos()],
        adapter_slots=config.adapter_slots,
        adapter_host_cache=config.adapter_host_cache,
        sparsity=sparsity,
        prefix_caching=config.prefix_caching,
    )
