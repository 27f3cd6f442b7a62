"""Start-up and shutdown of their own server processes: health during warm-up, SIGTERM drain."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from server.config import WARMUP_DELAY_ENV
from tandem.v1 import tandem_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "tandem.v1.Generation", "tandem.v1.Registry")


def _assert_unavailable(server) -> None:
    with pytest.raises(grpc.RpcError) as error:
        server.generate(text="Hi", stopping=pb.StoppingCriteria(max_new_tokens=2))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_lifecycle_from_warm_up_to_sigterm_drain(server_factory) -> None:
    """One process through its whole life (a server start is the slow part of these tests)."""
    server = server_factory(env={WARMUP_DELAY_ENV: "3"})
    # Warm-up: health answers, NOT_SERVING, and requests are refused.
    server.wait_for_log("delaying warm-up")
    assert [server.health(service) for service in SERVICES] == [NOT_SERVING] * 3
    _assert_unavailable(server)
    server.wait_until_serving()
    # The log says what runs the decode steps (the warm-up ran some).
    paths = r"decode steps (in one C call|layer by layer), linear (amx|avx512|avx2|torch)"
    assert re.search(rf"warmed up \S+ in [0-9.]+ s \({paths}\)", server.log()), server.log()
    assert [server.health(service) for service in SERVICES] == [SERVING] * 3

    # SIGTERM: a running stream finishes, new requests are refused, then the process exits 0.
    stream = server.generation.Generate(
        pb.GenerateRequest(
            text="Go", stopping=pb.StoppingCriteria(max_new_tokens=600, ignore_eos=True)
        ),
        timeout=120,
    )
    first = next(stream)
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log("received SIGTERM")
    assert server.health() == NOT_SERVING
    _assert_unavailable(server)
    rest = list(stream)
    assert rest[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(r.delta.token_ids) for r in [first, *rest[:-1]]) == 600
    assert server.process.wait(timeout=30) == 0
    assert "stopped" in server.log()


def test_drain_timeout_aborts_running_streams(server_factory) -> None:
    server = server_factory("--drain-timeout", "0.5", "--max-new-tokens", "2000")
    server.wait_until_serving()
    stream = server.generation.Generate(
        pb.GenerateRequest(
            text="Go", stopping=pb.StoppingCriteria(max_new_tokens=2000, ignore_eos=True)
        ),
        timeout=120,
    )
    next(stream)
    server.process.send_signal(signal.SIGTERM)
    final = list(stream)[-1].final
    assert final.finish_reason == pb.FINISH_REASON_ABORTED
    assert 0 < final.usage.completion_tokens < 2000
    assert server.process.wait(timeout=30) == 0


def _engine_pids(server_pid: int) -> list[int]:
    """The server's engine processes (one per model)."""
    children = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    command = "engine.engine_worker"
    return [pid for pid in children if command in Path(f"/proc/{pid}/cmdline").read_text()]


def test_a_dead_engine_fails_its_streams_and_stops_the_server(server_factory) -> None:
    """The engine runs in a process of its own; when it dies, its running stream ends with
    UNAVAILABLE, health turns NOT_SERVING and the server exits with an error (for its
    supervisor to restart it) instead of serving a model it no longer has."""
    server = server_factory("--max-new-tokens", "2000")
    server.wait_until_serving()
    (engine_pid,) = _engine_pids(server.process.pid)
    stream = server.generation.Generate(
        pb.GenerateRequest(
            text="Go", stopping=pb.StoppingCriteria(max_new_tokens=2000, ignore_eos=True)
        ),
        timeout=120,
    )
    next(stream)
    os.kill(engine_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "exited" in error.value.details()
    assert server.process.wait(timeout=30) == 1
    assert re.search(r"the engine of tiny-llama died; stopping the server", server.log())


def test_ctrl_c_drains_with_the_engine_still_stepping(server_factory) -> None:
    """A terminal's Ctrl-C signals the whole process group, the engine's process too: it keeps
    stepping (the server drains, then stops it), so the running stream finishes."""
    server = server_factory("--max-new-tokens", "2000", own_group=True)
    server.wait_until_serving()
    stream = server.generation.Generate(
        pb.GenerateRequest(
            text="Go", stopping=pb.StoppingCriteria(max_new_tokens=300, ignore_eos=True)
        ),
        timeout=120,
    )
    first = next(stream)
    os.killpg(server.process.pid, signal.SIGINT)
    server.wait_for_log("received SIGINT")
    rest = list(stream)
    assert rest[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(r.delta.token_ids) for r in [first, *rest[:-1]]) == 300
    assert server.process.wait(timeout=30) == 0


def test_engine_in_process_serves_the_same_tokens(server_factory, server) -> None:
    """--engine-in-process (the engine on a thread of the server's): the same greedy tokens as
    the default server's engine process, and no child process."""
    threaded = server_factory("--engine-in-process")
    threaded.wait_until_serving()
    assert _engine_pids(threaded.process.pid) == []
    request = dict(
        text="Tandem serves many adapters",
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=16, ignore_eos=True),
    )
    deltas, final = threaded.generate(**request)
    expected, _ = server.generate(model="tiny-llama", **request)
    assert [t for d in deltas for t in d.token_ids] == [t for d in expected for t in d.token_ids]
    assert final.usage.completion_tokens == 16
