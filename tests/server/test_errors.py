"""Bad requests get the right status code, a message naming the problem, and the server stays up."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tandem.v1 import tandem_pb2 as pb

OK_PROMPT = {"model": "tiny-llama", "token_ids": [1, 22557]}
INVALID = grpc.StatusCode.INVALID_ARGUMENT

BAD_REQUESTS = {
    "unknown model": ({"model": "missing", "text": "Hi"}, grpc.StatusCode.NOT_FOUND, "missing"),
    "no model with two served": ({"text": "Hi"}, INVALID, "model is required"),
    "neither text nor token_ids": ({"model": "tiny-llama"}, INVALID, "exactly one"),
    "both text and token_ids": (
        {"model": "tiny-llama", "text": "Hi", "token_ids": [1]},
        INVALID,
        "not both",
    ),
    "negative temperature": (
        {**OK_PROMPT, "sampling": pb.SamplingParams(temperature=-0.5)},
        INVALID,
        "temperature",
    ),
    "top_p zero": ({**OK_PROMPT, "sampling": pb.SamplingParams(top_p=0.0)}, INVALID, "top_p"),
    "top_p above one": ({**OK_PROMPT, "sampling": pb.SamplingParams(top_p=1.5)}, INVALID, "top_p"),
    "negative top_k": ({**OK_PROMPT, "sampling": pb.SamplingParams(top_k=-1)}, INVALID, "top_k"),
    "min_p above one": ({**OK_PROMPT, "sampling": pb.SamplingParams(min_p=2.0)}, INVALID, "min_p"),
    "zero repetition_penalty": (
        {**OK_PROMPT, "sampling": pb.SamplingParams(repetition_penalty=0.0)},
        INVALID,
        "repetition_penalty",
    ),
    "token id outside the vocabulary": (
        {"model": "tiny-llama", "token_ids": [1, 32768]},
        INVALID,
        "token ids",
    ),
    "prompt over the limit": ({"model": "tiny-llama", "token_ids": [1] * 65}, INVALID, "prompt"),
    "max_new_tokens over the limit": (
        {**OK_PROMPT, "stopping": pb.StoppingCriteria(max_new_tokens=1501)},
        INVALID,
        "max_new_tokens",
    ),
    "zero max_new_tokens": (
        {**OK_PROMPT, "stopping": pb.StoppingCriteria(max_new_tokens=0)},
        INVALID,
        "max_new_tokens",
    ),
    "empty stop string": (
        {**OK_PROMPT, "stopping": pb.StoppingCriteria(stop=[""])},
        INVALID,
        "stop",
    ),
    "top_logprobs without logprobs": (
        {**OK_PROMPT, "output": pb.OutputOptions(top_logprobs=2)},
        INVALID,
        "logprobs",
    ),
    "too many top_logprobs": (
        {**OK_PROMPT, "output": pb.OutputOptions(logprobs=True, top_logprobs=21)},
        INVALID,
        "top_logprobs",
    ),
    "unknown adapter": (
        {**OK_PROMPT, "adapter_id": "sql"},
        grpc.StatusCode.NOT_FOUND,
        "adapter 'sql'",
    ),
    "unknown expert": (
        {**OK_PROMPT, "experts": [pb.ExpertRef(expert_id="math")]},
        grpc.StatusCode.NOT_FOUND,
        "expert 'math'",
    ),
    "expert without id": (
        {**OK_PROMPT, "experts": [pb.ExpertRef(weight=0.5)]},
        INVALID,
        "expert_id",
    ),
    "constraint without kind": (
        {**OK_PROMPT, "constraint": pb.Constraint(method=pb.CONSTRAINT_METHOD_MASK)},
        INVALID,
        "constraint",
    ),
    "regex that does not compile": (
        {**OK_PROMPT, "constraint": pb.Constraint(regex="(unclosed")},
        INVALID,
        "constraint",
    ),
    "schema that is not JSON": (
        {**OK_PROMPT, "constraint": pb.Constraint(json_schema="{oops")},
        INVALID,
        "not valid JSON",
    ),
    "ignore_eos with a constraint": (
        {
            **OK_PROMPT,
            "constraint": pb.Constraint(regex="a+"),
            "stopping": pb.StoppingCriteria(ignore_eos=True),
        },
        INVALID,
        "ignore_eos",
    ),
}


@pytest.mark.parametrize("fields, code, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_generate_request(server, fields, code, message) -> None:
    with pytest.raises(grpc.RpcError) as error:
        server.generate(**fields)
    assert error.value.code() == code
    assert message in error.value.details()


def test_bad_tokenize_request(server) -> None:
    with pytest.raises(grpc.RpcError) as error:
        server.generation.Tokenize(pb.TokenizeRequest(model="missing", text="Hi"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


EXPERTS_UNKNOWN = {
    "LoadExpert": pb.LoadExpertRequest(
        expert_id="e", path="/nowhere", small_base="/nowhere-small", model="tiny-llama"
    ),
    "UnloadExpert": pb.UnloadExpertRequest(expert_id="e", model="tiny-llama"),
}


@pytest.mark.parametrize("method", EXPERTS_UNKNOWN)
def test_expert_rpcs_on_missing_things_are_not_found(server, method) -> None:
    with pytest.raises(grpc.RpcError) as error:
        getattr(server.registry, method)(EXPERTS_UNKNOWN[method])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_stays_serving_after_bad_requests(server) -> None:
    for fields, _, _ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            server.generate(**fields)
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    _, final = server.generate(**OK_PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=2))
    assert final.usage.prompt_tokens == 2
