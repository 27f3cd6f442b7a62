"""The adapter registry's tiers (ON_DISK / HOST / DEVICE) and LRU, the scheduler's limit on
adapters running at once, and the fixed-size slot pool of AdapterStacks.

Adapters here are random PEFT-format directories (no PEFT needed: test_lora.py checks the
arithmetic against PEFT); the oracle for tokens is each request run alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.adapters import AdapterRegistry
from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.llm_engine import EngineConfig, LLMEngine
from engine.lora import PROJECTIONS, AdapterStacks, load_adapter, projection_shapes
from engine.model import CausalLM
from engine.types import (
    AdapterError,
    AdapterState,
    InvalidRequest,
    NotFound,
    Request,
    ResourceExhausted,
    SamplingParams,
    StoppingCriteria,
)

ON_DISK, HOST, DEVICE = AdapterState.ON_DISK, AdapterState.HOST, AdapterState.DEVICE


def write_adapter(out: Path, config: ModelConfig, rank: int, projs: list[str], seed: int) -> str:
    """A PEFT LoRA directory with random factors on `projs` of every layer."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    shapes = projection_shapes(config)
    for layer in range(config.num_layers):
        for proj in projs:
            in_features, out_features = shapes[proj]
            prefix = f"base_model.model.model.layers.{layer}.{PROJECTIONS[proj][0]}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
            b = 0.3 * torch.randn(out_features, rank, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = b
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": projs}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return str(out)


# rank and projections of each test adapter: shapes that differ, so slots restack sometimes
SHAPES = [
    (4, ["q_proj", "v_proj"]),
    (2, list(PROJECTIONS)),
    (8, ["gate_proj", "down_proj"]),
    (1, ["o_proj"]),
    (4, ["k_proj", "up_proj"]),
]


@pytest.fixture
def model(tiny_model: Callable) -> CausalLM:
    return CausalLM.from_dir(tiny_model("llama").path)


@pytest.fixture
def paths(model: CausalLM, tmp_path: Path) -> list[str]:
    return [
        write_adapter(tmp_path / f"a{i}", model.config, rank, projs, seed=i)
        for i, (rank, projs) in enumerate(SHAPES)
    ]


def states(registry: AdapterRegistry) -> dict[str, AdapterState]:
    return {info.adapter_id: info.state for info in registry.infos()}


def test_host_cache_keeps_the_most_recently_used(model: CausalLM, paths: list[str]) -> None:
    registry = AdapterRegistry(model.config, model.dtype, slots=2, host_cache=3)
    for i, path in enumerate(paths[:4]):
        registry.register(f"a{i}", path)
    assert states(registry) == {"a0": ON_DISK, "a1": HOST, "a2": HOST, "a3": HOST}
    info = registry.infos()[0]
    assert (info.rank, info.target_modules, info.path) == (4, ("q_proj", "v_proj"), paths[0])
    assert info.size_bytes == 2 * 4 * 4 * (64 + 64 + 64 + 32)  # float32, 2 layers
    # On disk: a non-blocking hold declines; a blocking one reads it back (evicting a1).
    assert registry.hold([("a0", 1.0)], may_load=False) is None
    use = registry.hold([("a0", 1.0)])
    assert use is not None and use[0][0].max_rank == 4
    assert states(registry) == {"a0": HOST, "a1": ON_DISK, "a2": HOST, "a3": HOST}
    assert registry.infos()[0].num_requests == 1
    # Held adapters are never evicted; slots (DEVICE) neither: the cache goes over its size
    # while nothing else can go, and shrinks back when they are released.
    registry.set_device([use[0][0], registry.hold([("a2", 1.0)])[0][0]])  # type: ignore[index]
    held_a3 = registry.hold([("a3", 1.0)], may_load=False)
    assert held_a3 is not None
    use_a1 = registry.hold([("a1", 1.0)])
    assert states(registry) == {"a0": DEVICE, "a1": HOST, "a2": DEVICE, "a3": HOST}
    registry.release(held_a3)
    assert states(registry)["a3"] == ON_DISK
    registry.release(use_a1)  # type: ignore[arg-type]
    registry.set_device([])
    registry.release(use)
    assert list(states(registry).values()).count(ON_DISK) == 1


def test_pins_and_unloads(model: CausalLM, paths: list[str]) -> None:
    registry = AdapterRegistry(model.config, model.dtype, slots=1, host_cache=2)
    registry.register("pinned", paths[0], pin=True)
    for i, path in enumerate(paths[1:4]):
        registry.register(f"a{i}", path)
    assert states(registry) == {"pinned": HOST, "a0": ON_DISK, "a1": ON_DISK, "a2": HOST}
    registry.register("pin2", paths[4], pin=True)
    with pytest.raises(ResourceExhausted, match="pinned"):
        registry.register("pin3", paths[4], pin=True)
    assert states(registry)["a2"] == ON_DISK
    # Unloading a held adapter: new requests get NotFound, the holder keeps it.
    use = registry.hold([("pinned", 0.5)])
    registry.remove("pinned")
    with pytest.raises(NotFound, match="unknown adapter 'pinned'"):
        registry.hold([("pinned", 1.0)])
    assert registry.is_registered(use[0][0]) is False  # type: ignore[index]
    registry.release(use)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        registry.remove("pinned")
    registry.register("pinned", paths[0])  # the id can come back
    with pytest.raises(InvalidRequest, match="at most 1 run at once"):
        registry.check([("a0", 1.0), ("a1", 1.0)])


def test_a_file_gone_bad_on_disk_fails_its_request_only(
    model: CausalLM, paths: list[str], tmp_path: Path
) -> None:
    registry = AdapterRegistry(model.config, model.dtype, slots=2, host_cache=2)
    for i in range(3):
        registry.register(f"a{i}", paths[i])
    assert states(registry) == {"a0": ON_DISK, "a1": HOST, "a2": HOST}
    weights = Path(paths[0]) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(AdapterError, match="cannot read"):
        registry.hold([("a1", 1.0), ("a0", 1.0)])
    assert all(info.num_requests == 0 for info in registry.infos())
    assert registry.hold([("a1", 1.0)]) is not None


def greedy(request_id: str, prompt: list[int], adapters=()) -> Request:
    return Request(
        request_id,
        prompt,
        SamplingParams(temperature=0.0),
        StoppingCriteria(max_new_tokens=8, ignore_eos=True),
        adapters=adapters,
    )


def test_running_requests_use_at_most_the_slots(
    model: CausalLM, paths: list[str], sentencepiece_tokenizer
) -> None:
    """Five adapters, two slots: requests whose adapter finds no slot wait, and so do requests
    with adapters behind them (no starvation), but not those of the base model; every request
    gets the tokens it gets alone."""
    config = EngineConfig(
        kv_cache_bytes=4 << 20, block_size=4, adapter_slots=2, adapter_host_cache=3
    )
    engine = LLMEngine(model, sentencepiece_tokenizer, config)
    for i, path in enumerate(paths):
        engine.load_adapter(f"a{i}", path)
    requests = {
        f"r{i}": greedy(f"r{i}", [5 + i, 9, 13, 7 + i], ((f"a{i % 5}", 1.0),) if i < 6 else ())
        for i in range(8)
    }
    alone = {
        rid: engine.generate([greedy(f"{rid}-alone", r.prompt_token_ids, r.adapters)])
        for rid, r in requests.items()
    }
    for request in requests.values():
        engine.add_request(request)
    outputs: dict[str, list[int]] = {rid: [] for rid in requests}
    first_step = True
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
        running = {a.uid for seq in engine.scheduler.running for a, _ in seq.adapters}
        assert len(running) <= 2 and len(engine._adapter_stacks.slots) <= 2
        if first_step:
            ids = {seq.request_id for seq in engine.scheduler.running}
            # r2 waits for a slot; r5 (a0, running) waits behind it; r6 and r7 (base) do not.
            assert ids == {"r0", "r1", "r6", "r7"}
            first_step = False
    for rid, tokens in outputs.items():
        assert tokens == alone[rid][f"{rid}-alone"].token_ids, rid
    assert all(info.num_requests == 0 for info in engine.adapter_infos())
    on_device = [info for info in engine.adapter_infos() if info.state == DEVICE]
    assert len(on_device) == 2


def test_fixed_slots_are_taken_over_in_victim_order(model: CausalLM, paths: list[str]) -> None:
    """With max_slots the pool keeps its adapters and evicts the first in victim order; every
    pass gives the logits of stacks built afresh for it."""
    adapters = [load_adapter(path, model.config) for path in paths]
    order = {adapter.uid: i for i, adapter in enumerate(adapters)}
    # Victim order: a1 first, then a0, then the others.
    stacks = AdapterStacks(
        model.config, max_slots=2, victim_key=lambda a: (order[a.uid] != 1, order[a.uid])
    )
    kv = model.new_kv_cache(16, 4)
    prompts = [[5, 6, 7], [8, 9]]
    batch = ForwardBatch.build(prompts, [3, 2], [[0], [1]], 4)

    def run(*names: int) -> list[int]:
        uses = [((adapters[i], 1.0),) for i in names]
        shared = model.forward(batch, kv, stacks.batch(uses, [3, 2]))
        fresh = model.forward(batch, kv, AdapterStacks(model.config).batch(uses, [3, 2]))
        torch.testing.assert_close(shared, fresh, atol=1e-5, rtol=0)
        return [order[a.uid] for a in stacks.slots if a is not None]

    assert run(0, 1) == [0, 1]
    version = stacks.version
    assert run(1, 0) == [0, 1] and stacks.version == version  # nothing moved
    assert run(0, 2) == [0, 2]  # a1 goes first
    assert run(3, 4) == [3, 4]  # both go; rank and targets differ: restacked
    assert run(3, 3) == [3, 4]
    stacks.drop(keep=lambda a: order[a.uid] != 4)
    assert [order[a.uid] for a in stacks.slots if a is not None] == [3]
