"""The generated gRPC code is fresh, and server/ stays tensor-free outside server/engines.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import EngineOptions, parse_adapter_spec, parse_model_spec
from server.gen_proto import PROTO_ROOT, generate

GENERATED = ("tandem_pb2.py", "tandem_pb2_grpc.py", "tandem_pb2.pyi")


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / "tandem" / "v1" / name).read_bytes()
        committed = (PROTO_ROOT / "tandem" / "v1" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_client_and_servicer_modules_do_not_import_torch() -> None:
    code = (
        "import sys, server.cli, server.client, server.servicer, server.metrics, server.mapping; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


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
