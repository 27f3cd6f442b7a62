"""LoRA adapters over real gRPC: tokens against PEFT, mixed batches, every refusal's status code,
the ON_DISK / HOST / DEVICE states under LRU, hot loading and unloading under load, and the
kit's adapters served by default.

The oracle is PEFT in this process: random LoRA weights on the tiny model, saved as PEFT
directories that the server loads; its greedy tokens are what the server must stream.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
import transformers
from grpc_health.v1 import health_pb2
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from tandem.v1 import tandem_pb2 as pb

NEW_TOKENS = 16
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig options; the lru* ones differ in ranks and targets, so that taking over a
# slot sometimes fits in place and sometimes restacks.
ADAPTERS: dict[str, dict] = {
    "attn": {"r": 8, "lora_alpha": 16, "target_modules": ATTENTION},
    "mlp": {"r": 4, "lora_alpha": 8, "target_modules": MLP},
    "all": {"r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": "all-linear"},
    "lru0": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "lru1": {"r": 4, "lora_alpha": 4, "target_modules": "all-linear"},
    "lru2": {"r": 3, "lora_alpha": 6, "target_modules": MLP},
    "lru3": {"r": 2, "lora_alpha": 2, "target_modules": "all-linear"},
    "lru4": {"r": 6, "lora_alpha": 3, "target_modules": ["o_proj", "down_proj"]},
    "lru5": {"r": 1, "lora_alpha": 2, "target_modules": ["k_proj", "up_proj"]},
}
ON_DISK, HOST, DEVICE = pb.ADAPTER_STATE_ON_DISK, pb.ADAPTER_STATE_HOST, pb.ADAPTER_STATE_DEVICE
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def prompt(seed: int, length: int = 7) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, 32000, (length - 1,), generator=generator).tolist()]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models run ten times faster on one thread than on two on this loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Library:
    """PEFT adapters of the tiny model on disk, and their greedy tokens (computed once)."""

    def __init__(self, base_dir: Path, out_dir: Path, hf_base: transformers.PreTrainedModel):
        self.base_dir = base_dir
        self.out_dir = out_dir
        self._models: dict[str | None, torch.nn.Module] = {None: hf_base}
        self._greedy: dict[tuple, list[int]] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> str:
        with self._lock:
            self._build(name)
        return str(self.out_dir / name)

    def greedy(self, name: str | None, prompt_ids: list[int], new_tokens: int = NEW_TOKENS):
        key = (name, tuple(prompt_ids), new_tokens)
        with self._lock, one_torch_thread():
            if key not in self._greedy:
                model = self._models[None] if name is None else self._build(name)
                with torch.no_grad():
                    out = model.generate(
                        torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=new_tokens
                    )
                self._greedy[key] = out[0, len(prompt_ids) :].tolist()
            return self._greedy[key]

    def _build(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            # A fresh base each: get_peft_model changes the model it wraps.
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                self.base_dir, dtype=torch.float32
            )
            model = get_peft_model(hf, LoraConfig(**ADAPTERS[name])).eval()
            generator = torch.Generator().manual_seed(len(self._models))
            with torch.no_grad():
                # PEFT zeroes lora_B; random factors at scales that change the tokens.
                for param_name, param in model.named_parameters():
                    if "lora_A" in param_name:
                        scale = param.shape[1] ** -0.5
                        param.copy_(torch.randn(param.shape, generator=generator) * scale)
                    elif "lora_B" in param_name:
                        param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            model.save_pretrained(self.out_dir / name)
            self._models[name] = model
        return self._models[name]


@pytest.fixture(scope="module")
def library(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory, hf_model) -> Library:
    return Library(tiny_llama_dir, tmp_path_factory.mktemp("adapters"), hf_model)


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merged")


@pytest.fixture(scope="module")
def adapter_server(server_factory, library: Library, merged_dir: Path):
    """The tiny model with `attn` and `mlp` loaded at start; default slots and cache."""
    server = server_factory(
        "--adapter",
        f"attn={library.path('attn')}",
        "--adapter",
        f"tiny-llama:mlp={library.path('mlp')}",
        "--merged-adapter-dir",
        str(merged_dir),
        "--max-num-seqs",
        "24",
        "--max-queue",
        "64",
    )
    server.wait_until_serving()
    return server


def tokens_of(server, **fields: object) -> list[int]:
    deltas, _ = server.generate(
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=fields.pop("new_tokens", NEW_TOKENS)),
        **fields,
    )
    return [token for delta in deltas for token in delta.token_ids]


def adapters_of(server, model: str = "tiny-llama") -> dict[str, pb.AdapterInfo]:
    models = server.registry.ListModels(pb.ListModelsRequest()).models
    (info,) = [m for m in models if m.id == model]
    return {adapter.adapter_id: adapter for adapter in info.adapters}


def states_of(server) -> dict[str, int]:
    return {name: info.state for name, info in adapters_of(server).items()}


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    return OK, ""


# ---- tokens ----------------------------------------------------------------------------------


def test_adapter_tokens_equal_peft(adapter_server, library: Library) -> None:
    for seed, name in enumerate(["attn", "mlp"]):
        ids = prompt(seed)
        expected = library.greedy(name, ids)
        assert expected != library.greedy(None, ids), "the adapter should change the tokens"
        assert tokens_of(adapter_server, token_ids=ids, adapter_id=name) == expected
        # A mix of one adapter at weight 1 is the same request.
        mix = [pb.AdapterRef(adapter_id=name)]
        assert tokens_of(adapter_server, token_ids=ids, adapter_mix=mix) == expected
    # Loaded over gRPC while serving; the response describes it.
    response = adapter_server.registry.LoadAdapter(
        pb.LoadAdapterRequest(adapter_id="all", path=library.path("all"))
    )
    info = response.adapter
    assert (info.adapter_id, info.rank, info.path) == ("all", 16, library.path("all"))
    assert list(info.target_modules) == sorted(ATTENTION + MLP)
    assert info.state == HOST and not info.pinned and info.num_requests == 0
    # float32 A [16, in] and B [out, 16] of 2 layers' q, k, v, o, gate, up, down projections.
    assert info.size_bytes == 2 * 4 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * 192)
    ids = prompt(5)
    assert tokens_of(adapter_server, token_ids=ids, adapter_id="all") == library.greedy("all", ids)
    infos = adapters_of(adapter_server)
    assert infos["all"].state == DEVICE
    assert infos["attn"].rank == 8 and list(infos["attn"].target_modules) == sorted(ATTENTION)
    model = adapter_server.registry.ListModels(pb.ListModelsRequest()).models[0]
    assert (model.adapter_slots, model.adapter_host_cache) == (16, 128)


def test_mixed_batch_gives_each_stream_its_tokens_alone(adapter_server, library: Library) -> None:
    mix = [pb.AdapterRef(adapter_id="attn", weight=0.5), pb.AdapterRef(adapter_id="mlp", weight=-1)]
    choices = [{"adapter_id": "attn"}, {"adapter_id": "mlp"}, {}, {"adapter_mix": mix}]
    requests = [
        {"token_ids": prompt(10 + i, 5 + i % 4), "new_tokens": 24, **choices[i % len(choices)]}
        for i in range(12)
    ]
    alone = [tokens_of(adapter_server, **dict(request)) for request in requests]
    for request, tokens in zip(requests, alone, strict=True):
        name = request.get("adapter_id")
        if "adapter_mix" not in request:
            assert tokens == library.greedy(name, request["token_ids"], 24)
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: tokens_of(adapter_server, **dict(r)), requests))
    assert together == alone
    # The mix is neither of its parts.
    assert alone[3] != library.greedy("attn", requests[3]["token_ids"], 24)


# ---- refusals --------------------------------------------------------------------------------


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def _edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def _narrow_a(tensors: dict) -> None:
    """lora_A of another base: 32 input features where this one has 64."""
    for key in [k for k in tensors if "lora_A" in k]:
        tensors[key] = tensors[key][:, :32].contiguous()


def _truncate(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


BROKEN: dict[str, tuple[Callable[[Path], None], grpc.StatusCode, str]] = {
    "no files": (lambda p: shutil.rmtree(p) or p.mkdir(), NOT_FOUND, "no adapter_config.json"),
    "no weights": (
        lambda p: (p / "adapter_model.safetensors").unlink(),
        NOT_FOUND,
        "no adapter_model.safetensors",
    ),
    "dora": (lambda p: _edit_config(p, use_dora=True), PRECONDITION, "DoRA"),
    "modules_to_save": (
        lambda p: _edit_config(p, modules_to_save=["lm_head"]),
        PRECONDITION,
        "modules_to_save",
    ),
    "rank mismatch": (
        lambda p: _edit_config(p, r=4),
        PRECONDITION,
        "rank 8 but adapter_config.json says 4",
    ),
    "unknown target": (
        lambda p: _edit_config(p, target_modules=["c_attn"]),
        PRECONDITION,
        "target module 'c_attn'",
    ),
    "shapes of another base": (
        lambda p: _edit_tensors(p, _narrow_a),
        PRECONDITION,
        "do not fit the base projection",
    ),
    "corrupt weights": (_truncate, PRECONDITION, "cannot read"),
}


@pytest.fixture(scope="module")
def broken(library: Library, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("broken")
    paths = {}
    for case, (damage, _, _) in BROKEN.items():
        path = out / case.replace(" ", "-")
        shutil.copytree(library.path("attn"), path)
        damage(path)
        paths[case] = str(path)
    return paths


def test_load_adapter_refusals(adapter_server, library: Library, broken: dict) -> None:
    registry = adapter_server.registry

    def load(**fields: object) -> tuple[grpc.StatusCode, str]:
        return status_of(lambda: registry.LoadAdapter(pb.LoadAdapterRequest(**fields)))

    good = library.path("mlp")
    cases = {
        "unknown model": ({"adapter_id": "x", "path": good, "model": "nope"}, NOT_FOUND, "nope"),
        "already loaded": ({"adapter_id": "attn", "path": good}, grpc.StatusCode.ALREADY_EXISTS,
                           "'attn' is already loaded"),
        "empty id": ({"adapter_id": "", "path": good}, INVALID, "adapter_id is required"),
        "empty path": ({"adapter_id": "x", "path": ""}, INVALID, "path is required"),
        "missing path": ({"adapter_id": "x", "path": "/no/such/dir"}, NOT_FOUND,
                         "does not exist"),
        **{
            case: ({"adapter_id": "x", "path": broken[case]}, code, message)
            for case, (_, code, message) in BROKEN.items()
        },
    }  # fmt: skip
    for case, (fields, code, message) in cases.items():
        got, details = load(**fields)
        assert (got, message in details) == (code, True), (case, got, details)
    assert set(adapters_of(adapter_server)) >= {"attn", "mlp"}
    assert "x" not in adapters_of(adapter_server)
    got, details = status_of(
        lambda: registry.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="nope"))
    )
    assert (got, "unknown adapter 'nope'" in details) == (NOT_FOUND, True)
    _assert_healthy(adapter_server, library)


def test_generate_adapter_refusals(adapter_server, library: Library) -> None:
    ids = prompt(1)
    ref = pb.AdapterRef
    cases = {
        "unknown adapter": ({"adapter_id": "nope"}, NOT_FOUND, "unknown adapter 'nope'"),
        "unknown in a mix": ({"adapter_mix": [ref(adapter_id="attn"), ref(adapter_id="nope")]},
                             NOT_FOUND, "unknown adapter 'nope'"),
        "both": ({"adapter_id": "attn", "adapter_mix": [ref(adapter_id="mlp")]}, INVALID,
                 "not both"),
        "empty adapter_id": ({"adapter_id": ""}, INVALID, "adapter_id is empty"),
        "mix entry without id": ({"adapter_mix": [ref(weight=0.5)]}, INVALID, "without"),
        "named twice": ({"adapter_mix": [ref(adapter_id="attn"), ref(adapter_id="attn")]},
                        INVALID, "named twice"),
        "weight not finite": ({"adapter_mix": [ref(adapter_id="attn", weight=float("inf"))]},
                              INVALID, "not finite"),
    }  # fmt: skip
    for case, (fields, code, message) in cases.items():
        got, details = status_of(lambda f=fields: tokens_of(adapter_server, token_ids=ids, **f))
        assert (got, message in details) == (code, True), (case, got, details)
    _assert_healthy(adapter_server, library)


def _assert_healthy(server, library: Library) -> None:
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    ids = prompt(2)
    assert tokens_of(server, token_ids=ids, adapter_id="attn") == library.greedy("attn", ids)


# ---- slots, host cache, disk -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lru_server(server_factory, library: Library):
    """Two slots, a host cache of three, and six adapters registered at start (in order)."""
    adapters = [arg for i in range(6) for arg in ("--adapter", f"lru{i}={library.path(f'lru{i}')}")]
    server = server_factory("--adapter-slots", "2", "--adapter-host-cache", "3", *adapters)
    server.wait_until_serving()
    return server


def _expected_states(device: str, host: str) -> dict[str, int]:
    """States of lru0..lru5 from two strings of digits: those on device, those in host memory."""
    return {
        f"lru{i}": DEVICE if str(i) in device else HOST if str(i) in host else ON_DISK
        for i in range(6)
    }


# After using lru<N> (one request at a time), the adapters on device and in host memory only.
# Host memory keeps the three most recently used (device ones first); the two slots keep the
# two most recently used; the others are on disk.
LRU_STEPS = [
    (None, "", "345"),  # registered in order: the last three fit the host cache
    (0, "0", "45"),
    (1, "01", "5"),
    (2, "12", "0"),  # no free slot: lru0's (least recently used) goes
    (0, "02", "1"),
    (4, "04", "2"),
    (5, "45", "0"),
    (3, "35", "4"),
    (5, "35", "4"),  # on device already: nothing moves
    (1, "15", "3"),
]


def test_states_follow_lru_and_results_stay_right(lru_server, library: Library) -> None:
    model = lru_server.registry.ListModels(pb.ListModelsRequest()).models[0]
    assert (model.adapter_slots, model.adapter_host_cache) == (2, 3)
    for step, (used, device, host) in enumerate(LRU_STEPS):
        if used is not None:
            name, ids = f"lru{used}", prompt(20 + step)
            assert tokens_of(lru_server, token_ids=ids, adapter_id=name) == library.greedy(
                name, ids
            )
        assert states_of(lru_server) == _expected_states(device, host), step
    infos = adapters_of(lru_server)
    assert {info.rank for info in infos.values()} == {1, 2, 3, 4, 6}
    assert all(info.num_requests == 0 and info.size_bytes > 0 for info in infos.values())


def test_more_adapters_at_once_than_slots(lru_server, library: Library) -> None:
    """Three adapters (two on disk) and the base at once with two slots: one waits for a slot,
    every stream gets its own tokens."""
    requests = [(name, prompt(40 + i)) for i, name in enumerate(["lru0", "lru2", "lru4", None])]

    def run(request: tuple[str | None, list[int]]) -> list[int]:
        name, ids = request
        return tokens_of(lru_server, token_ids=ids, **({"adapter_id": name} if name else {}))

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(run, requests))
    for (name, ids), tokens in zip(requests, results, strict=True):
        assert tokens == library.greedy(name, ids)
    mix = [pb.AdapterRef(adapter_id=f"lru{i}") for i in range(3)]
    got, details = status_of(lambda: tokens_of(lru_server, token_ids=prompt(3), adapter_mix=mix))
    assert (got, "at most 2 run at once" in details) == (INVALID, True)


def test_pinned_adapters_stay_in_host_memory(lru_server, library: Library) -> None:
    registry = lru_server.registry
    info = registry.LoadAdapter(
        pb.LoadAdapterRequest(adapter_id="pinned", path=library.path("lru3"), pin=True)
    ).adapter
    assert info.pinned and info.state == HOST
    for i in [0, 1, 2, 4, 5, 0, 1]:
        name, ids = f"lru{i}", prompt(60 + i)
        assert tokens_of(lru_server, token_ids=ids, adapter_id=name) == library.greedy(name, ids)
        assert adapters_of(lru_server)["pinned"].state != ON_DISK
    ids = prompt(70)
    assert tokens_of(lru_server, token_ids=ids, adapter_id="pinned") == library.greedy("lru3", ids)
    # Pins fill the host cache at most.
    for name in ("pin2", "pin3"):
        registry.LoadAdapter(pb.LoadAdapterRequest(adapter_id=name, path=info.path, pin=True))
    got, details = status_of(
        lambda: registry.LoadAdapter(
            pb.LoadAdapterRequest(adapter_id="pin4", path=info.path, pin=True)
        )
    )
    assert (got, "pinned" in details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, True)
    for name in ("pinned", "pin2", "pin3"):
        registry.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=name))
    assert set(adapters_of(lru_server)) == {f"lru{i}" for i in range(6)}


# ---- hot swap under load ---------------------------------------------------------------------

SWAPS = 100
STREAMS = 16
LOADED = 6  # swap adapters loaded at a time: each is unloaded six loads after its own


def test_hot_swap_under_load(adapter_server, library: Library) -> None:
    """While 16 streams run (with adapters that stay loaded, or none, and two with the adapter
    being swapped), load and unload adapters 100 times: only requests naming an unloaded
    adapter may fail (NOT_FOUND), and every stream's tokens are right."""
    registry = adapter_server.registry
    swap_path = library.path("all")
    stable = ["attn", "mlp", None]
    swapping = range(STREAMS - 2, STREAMS)
    for worker in range(STREAMS):  # references before the streams start
        for name in ("attn", "all") if worker in swapping else (stable[worker % 3],):
            library.greedy(name, prompt(100 + worker))
    done = threading.Event()
    swapped_ran = threading.Event()
    latest = ["attn"]  # the most recently loaded swap id (attn until the first load)
    outcomes: list[tuple[int, str | None, object]] = []

    def stream(worker: int) -> None:
        ids = prompt(100 + worker)
        while True:
            name = latest[0] if worker in swapping else stable[worker % 3]
            fields = {"adapter_id": name} if name else {}
            try:
                tokens = tokens_of(adapter_server, token_ids=ids, **fields)
            except grpc.RpcError as error:
                outcomes.append((worker, name, error.code()))
            else:
                reference = "all" if name and name.startswith("swap") else name
                outcomes.append((worker, name, tokens == library.greedy(reference, ids)))
                if reference == "all":
                    swapped_ran.set()
            if done.is_set():
                return

    with ThreadPoolExecutor(STREAMS) as pool:
        streams = [pool.submit(stream, worker) for worker in range(STREAMS)]
        _wait_for_running(adapter_server, STREAMS // 2)
        for i in range(SWAPS):
            registry.LoadAdapter(pb.LoadAdapterRequest(adapter_id=f"swap{i}", path=swap_path))
            latest[0] = f"swap{i}"
            if i >= LOADED:
                registry.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=f"swap{i - LOADED}"))
        # At least one request with a swapped adapter (swap99 stays loaded until the end).
        assert swapped_ran.wait(timeout=30)
        done.set()
        for future in streams:
            future.result()
    for i in range(SWAPS - LOADED, SWAPS):
        registry.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=f"swap{i}"))
    failed = [o for o in outcomes if o[2] is not True]
    assert all(name and name.startswith("swap") and code == NOT_FOUND for _, name, code in failed)
    assert {worker for worker, _, _ in outcomes} == set(range(STREAMS))
    assert not any(name.startswith("swap") for name in adapters_of(adapter_server))
    assert adapter_server.health() == health_pb2.HealthCheckResponse.SERVING


def _wait_for_running(server, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("tandem:num_requests_running", model_name="tiny-llama") < count:
        assert time.monotonic() < deadline, f"fewer than {count} requests running"
        time.sleep(0.02)


def test_unloading_lets_running_streams_finish(adapter_server, library: Library) -> None:
    registry = adapter_server.registry
    registry.LoadAdapter(pb.LoadAdapterRequest(adapter_id="leaving", path=library.path("all")))
    ids, new_tokens = prompt(8), 64
    expected = library.greedy("all", ids, new_tokens)
    assert len(expected) == new_tokens  # no EOS: the stream runs long after the unload
    request = pb.GenerateRequest(
        token_ids=ids,
        adapter_id="leaving",
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens),
    )
    tokens, after_unload = [], 0
    for response in adapter_server.generation.Generate(request, timeout=60):
        if not tokens:  # the first delta: the request runs; unload its adapter now
            registry.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="leaving"))
            assert "leaving" not in adapters_of(adapter_server)
            refused, _ = status_of(
                lambda: tokens_of(adapter_server, token_ids=ids, adapter_id="leaving")
            )
            assert refused == NOT_FOUND
        else:
            after_unload += 1
        tokens += response.delta.token_ids
    assert tokens == expected and after_unload > 1


# ---- the CLI and the default kit ---------------------------------------------------------------


def test_cli_generate_with_adapters(adapter_server, library: Library) -> None:
    def tandem(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", *args, "--address", adapter_server.address],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        return result.stdout.decode()  # bytes: universal newlines would turn a "\r" into "\n"

    text = "Adapters change what the model says."
    greedy = ["--temperature", "0", "--max-new-tokens", "8"]
    single = tandem("generate", text, "--adapter", "attn", *greedy)
    deltas, _ = adapter_server.generate(
        text=text,
        adapter_id="attn",
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=8),
    )
    assert single == "".join(delta.text for delta in deltas)
    mixed = tandem("generate", text, "--adapter", "attn=0.5", "--adapter", "mlp", *greedy)
    deltas, _ = adapter_server.generate(
        text=text,
        adapter_mix=[pb.AdapterRef(adapter_id="attn", weight=0.5), pb.AdapterRef(adapter_id="mlp")],
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=8),
    )
    assert mixed == "".join(delta.text for delta in deltas)
    loaded = tandem("load-adapter", "by-cli", library.path("mlp"), "--pin")
    assert loaded.startswith("by-cli\tstate=host\trank=4\t") and "pinned=true" in loaded
    listing = tandem("models")
    assert "adapter attn\tstate=" in listing and "adapter by-cli\tstate=host" in listing
    tandem("unload-adapter", "by-cli")
    assert "by-cli" not in adapters_of(adapter_server)


def test_serve_without_model_serves_the_kit_and_its_adapters(
    server_factory,
    library: Library,
    tiny_llama_dir: Path,
    tiny_small_dir: Path,
    tiny_expert_dir: Path,
    tmp_path: Path,
) -> None:
    """A directory laid out like a built kit where `tandem serve` looks for it: base-large,
    every lora-* directory (as adapters of that name) and every expert-* directory (as experts
    of that name on base-small) are served."""
    from kit.build import DEFAULT_RECIPE, recipe_hash

    kit = tmp_path / "models" / f"kit-{recipe_hash(DEFAULT_RECIPE)}"
    kit.mkdir(parents=True)
    (kit / "tasks.json").write_text(json.dumps({"tasks": [{"name": "add"}, {"name": "sub"}]}))
    os.symlink(tiny_llama_dir, kit / "base-large")
    shutil.copytree(library.path("attn"), kit / "lora-add")
    shutil.copytree(library.path("mlp"), kit / "lora-sub")
    os.symlink(tiny_small_dir, kit / "base-small")
    shutil.copytree(tiny_expert_dir, kit / "expert-add")  # not an adapter: an expert
    (kit / "lora-notes.txt").write_text("a file, not an adapter directory")
    server = server_factory(env={"TANDEM_HOME": str(tmp_path)}, tiny_model=False)
    server.wait_until_serving()
    (model,) = server.registry.ListModels(pb.ListModelsRequest()).models
    assert model.id == "base-large"
    assert [a.adapter_id for a in model.adapters] == ["lora-add", "lora-sub"]
    assert model.adapters[0].path == str(kit / "lora-add")
    (expert,) = model.experts
    assert (expert.expert_id, expert.path) == ("expert-add", str(kit / "expert-add"))
    assert expert.small_base == str(kit / "base-small") and not expert.is_adapter
    ids = prompt(7)
    assert tokens_of(server, token_ids=ids, adapter_id="lora-sub") == library.greedy("mlp", ids)
    server.stop()


# ---- merging ---------------------------------------------------------------------------------


def test_merged_adapter_serves_the_weighted_mix(
    adapter_server, library: Library, merged_dir: Path
) -> None:
    sources = [pb.AdapterRef(adapter_id="attn", weight=0.5), pb.AdapterRef(adapter_id="mlp")]
    info = adapter_server.registry.MergeAdapters(
        pb.MergeAdaptersRequest(adapter_id="blend", sources=sources)
    ).adapter
    assert info.adapter_id == "blend" and info.rank == 8
    assert list(info.target_modules) == sorted(ATTENTION + MLP)
    assert Path(info.path).parent == merged_dir / "tiny-llama"
    # LINEAR is exact: the merged adapter is the request-time mix of its sources.
    for seed in range(3):
        ids = prompt(40 + seed)
        mixed = tokens_of(adapter_server, token_ids=ids, adapter_mix=sources)
        assert tokens_of(adapter_server, token_ids=ids, adapter_id="blend") == mixed
    assert mixed != library.greedy("attn", ids)
    # What it wrote is an ordinary PEFT directory: loaded again, the same tokens.
    adapter_server.registry.LoadAdapter(pb.LoadAdapterRequest(adapter_id="blend2", path=info.path))
    assert tokens_of(adapter_server, token_ids=ids, adapter_id="blend2") == mixed
    ties = adapter_server.registry.MergeAdapters(
        pb.MergeAdaptersRequest(
            adapter_id="ties", sources=sources, method=pb.MERGE_METHOD_TIES, density=0.5, rank=3
        )
    ).adapter
    assert ties.rank == 3 and tokens_of(adapter_server, token_ids=ids, adapter_id="ties")
    for name in ("blend", "blend2", "ties"):
        adapter_server.registry.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=name))


def test_merge_refusals(adapter_server, library: Library) -> None:
    attn = pb.AdapterRef(adapter_id="attn")
    exists = grpc.StatusCode.ALREADY_EXISTS
    cases = [
        (pb.MergeAdaptersRequest(adapter_id="m", sources=[attn, attn]), INVALID, "twice"),
        (pb.MergeAdaptersRequest(adapter_id="m"), INVALID, "sources"),
        (pb.MergeAdaptersRequest(sources=[attn]), INVALID, "adapter_id"),
        (pb.MergeAdaptersRequest(adapter_id="m", sources=[attn], density=0.5), INVALID, "density"),
        (pb.MergeAdaptersRequest(adapter_id="m", sources=[attn], rank=4), INVALID, "exact"),
        (
            pb.MergeAdaptersRequest(
                adapter_id="m", sources=[attn], method=pb.MERGE_METHOD_TIES, density=1.5
            ),
            INVALID,
            "density",
        ),
        (
            pb.MergeAdaptersRequest(adapter_id="m", sources=[attn], rank=0, method=2),
            INVALID,
            "rank",
        ),
        (
            pb.MergeAdaptersRequest(adapter_id="m", sources=[pb.AdapterRef(adapter_id="nope")]),
            NOT_FOUND,
            "nope",
        ),
        (pb.MergeAdaptersRequest(adapter_id="m", model="x", sources=[attn]), NOT_FOUND, "x"),
        (pb.MergeAdaptersRequest(adapter_id="attn", sources=[attn]), exists, "attn"),
    ]
    for request, code, words in cases:
        status, details = status_of(lambda r=request: adapter_server.registry.MergeAdapters(r))
        assert (status, words in details) == (code, True), (request, details)
    assert "m" not in adapters_of(adapter_server)
    ids = prompt(3)
    # Still serving, and right.
    expected = library.greedy("attn", ids)
    assert tokens_of(adapter_server, token_ids=ids, adapter_id="attn") == expected
