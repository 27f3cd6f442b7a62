"""The generated gRPC code is fresh, server/ stays tensor-free outside server/engines.py, and
the pure parts of the server (command-line specs, message mapping) do what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from engine.types import (
    Constraint,
    ConstraintKind,
    ConstraintMethod,
    ExpertError,
    ExpertInfo,
    FinishReason,
    FusionMode,
    FusionRouting,
    GrammarBackend,
    GrammarSyntax,
    Particle,
    RequestOutput,
)
from server import mapping
from server.config import (
    EngineOptions,
    ServerConfig,
    parse_adapter_spec,
    parse_expert_spec,
    parse_model_spec,
)
from server.gen_proto import PROTO_ROOT, generate
from tandem.v1 import tandem_pb2 as pb

GENERATED = ("tandem_pb2.py", "tandem_pb2_grpc.py", "tandem_pb2.pyi")


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / "tandem" / "v1" / name).read_bytes()
        committed = (PROTO_ROOT / "tandem" / "v1" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_server_modules_do_not_import_torch() -> None:
    """The server's process never loads torch: its engines run in processes of their own."""
    code = (
        "import sys, server.cli, server.client, server.servicer, server.metrics, server.mapping, "
        "server.app, server.engines, engine.engine_process; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_forked_children_survive_busy_grpc_channels() -> None:
    """The harness starts servers with a preexec_fn (a fork, not a vfork) while other tests'
    channels are live. With gRPC's fork support on, about 2% of such children aborted before
    exec ("epoll_wait error: Bad file descriptor", grpc/grpc#43055); tests/conftest.py turns
    it off. 300 forks under steady RPC traffic must all run their program."""
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()

    def traffic() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                stub.Check(health_pb2.HealthCheckRequest())

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        codes = [
            subprocess.run(["true"], preexec_fn=lambda: None, check=False, timeout=30).returncode
            for _ in range(300)
        ]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop(None)
    assert codes == [0] * 300, sorted(set(codes))


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_serve_makes_openmp_waits_passive_unless_told(given: str | None, expected: str) -> None:
    """Before torch loads OpenMP (after, the setting could no longer take effect), and never
    over the user's own choice."""
    code = (
        "import os, sys, server.cli; server.cli._prefer_passive_openmp_waits(); "
        "import torch; print(os.environ['OMP_WAIT_POLICY'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(
    "value, model_id, path",
    [
        ("/models/llama-3-8b", "llama-3-8b", "/models/llama-3-8b"),
        ("/models/llama-3-8b/", "llama-3-8b", "/models/llama-3-8b/"),
        ("big=/models/llama-3-8b", "big", "/models/llama-3-8b"),
        # An `=` inside a path is part of the path, not a name.
        ("/models/lr=1e-4", "lr=1e-4", "/models/lr=1e-4"),
    ],
)
def test_model_spec(value: str, model_id: str, path: str) -> None:
    spec = parse_model_spec(value)
    assert (spec.model_id, spec.path) == (model_id, path)


@pytest.mark.parametrize(
    "value, spec",
    [
        ("sql=/adapters/sql", ("", "sql", "/adapters/sql")),
        ("big:sql=/adapters/sql", ("big", "sql", "/adapters/sql")),
        ("lora-add=/kit/lora-add", ("", "lora-add", "/kit/lora-add")),
        ("sql=/adapters/lr=1e-4", ("", "sql", "/adapters/lr=1e-4")),
    ],
)
def test_adapter_spec(value: str, spec: tuple[str, str, str]) -> None:
    parsed = parse_adapter_spec(value)
    assert (parsed.model, parsed.adapter_id, parsed.path) == spec


@pytest.mark.parametrize("value", ["/adapters/sql", "=/adapters/sql", "sql=", "big:=/x", "a/b=/x"])
def test_bad_adapter_spec(value: str) -> None:
    with pytest.raises(ValueError, match="MODEL:"):
        parse_adapter_spec(value)


def test_expert_kv_pool_size() -> None:
    from server.engines import engine_config

    assert engine_config(EngineOptions()).expert_kv_cache_bytes == 256 << 20
    assert engine_config(EngineOptions(expert_kv_cache_mb=3)).expert_kv_cache_bytes == 3 << 20


def test_batch_wait() -> None:
    from server.engines import engine_config

    assert engine_config(EngineOptions()).batch_wait_s == 0.003
    assert engine_config(EngineOptions(batch_wait_ms=0)).batch_wait_s == 0.0
    assert engine_config(EngineOptions(batch_wait_ms=12.5)).batch_wait_s == 0.0125
    with pytest.raises(ValueError, match="--batch-wait-ms"):
        EngineOptions(batch_wait_ms=-1)


def test_adapter_capacities() -> None:
    from server.engines import engine_config

    assert engine_config(EngineOptions()).adapter_slots == 16
    assert engine_config(EngineOptions()).adapter_host_cache == 128
    # A host cache smaller than the default slots: as many slots as it holds.
    assert engine_config(EngineOptions(adapter_host_cache=4)).adapter_slots == 4
    with pytest.raises(ValueError, match="--adapter-host-cache"):
        EngineOptions(adapter_slots=8, adapter_host_cache=4)
    with pytest.raises(ValueError, match="--adapter-slots"):
        EngineOptions(adapter_slots=0)


def test_stream_interval_is_at_least_one() -> None:
    assert ServerConfig(models=()).stream_interval == 1
    assert ServerConfig(models=(), stream_interval=8).stream_interval == 8
    with pytest.raises(ValueError, match="--stream-interval must be at least 1, got 0"):
        ServerConfig(models=(), stream_interval=0)


# ---- experts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, spec",
    [
        ("math=/experts/math@/models/small", ("", "math", "/experts/math", "/models/small")),
        ("big:math=/e/math@/m/small", ("big", "math", "/e/math", "/m/small")),
        # The last `@` separates the directories: an `@` in the expert's path stays in it.
        ("math=/e/v@2@/m/small", ("", "math", "/e/v@2", "/m/small")),
        ("math=/e/lr=1e-4@/m/small", ("", "math", "/e/lr=1e-4", "/m/small")),
    ],
)
def test_expert_spec(value: str, spec: tuple[str, str, str, str]) -> None:
    parsed = parse_expert_spec(value)
    assert (parsed.model, parsed.expert_id, parsed.path, parsed.small_base) == spec


@pytest.mark.parametrize(
    "value", ["math=/e/math", "/e/math@/m/small", "=/e@/m", "math=@/m", "math=/e@", "a/b=/e@/m"]
)
def test_bad_expert_spec(value: str) -> None:
    with pytest.raises(ValueError, match="SMALL_BASE_DIR"):
        parse_expert_spec(value)


def _generate_request(**fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=[1, 2], **fields)


def test_engine_request_carries_experts_and_fusion_mode() -> None:
    refs = [pb.ExpertRef(expert_id="math", weight=0.5), pb.ExpertRef(expert_id="code")]
    static = mapping.engine_request(
        "r",
        _generate_request(
            experts=refs,
            fusion=pb.FusionOptions(mode=pb.FUSION_MODE_STATIC),
            output=pb.OutputOptions(fusion_weights=True),
        ),
        [1, 2],
        100,
    )
    # An unset weight stays None: the engine's default (1.0) applies.
    assert static.experts == (("math", 0.5), ("code", None))
    assert static.fusion_mode == FusionMode.STATIC
    assert static.output.fusion_weights
    for mode in (pb.FUSION_MODE_UNSPECIFIED, pb.FUSION_MODE_DYNAMIC):
        request = _generate_request(experts=refs, fusion=pb.FusionOptions(mode=mode))
        dynamic = mapping.engine_request("r", request, [1, 2], 100)
        assert dynamic.fusion_mode == FusionMode.DYNAMIC
        assert not dynamic.output.fusion_weights
    plain = mapping.engine_request("r", _generate_request(), [1, 2], 100)
    assert plain.experts == ()
    unknown = _generate_request(experts=refs, fusion=pb.FusionOptions(mode=7))
    with pytest.raises(mapping.RequestRejected, match="fusion mode 7") as rejected:
        mapping.engine_request("r", unknown, [1, 2], 100)
    assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_engine_request_carries_fusion_routing() -> None:
    refs = [pb.ExpertRef(expert_id="math"), pb.ExpertRef(expert_id="code")]
    expected = {
        pb.FUSION_ROUTING_UNSPECIFIED: FusionRouting.LIKELIHOOD,
        pb.FUSION_ROUTING_LIKELIHOOD: FusionRouting.LIKELIHOOD,
        pb.FUSION_ROUTING_KL: FusionRouting.KL,
    }
    for routing, want in expected.items():
        request = _generate_request(experts=refs, fusion=pb.FusionOptions(routing=routing))
        assert mapping.engine_request("r", request, [1, 2], 100).fusion_routing == want
    unknown = _generate_request(experts=refs, fusion=pb.FusionOptions(routing=9))
    with pytest.raises(mapping.RequestRejected, match="fusion routing 9") as rejected:
        mapping.engine_request("r", unknown, [1, 2], 100)
    assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_expert_ref_without_id_is_invalid() -> None:
    request = _generate_request(experts=[pb.ExpertRef(expert_id="math"), pb.ExpertRef(weight=1)])
    with pytest.raises(mapping.RequestRejected, match="expert_id") as rejected:
        mapping.engine_request("r", request, [1, 2], 100)
    assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_constraint_maps_every_kind_and_option() -> None:
    choice = mapping.engine_request(
        "r",
        _generate_request(
            constraint=pb.Constraint(
                choice=pb.Choices(choices=["a", "b"]),
                method=pb.CONSTRAINT_METHOD_SMC,
                particles=7,
                ess_threshold=0.25,
                engine=pb.GRAMMAR_ENGINE_LLGUIDANCE,
            )
        ),
        [1, 2],
        100,
    ).constraint
    assert choice == Constraint(
        ConstraintKind.CHOICE,
        choices=("a", "b"),
        method=ConstraintMethod.SMC,
        particles=7,
        ess_threshold=0.25,
        backend=GrammarBackend.LLGUIDANCE,
    )
    lark = mapping.engine_request(
        "r",
        _generate_request(
            constraint=pb.Constraint(grammar="start: x", grammar_syntax=pb.GRAMMAR_SYNTAX_LARK)
        ),
        [1, 2],
        100,
    ).constraint
    assert (lark.kind, lark.source, lark.syntax, lark.backend, lark.method) == (
        ConstraintKind.GRAMMAR,
        "start: x",
        GrammarSyntax.LARK,
        None,
        ConstraintMethod.AWRS,
    )
    assert mapping.engine_request("r", _generate_request(), [1, 2], 100).constraint is None


def test_constraint_without_kind_or_with_unknown_enum_is_invalid() -> None:
    for constraint in (pb.Constraint(), pb.Constraint(regex="a", method=99)):
        with pytest.raises(mapping.RequestRejected) as rejected:
            mapping.engine_request("r", _generate_request(constraint=constraint), [1, 2], 100)
        assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_final_reports_constraint_usage_and_particles() -> None:
    output = RequestOutput(
        request_id="r",
        token_ids=[],
        text="",
        finish_reason=FinishReason.EOS,
        constraint_checks=12,
        constraint_mask_steps=1,
        log_weight=-0.5,
        particles=[Particle((5, 6), "ab", -0.5)],
    )
    final = mapping.responses("r", output)[-1].final
    assert (final.usage.constraint_checks, final.usage.constraint_mask_steps) == (12, 1)
    assert final.log_weight == -0.5
    assert [(list(p.token_ids), p.text, p.log_weight) for p in final.particles] == [
        ([5, 6], "ab", -0.5)
    ]
    plain = mapping.responses("r", RequestOutput("r", [], "", finish_reason=FinishReason.EOS))
    assert not plain[-1].final.HasField("log_weight")


def test_fusion_weights_go_into_the_delta_one_per_token() -> None:
    output = RequestOutput(
        request_id="r",
        token_ids=[5, 6],
        text="ab",
        fusion_weights=[(0.0, 1.5), (0.25, 0.0)],
        finish_reason=FinishReason.LENGTH,
        prompt_tokens=2,
        completion_tokens=2,
    )
    delta, final = mapping.responses("r", output)
    assert [list(w.alphas) for w in delta.delta.fusion] == [[0.0, 1.5], [0.25, 0.0]]
    assert final.final.finish_reason == pb.FINISH_REASON_LENGTH
    (plain,) = mapping.responses("r", RequestOutput(request_id="r", token_ids=[5], text="a"))
    assert not plain.delta.fusion


def test_queued_outputs_keep_their_fusion_weights() -> None:
    from server.servicer import _merged

    first = RequestOutput(request_id="r", token_ids=[5], text="a", fusion_weights=[(1.0,)])
    second = RequestOutput(request_id="r", token_ids=[6, 7], text="bc", fusion_weights=[(0.5,)] * 2)
    merged = _merged([first, second])
    assert merged.token_ids == [5, 6, 7]
    assert merged.fusion_weights == [(1.0,), (0.5,), (0.5,)]


def test_expert_to_load_names_the_missing_field() -> None:
    full = {"expert_id": "math", "path": "/e/math", "small_base": "/m/small"}
    assert mapping.expert_to_load(pb.LoadExpertRequest(**full)) == ("math", "/e/math", "/m/small")
    for name in full:
        request = pb.LoadExpertRequest(**{**full, name: ""})
        with pytest.raises(mapping.RequestRejected, match=f"{name} is required") as rejected:
            mapping.expert_to_load(request)
        assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_expert_info() -> None:
    info = ExpertInfo("math", "/e/math", "/m/small", is_adapter=True, num_requests=3)
    message = mapping.expert_info(info)
    assert (message.expert_id, message.path, message.small_base) == ("math", "/e/math", "/m/small")
    assert message.is_adapter and message.num_requests == 3


def test_expert_status_codes() -> None:
    assert (
        mapping.status_for(ExpertError("vocabulary differs")) == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert mapping.status_for(ExpertError("no dir", kind="not_found")) == grpc.StatusCode.NOT_FOUND


def test_cli_expert_refs() -> None:
    from server.cli import _expert_refs

    refs = _expert_refs(["math=0.5", "code"])
    assert [(r.expert_id, r.HasField("weight")) for r in refs] == [("math", True), ("code", False)]
    assert refs[0].weight == 0.5
    with pytest.raises(ValueError, match="ID=WEIGHT"):
        _expert_refs(["math=lots"])


def test_kit_serving_registers_adapters_and_experts(tmp_path: Path) -> None:
    from server.engines import kit_serving

    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"name": "add"}]}))
    for name in ("base-large", "base-small", "lora-add", "expert-add", "expert-sub", "ft-add"):
        (tmp_path / name).mkdir()
    (tmp_path / "expert-notes.txt").write_text("a file, not an expert directory")
    serving = kit_serving(tmp_path)
    assert serving.model.model_id == "base-large"
    assert serving.model.path == str(tmp_path / "base-large")
    assert [a.adapter_id for a in serving.adapters] == ["lora-add"]
    assert [(e.expert_id, e.path, e.small_base, e.model) for e in serving.experts] == [
        (name, str(tmp_path / name), str(tmp_path / "base-small"), "base-large")
        for name in ("expert-add", "expert-sub")
    ]


def test_kit_without_experts_needs_no_small_base(tmp_path: Path) -> None:
    from server.engines import kit_serving

    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": []}))
    (tmp_path / "base-large").mkdir()
    assert kit_serving(tmp_path).experts == ()
