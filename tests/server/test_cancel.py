"""Ending streams early: client cancel, deadline, Abort by id, and a full queue.

Each test ends with the KV cache back at zero blocks, read from the metrics endpoint.
"""

from __future__ import annotations

import time

import grpc
import pytest

from tandem.v1 import tandem_pb2 as pb

LONG = pb.StoppingCriteria(max_new_tokens=1500, ignore_eos=True)


def _long_request(**fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="tiny-llama", text="Count with me:", stopping=LONG, **fields)


def _assert_cache_freed(server) -> None:
    server.wait_for_metric("tandem:kv_cache_usage_perc", 0.0, model_name="tiny-llama")
    server.wait_for_metric("tandem:num_requests_running", 0.0, model_name="tiny-llama")
    server.wait_for_metric("tandem:num_requests_waiting", 0.0, model_name="tiny-llama")


def _assert_still_serving(server) -> None:
    _, final = server.generate(
        model="tiny-llama", text="Hi", stopping=pb.StoppingCriteria(max_new_tokens=3)
    )
    assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)


def test_client_cancel_frees_kv_blocks(server) -> None:
    call = server.generation.Generate(_long_request(), timeout=60)
    stream = iter(call)
    for _ in range(3):
        assert next(stream).HasField("delta")
    assert server.metric("tandem:kv_cache_usage_perc", model_name="tiny-llama") > 0
    call.cancel()
    _assert_cache_freed(server)
    _assert_still_serving(server)


def test_deadline_exceeded_frees_kv_blocks(server) -> None:
    # A third of what the whole stream takes on this machine: the deadline lands mid-stream
    # however fast the tiny model decodes (a fixed second did not, once it took under one).
    started = time.monotonic()
    server.generate(model="tiny-llama", text="Count with me:", stopping=LONG)
    deadline = (time.monotonic() - started) / 3
    received = 0
    with pytest.raises(grpc.RpcError) as error:
        for _ in server.generation.Generate(_long_request(), timeout=deadline):
            received += 1
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < received < 1500
    _assert_cache_freed(server)
    _assert_still_serving(server)


def test_abort_by_request_id(server) -> None:
    stream = iter(server.generation.Generate(_long_request(request_id="abort-me"), timeout=60))
    first = next(stream)
    assert first.request_id == "abort-me"
    # Ids are unique among running requests, across models.
    with pytest.raises(grpc.RpcError) as duplicate:
        server.generate(model="second", text="Hi", request_id="abort-me")
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
    server.generation.Abort(pb.AbortRequest(request_id="abort-me"))
    rest = list(stream)
    final = rest[-1].final
    assert final.finish_reason == pb.FINISH_REASON_ABORTED
    streamed = [first, *rest[:-1]]
    assert final.usage.completion_tokens == sum(len(r.delta.token_ids) for r in streamed) < 1500
    _assert_cache_freed(server)
    # The id is free again, and an unknown id is NOT_FOUND.
    _, again = server.generate(
        model="tiny-llama",
        text="Hi",
        request_id="abort-me",
        stopping=pb.StoppingCriteria(max_new_tokens=2),
    )
    assert again.usage.completion_tokens <= 2
    with pytest.raises(grpc.RpcError) as unknown:
        server.generation.Abort(pb.AbortRequest(request_id="abort-me"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_makes_a_request_id_when_none_is_given(server) -> None:
    responses = list(
        server.generation.Generate(
            pb.GenerateRequest(
                text="Hi", model="second", stopping=pb.StoppingCriteria(max_new_tokens=2)
            ),
            timeout=30,
        )
    )
    ids = {response.request_id for response in responses}
    assert len(ids) == 1 and ids != {""}


def test_full_queue_is_resource_exhausted(server) -> None:
    # The shared server runs 2 sequences and queues 1 more per model; which of the 3 calls
    # waits is up to the order they arrive in.
    calls = [server.generation.Generate(_long_request(), timeout=60) for _ in range(3)]
    try:
        server.wait_for_metric("tandem:num_requests_running", 2.0, model_name="tiny-llama")
        server.wait_for_metric("tandem:num_requests_waiting", 1.0, model_name="tiny-llama")
        with pytest.raises(grpc.RpcError) as error:
            server.generate(model="tiny-llama", text="Hi")
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A request that can never run gets its own code, not one that invites a retry.
        bad_requests = {
            grpc.StatusCode.NOT_FOUND: {"adapter_id": "sql"},
            grpc.StatusCode.INVALID_ARGUMENT: {"sampling": pb.SamplingParams(temperature=-1)},
        }
        for code, fields in bad_requests.items():
            with pytest.raises(grpc.RpcError) as error:
                server.generate(model="tiny-llama", text="Hi", **fields)
            assert error.value.code() == code
    finally:
        for call in calls:
            call.cancel()
    _assert_cache_freed(server)
    _assert_still_serving(server)
