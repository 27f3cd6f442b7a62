"""A tiny random Llama on disk and real `tandem serve` processes on free ports.

Test modules cannot import each other (importlib mode), so the helpers are methods of the
objects these fixtures return.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest
import torch
import transformers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
# Limits of the shared server, chosen so that tests can reach them quickly. Tests spell these
# numbers out (they cannot import this module): change them together.
MAX_NEW_TOKENS = 1500
MAX_PROMPT_TOKENS = 64
MAX_NUM_SEQS = 2
MAX_QUEUE = 1
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
# Loaded before any fork: the child between fork and exec must not load libraries.
_LIBC = ctypes.CDLL(None, use_errno=True)


def save_random_llama(
    out: Path, tokenizer_dir: str, seed: int = 0, **config: int
) -> transformers.LlamaForCausalLM:
    """A random LlamaForCausalLM (`config` over vocab 32768, hidden 64, 2 layers) saved with
    the tokenizer files of `tokenizer_dir`; the same seed and config give the same weights."""
    config = {
        "vocab_size": 32768,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **config,
    }
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **config, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2
        )
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # transformers' small init makes logits nearly flat, and then greedy decoding is
            # decided by rounding; larger weights keep the argmax robust across implementations.
            if "norm" not in name:
                param.copy_(0.15 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out, safe_serialization=True)
    for name in os.listdir(tokenizer_dir):
        source = Path(tokenizer_dir) / name
        if source.is_file():
            shutil.copyfile(source, out / name)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(
    tmp_path_factory: pytest.TempPathFactory, sentencepiece_tokenizer_dir: str
) -> Path:
    """A random LlamaForCausalLM (vocab 32768, hidden 64, 2 layers) with Mistral's tokenizer."""
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_random_llama(out, sentencepiece_tokenizer_dir)
    return out


# The shape of the small models that steer tiny-llama as experts and their small base.
SMALL_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


@pytest.fixture(scope="session")
def tiny_small_dir(
    tmp_path_factory: pytest.TempPathFactory, sentencepiece_tokenizer_dir: str
) -> Path:
    """A small base for experts of tiny-llama: same tokenizer, hidden 32, 1 layer."""
    out = tmp_path_factory.mktemp("models") / "tiny-small"
    save_random_llama(out, sentencepiece_tokenizer_dir, seed=1, **SMALL_SHAPE)
    return out


@pytest.fixture(scope="session")
def tiny_expert_dir(
    tmp_path_factory: pytest.TempPathFactory, sentencepiece_tokenizer_dir: str
) -> Path:
    """A full-model expert on tiny-small: its shape, other random weights."""
    out = tmp_path_factory.mktemp("models") / "tiny-expert"
    save_random_llama(out, sentencepiece_tokenizer_dir, seed=2, **SMALL_SHAPE)
    return out


@pytest.fixture(scope="session")
def tiny_expert_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_small_dir: Path) -> Path:
    """An expert that is a PEFT LoRA adapter on tiny-small (random A and B, so it matters)."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("models") / "tiny-expert-lora"
    small = transformers.AutoModelForCausalLM.from_pretrained(tiny_small_dir, dtype=torch.float32)
    torch.manual_seed(3)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        init_lora_weights=False,
    )
    get_peft_model(small, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tekken_small_dir(tmp_path_factory: pytest.TempPathFactory, tekken_tokenizer_dir: str) -> Path:
    """A model of the small shape with another tokenizer (Tekken, vocab 131072): no expert or
    small base of tiny-llama."""
    out = tmp_path_factory.mktemp("models") / "tekken-small"
    save_random_llama(out, tekken_tokenizer_dir, seed=4, vocab_size=131072, **SMALL_SHAPE)
    return out


@dataclass
class ServerProcess:
    process: subprocess.Popen
    log_path: Path
    address: str = ""
    metrics_url: str = ""
    _channel: grpc.Channel | None = field(default=None, repr=False)

    # ---- process and log ---------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = STARTUP_TIMEOUT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            if self.process.poll() is not None:
                raise AssertionError(f"server exited ({self.process.returncode}):\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the server log after {timeout} s:\n{self.log()}")

    def stop(self) -> int:
        if self._channel is not None:
            self._channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    # ---- grpc --------------------------------------------------------------------------------

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    @property
    def generation(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(self.channel)

    @property
    def registry(self) -> pb_grpc.RegistryStub:
        return pb_grpc.RegistryStub(self.channel)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_until_serving(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.health() != health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"server not SERVING after {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def generate(self, timeout: float = 60, **fields: object) -> tuple[list[pb.Delta], pb.Final]:
        """Run one Generate call to completion: its deltas and its final message."""
        deltas, finals = [], []
        for response in self.generation.Generate(pb.GenerateRequest(**fields), timeout=timeout):
            (deltas if response.HasField("delta") else finals).append(
                getattr(response, response.WhichOneof("kind"))
            )
        assert len(finals) == 1, finals
        return deltas, finals[0]

    # ---- metrics -----------------------------------------------------------------------------

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics, keyed by (sample name, labels)."""
        with urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def wait_for_metric(self, name: str, value: float, timeout: float = 10, **labels: str) -> None:
        deadline = time.monotonic() + timeout
        while (current := self.metric(name, **labels)) != value:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} is {current}, expected {value}")
            time.sleep(0.05)


def _terminate_with_parent() -> None:
    """SIGTERM the server if pytest dies, so no server outlives a killed test run."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _own_group_terminating_with_parent() -> None:
    """As _terminate_with_parent, in a process group of its own (as a terminal's job is)."""
    os.setpgid(0, 0)
    _terminate_with_parent()


def start_server(
    log_dir: Path, args: list[str], env: dict[str, str] | None = None, own_group: bool = False
) -> ServerProcess:
    """Start `tandem serve` on free ports and wait until it listens (not until it is ready);
    `own_group`: in a process group of its own, which a test can signal as a terminal would."""
    log_path = log_dir / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--port",
                "0",
                "--metrics-port",
                "0",
                *args,
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_own_group_terminating_with_parent if own_group else _terminate_with_parent,
        )
    server = ServerProcess(process=process, log_path=log_path)
    try:
        server.address = server.wait_for_log(r"listening on (\S+)").group(1)
        server.metrics_url = server.wait_for_log(r"metrics on (\S+)").group(1)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator:
    """server_factory(*extra_args, env=..., tiny_model=True, own_group=False) -> a ServerProcess
    of the tiny model (without it: only what extra_args and env say); all are stopped at the end
    of the session."""
    started: list[ServerProcess] = []

    def start(
        *extra_args: str,
        env: dict[str, str] | None = None,
        tiny_model: bool = True,
        own_group: bool = False,
    ) -> ServerProcess:
        model_args = ["--model", str(tiny_llama_dir)] if tiny_model else []
        server = start_server(
            tmp_path_factory.mktemp("server"),
            [*model_args, "--kv-cache-mb", "4", *extra_args],
            env,
            own_group,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(server_factory, tiny_llama_dir: Path) -> ServerProcess:
    """The shared server: the tiny model as `tiny-llama` and again as `second`, ready."""
    shared = server_factory(
        "--model",
        f"second={tiny_llama_dir}",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--max-prompt-tokens",
        str(MAX_PROMPT_TOKENS),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-queue",
        str(MAX_QUEUE),
    )
    shared.wait_until_serving()
    return shared


@pytest.fixture(scope="session")
def hf_model(tiny_llama_dir: Path) -> transformers.PreTrainedModel:
    """The tiny model as transformers runs it: the reference for tokens and logprobs."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_llama_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
