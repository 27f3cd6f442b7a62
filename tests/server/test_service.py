"""Health, reflection, ListModels and the Prometheus metrics of the shared server."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tandem.v1 import tandem_pb2 as pb


def test_health_is_serving_overall_and_per_service(server) -> None:
    for service in ("", "tandem.v1.Generation", "tandem.v1.Registry"):
        assert server.health(service) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as error:
        server.health("tandem.v1.Nothing")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(server) -> None:
    database = ProtoReflectionDescriptorDatabase(server.channel)
    services = set(database.get_services())
    assert {"tandem.v1.Generation", "tandem.v1.Registry", "grpc.health.v1.Health"} <= services
    pool = DescriptorPool(database)
    generation = pool.FindServiceByName("tandem.v1.Generation")
    assert {m.name for m in generation.methods} == {"Generate", "Tokenize", "Abort"}
    registry = pool.FindServiceByName("tandem.v1.Registry")
    assert {m.name for m in registry.methods} == {
        "ListModels", "LoadAdapter", "UnloadAdapter", "MergeAdapters", "LoadExpert",
        "UnloadExpert",
    }  # fmt: skip


def test_list_models_lists_both_served_models(server) -> None:
    models = server.registry.ListModels(pb.ListModelsRequest()).models
    assert [model.id for model in models] == ["tiny-llama", "second"]
    for model in models:
        assert model.vocab_size == 32768
        assert model.max_prompt_tokens == 64
        assert model.max_new_tokens == 1500
        assert model.prefix_caching
    # Both answer, each on its own engine.
    for model in models:
        _, final = server.generate(
            model=model.id, text="Hi", stopping=pb.StoppingCriteria(max_new_tokens=2)
        )
        assert final.usage.completion_tokens >= 1


def test_metrics_count_a_finished_request(server) -> None:
    label = {"model_name": "second"}
    before = server.metrics()

    def increase(name: str, **extra: str) -> float:
        key = (name, frozenset({**label, **extra}.items()))
        return server.metrics().get(key, 0.0) - before.get(key, 0.0)

    deltas, final = server.generate(
        model="second",
        token_ids=[1, 22557, 2294],
        stopping=pb.StoppingCriteria(max_new_tokens=8, ignore_eos=True),
    )
    assert final.usage.completion_tokens == 8
    assert increase("tandem:prompt_tokens_total") == 3
    assert increase("tandem:generation_tokens_total") == 8
    assert increase("tandem:request_success_total", finished_reason="length") == 1
    for histogram in (
        "tandem:time_to_first_token_seconds",
        "tandem:e2e_request_latency_seconds",
        "tandem:request_queue_time_seconds",
    ):
        assert increase(f"{histogram}_count") == 1
        assert increase(f"{histogram}_sum") > 0
    # One latency per token after the first delta's (usually 7: deltas carry one token each).
    assert increase("tandem:inter_token_latency_seconds_count") == 8 - len(deltas[0].token_ids)
    assert server.metric("tandem:kv_cache_usage_perc", **label) == 0
    assert server.metric("tandem:num_requests_running", **label) == 0


def test_a_repeated_prompt_takes_its_cached_blocks(server, hf_model) -> None:
    """The second request with the same prompt reports its whole blocks (16 tokens each) as
    cached, counts them in the metrics, and streams the tokens transformers generates."""
    label = {"model_name": "second"}
    prompt = [1, *range(3100, 3140)]  # 41 tokens no other test sends
    expected = hf_model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=6, eos_token_id=None
    )[0, len(prompt) :].tolist()
    before = server.metrics()
    for cached in (0, 32):
        deltas, final = server.generate(
            model="second",
            token_ids=prompt,
            sampling=pb.SamplingParams(temperature=0.0),
            stopping=pb.StoppingCriteria(max_new_tokens=6, ignore_eos=True),
        )
        assert [t for d in deltas for t in d.token_ids] == expected
        assert final.usage.cached_prompt_tokens == cached
    for name, increase in (("queries", 2 * len(prompt)), ("hits", 32)):
        key = (f"tandem:prefix_cache_{name}_total", frozenset(label.items()))
        value = before.get(key, 0.0) + increase
        server.wait_for_metric(key[0], value, **label)


def test_no_prefix_caching_prefills_every_prompt(server_factory) -> None:
    server = server_factory("--no-prefix-caching")
    server.wait_until_serving()
    (model,) = server.registry.ListModels(pb.ListModelsRequest()).models
    assert not model.prefix_caching
    prompt = [1, *range(3200, 3240)]
    for _ in range(2):
        _, final = server.generate(
            model="tiny-llama",
            token_ids=prompt,
            stopping=pb.StoppingCriteria(max_new_tokens=2, ignore_eos=True),
        )
        assert final.usage.cached_prompt_tokens == 0
    server.wait_for_metric("tandem:prefix_cache_queries_total", 0.0, model_name="tiny-llama")
