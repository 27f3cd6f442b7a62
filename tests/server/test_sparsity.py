"""Sparse activation through the real CLI and gRPC: `tandem calibrate` writes a sidecar that
`tandem serve --sparsity ... --sparsity-file ...` loads per model, ListModels reports it, and a
bad sidecar stops the server at start with a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import SparsitySpec, parse_sparsity_specs, sparsity_for
from tandem.v1 import tandem_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parents[2]


def tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def sidecar(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sparsity") / "tiny.sparsity.safetensors"
    result = tandem(
        "calibrate", "--model", str(tiny_llama_dir), "--out", str(out), "--tokens", "512"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{out}\t512 tokens\tkit corpus")
    assert "[tandem calibrate] batch 1/1: 512 tokens" in result.stderr
    assert f"[tandem calibrate] wrote {out}" in result.stderr
    return out


def test_sparsity_flags_per_model_and_for_all() -> None:
    specs = parse_sparsity_specs(
        ["0.5", "b=0.25"], ["b=/x/b.safetensors"], ["teal"], ["b=threshold"]
    )
    assert sparsity_for(specs, "a") == SparsitySpec(sparsity=0.5, rule="teal")
    assert sparsity_for(specs, "b") == SparsitySpec(
        model="b", sparsity=0.25, rule="teal", mode="threshold", file="/x/b.safetensors"
    )
    only_b = parse_sparsity_specs(["b=0.4"], ["/x/b.safetensors"], [], [])
    assert sparsity_for(only_b, "a") is None
    assert sparsity_for(only_b, "b") == SparsitySpec("b", 0.4, file="/x/b.safetensors")
    assert parse_sparsity_specs([], [], [], []) == ()
    for bad, message in [
        ((["1.5"], [], [], []), r"\[0, 1\)"),
        ((["x"], [], [], []), "FRACTION"),
        ((["0.4"], [], ["dense"], []), "wina, teal"),
        ((["0.4"], [], [], ["threshold"]), "needs --sparsity-file"),
        (([], ["/x/f"], [], []), "need --sparsity"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_sparsity_specs(*bad)


def test_calibrated_sidecar_served_and_listed(
    server_factory, tiny_llama_dir: Path, sidecar: Path
) -> None:
    server = server_factory(
        "--model", f"second={tiny_llama_dir}", "--model", f"dense={tiny_llama_dir}",
        "--sparsity", "tiny-llama=0.5",
        "--sparsity", "second=0.4", "--sparsity-file", f"second={sidecar}",
        "--sparsity-rule", "second=teal", "--sparsity-mode", "second=threshold",
    )  # fmt: skip
    server.wait_until_serving()
    models = {m.id: m for m in server.registry.ListModels(pb.ListModelsRequest()).models}
    assert models["tiny-llama"].sparsity == pb.SparsityInfo(
        sparsity=0.5, rule=pb.SPARSITY_RULE_WINA, mode=pb.SPARSITY_MODE_TOP_K
    )
    assert models["second"].sparsity == pb.SparsityInfo(
        sparsity=0.4,
        rule=pb.SPARSITY_RULE_TEAL,
        mode=pb.SPARSITY_MODE_THRESHOLD,
        calibration_file=str(sidecar),
    )
    assert not models["dense"].HasField("sparsity")
    for model in models:
        _, final = server.generate(
            model=model,
            text="Hello",
            stopping=pb.StoppingCriteria(max_new_tokens=5, ignore_eos=True),
        )
        assert final.usage.completion_tokens == 5
    assert "model second: sparse activation, TEAL threshold 40%" in server.log()
    listed = tandem("models", "--address", server.address)
    assert listed.returncode == 0, listed.stderr
    lines = {line.split("\t")[0]: line for line in listed.stdout.splitlines()}
    assert lines["tiny-llama"].endswith("\tsparsity=0.5,wina,top-k")
    assert lines["second"].endswith("\tsparsity=0.4,teal,threshold")
    assert "sparsity" not in lines["dense"]


def test_serve_refuses_a_missing_sidecar(server_factory, tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    server = server_factory("--sparsity", "0.4", "--sparsity-file", str(missing))
    assert server.process.wait(timeout=120) == 1
    assert f"sparsity file {missing} not found" in server.log()


def test_serve_refuses_a_sidecar_of_another_shape(
    server_factory, tiny_small_dir: Path, tmp_path: Path
) -> None:
    from engine.sparsity import calibrate_dir

    other = tmp_path / "small.safetensors"
    calibrate_dir(str(tiny_small_dir), other, ["Hello there. " * 20], "test", tokens=64)
    server = server_factory("--sparsity", "0.4", "--sparsity-file", str(other))
    assert server.process.wait(timeout=120) == 1
    log = server.log()
    assert "cannot load model tiny-llama" in log
    assert "small.safetensors (calibrated on" in log
    assert "has 1 layers, the model 2" in log


def test_serve_refuses_bad_sparsity_flags(tiny_llama_dir: Path) -> None:
    cases = {
        ("--sparsity", "0.4", "--sparsity-mode", "threshold"): "needs --sparsity-file",
        ("--sparsity", "nope=0.4"): "name models not served: nope",
    }
    for flags, message in cases.items():
        result = tandem("serve", "--model", str(tiny_llama_dir), "--port", "0", *flags)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
