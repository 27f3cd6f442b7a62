"""`tandem serve`: the grpc.aio server's life: bind, load and warm up, serve, drain, stop.

Health (grpc.health.v1) answers from the moment the port is bound: NOT_SERVING while models
load and warm up (both run in an executor so the event loop keeps answering), SERVING after,
NOT_SERVING again once SIGTERM or SIGINT starts the drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from engine.types import EngineError
from server.config import (
    AdapterSpec,
    ExpertSpec,
    ModelSpec,
    ServerConfig,
    default_merged_adapter_dir,
)
from server.engines import default_serving, load_engine
from server.metrics import Metrics
from server.servicer import GenerationServicer, RegistryServicer, ServingState
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from server.engines import ServedEngine

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(service.full_name for service in pb.DESCRIPTOR.services_by_name.values())
# Health answers for the whole server ("") and for each service.
_HEALTH_SERVICES = ("", *SERVICE_NAMES)
# After the drain (or its timeout and the aborts it sends), how long streams get to send
# their final message before the server cancels them.
_STOP_GRACE_S = 2.0


class StartupError(Exception):
    """A model that cannot be served (missing files, unsupported architecture): a user error."""


class EngineFailed(Exception):
    """An engine process died while serving: the server drains the others and exits with an
    error, for its supervisor to restart it."""


# How often the server checks that its engines' processes are alive.
_WATCH_INTERVAL_S = 0.25


async def serve(config: ServerConfig) -> None:
    state = ServingState()
    metrics = Metrics(lambda: state.engines)
    health = health_aio.HealthServicer()
    merged_dir = config.merged_adapter_dir or default_merged_adapter_dir()
    server = _build_server(state, metrics, health, merged_dir, config.stream_interval)
    port = server.add_insecure_port(_address(config.host, config.port))
    for service in _HEALTH_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    address = _address(config.host, port)
    log.info("listening on %s (health NOT_SERVING until the models are warmed up)", address)
    stop_requested = _stop_on_signals()
    try:
        if config.metrics_port is not None:
            metrics_port = metrics.serve_http(config.host, config.metrics_port)
            log.info("metrics on http://%s/metrics", _address(config.host, metrics_port))
        if await _start_models(state, config, stop_requested):
            # Ready first: a client that sees SERVING must not be refused as "loading".
            state.ready = True
            for service in _HEALTH_SERVICES:
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
            log.info("serving on %s", address)
            watcher = asyncio.ensure_future(_watch_engines(state, stop_requested))
            await stop_requested.wait()
            watcher.cancel()
        await _drain(state, health, config.drain_timeout_s)
        if state.failure:
            raise EngineFailed(state.failure)
    finally:
        await server.stop(_STOP_GRACE_S)
        for engine in state.engines.values():
            engine.shutdown()
        metrics.stop_http()
        log.info("stopped")


def _build_server(
    state: ServingState,
    metrics: Metrics,
    health: health_aio.HealthServicer,
    merged_adapter_dir: str,
    stream_interval: int,
) -> grpc.aio.Server:
    # Without this, Linux lets a second server bind the same port and silently share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    generation = GenerationServicer(state, metrics, stream_interval)
    pb_grpc.add_GenerationServicer_to_server(generation, server)
    pb_grpc.add_RegistryServicer_to_server(RegistryServicer(state, merged_adapter_dir), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _stop_on_signals() -> asyncio.Event:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _request_stop, stop_requested, sig)
    return stop_requested


def _request_stop(stop_requested: asyncio.Event, sig: signal.Signals) -> None:
    if not stop_requested.is_set():
        log.info("received %s: draining", sig.name)
    stop_requested.set()


async def _start_models(
    state: ServingState, config: ServerConfig, stop_requested: asyncio.Event
) -> bool:
    """Load and warm up every model; False when a stop signal came first."""
    startup = asyncio.ensure_future(_load_and_warm_up(state, config))
    stop_wait = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait((startup, stop_wait), return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    if startup.done():
        startup.result()  # a model that fails to load stops the server with its error
        return True
    startup.cancel()
    return False


async def _load_and_warm_up(state: ServingState, config: ServerConfig) -> None:
    loop = asyncio.get_running_loop()
    specs: tuple[ModelSpec, ...] = config.models
    adapters: tuple[AdapterSpec, ...] = config.adapters
    experts: tuple[ExpertSpec, ...] = config.experts
    if not specs:
        kit = await loop.run_in_executor(None, default_serving)
        specs = (kit.model,)
        adapters, experts = (*kit.adapters, *adapters), (*kit.experts, *experts)
    for spec in specs:
        log.info("loading model %s from %s", spec.model_id, spec.path)
        started = time.monotonic()
        try:
            engine = await loop.run_in_executor(None, load_engine, spec, config.engine)
        except (OSError, EngineError) as error:
            raise StartupError(
                f"cannot load model {spec.model_id} from {spec.path}: {error}"
            ) from None
        engine.start()
        state.engines[spec.model_id] = engine
        limits = engine.limits
        log.info(
            "loaded %s in %.1f s (max prompt %d tokens, max new %d tokens)",
            spec.model_id,
            time.monotonic() - started,
            limits.max_prompt_tokens,
            limits.max_new_tokens,
        )
    for adapter in adapters:
        await _load_adapter(state, adapter)
    for expert in experts:
        await _load_expert(state, expert)
    for model_id, engine in state.engines.items():
        started = time.monotonic()
        if config.warmup_delay_s:
            log.info("delaying warm-up of %s by %.1f s", model_id, config.warmup_delay_s)
            await asyncio.sleep(config.warmup_delay_s)
        kernels = await engine.warm_up()
        seconds = time.monotonic() - started
        log.info("warmed up %s in %.1f s (%s)", model_id, seconds, kernels)


async def _watch_engines(state: ServingState, stop_requested: asyncio.Event) -> None:
    """An engine whose process died (its requests already failed with UNAVAILABLE) stops the
    server: health turns NOT_SERVING as the drain starts."""
    while not stop_requested.is_set():
        await asyncio.sleep(_WATCH_INTERVAL_S)
        dead = [model_id for model_id, engine in state.engines.items() if not engine.alive]
        if dead:
            state.failure = f"the engine of {', '.join(dead)} died; stopping the server"
            log.error("%s", state.failure)
            stop_requested.set()


def _engine_for(state: ServingState, what: str, model: str, form: str) -> ServedEngine:
    """The engine that `what` (e.g. "adapter sql"), given as `form` on the command line, is
    loaded on: `model`, or the only one served when it is empty."""
    served = ", ".join(state.engines)
    if not model and len(state.engines) > 1:
        raise StartupError(f"{what}: name its model as {form} (served: {served})")
    engine = state.engines.get(model) if model else next(iter(state.engines.values()))
    if engine is None:
        raise StartupError(f"{what}: model {model!r} is not served")
    return engine


async def _load_adapter(state: ServingState, spec: AdapterSpec) -> None:
    engine = _engine_for(state, f"adapter {spec.adapter_id}", spec.model, "MODEL:ID=DIR")
    try:
        info = await engine.load_adapter(spec.adapter_id, spec.path)
    except EngineError as error:
        raise StartupError(
            f"cannot load adapter {spec.adapter_id} from {spec.path}: {error}"
        ) from None
    log.info(
        "loaded adapter %s on %s (rank %d, %s)",
        spec.adapter_id,
        engine.model_id,
        info.rank,
        info.state.value,
    )


async def _load_expert(state: ServingState, spec: ExpertSpec) -> None:
    engine = _engine_for(
        state, f"expert {spec.expert_id}", spec.model, "MODEL:ID=DIR@SMALL_BASE_DIR"
    )
    try:
        info = await engine.load_expert(spec.expert_id, spec.path, spec.small_base)
    except EngineError as error:
        raise StartupError(
            f"cannot load expert {spec.expert_id} from {spec.path} "
            f"(small base {spec.small_base}): {error}"
        ) from None
    log.info(
        "loaded expert %s on %s (%s, small base %s)",
        spec.expert_id,
        engine.model_id,
        "adapter" if info.is_adapter else "full model",
        spec.small_base,
    )


async def _drain(state: ServingState, health: health_aio.HealthServicer, timeout: float) -> None:
    """Refuse new requests and let running streams finish, aborting them after `timeout`."""
    state.draining = True
    await health.enter_graceful_shutdown()
    if state.num_running:
        log.info("waiting up to %.0f s for %d running requests", timeout, state.num_running)
    if not await state.wait_idle(timeout):
        log.warning("drain timeout: aborting %d running requests", state.num_running)
        state.abort_all()
        await state.wait_idle(_STOP_GRACE_S)
