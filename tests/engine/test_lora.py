"""LoRA adapters in the engine against PEFT on tiny random checkpoints.

Oracles: a PEFT model with randomised LoRA weights (its logits and greedy tokens); for weighted
combinations of adapters, transformers with W + sum_i w_i * delta_i merged in, each delta_i from
PEFT's own get_delta_weight; and "a mixed batch changes nothing" against each request alone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from engine.batch import ForwardBatch
from engine.kv_cache import KVCache
from engine.llm_engine import EngineConfig, LLMEngine
from engine.lora import AdapterStacks, LoraAdapter, load_adapter
from engine.model import CausalLM
from engine.types import (
    AdapterError,
    AlreadyExists,
    NotFound,
    Request,
    SamplingParams,
    StoppingCriteria,
)
from kernels import lora as lora_kernels

BLOCK_SIZE = 4
NUM_BLOCKS = 64
ATOL = 1e-4  # float32 engine vs float32 PEFT
PROMPT_LEN = 10
NEW_TOKENS = 6
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (tiny model variant, LoraConfig options)
ADAPTERS: dict[str, tuple[str, dict]] = {
    "attention_r8": ("llama", {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR[:4]}),
    "mlp_r1": ("llama", {"r": 1, "lora_alpha": 3, "target_modules": ALL_LINEAR[4:]}),
    "all_r64": ("llama", {"r": 64, "lora_alpha": 32, "target_modules": "all-linear"}),
    "all_r16_rslora": (
        "qwen3_untied",
        {"r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": "all-linear"},
    ),
    # q and v without k (a gap in the fused qkv output), qkv bias, per-module rank and alpha.
    "qv_down_patterns": (
        "qwen2_tied",
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 4},
            "alpha_pattern": {"down_proj": 5},
        },
    ),
    "regex_layer1": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": r".*\.1\.(self_attn|mlp)\.(k|up)_proj"},
    ),
    "layers_to_transform": (
        "mistral_window",
        {
            "r": 8,
            "lora_alpha": 8,
            "target_modules": ["k_proj", "o_proj", "gate_proj"],
            "layers_to_transform": [1],
        },
    ),
}


class Adapter:
    """A PEFT adapter saved to disk, with the PEFT model that is its oracle."""

    def __init__(self, path: Path, peft_model: torch.nn.Module) -> None:
        self.path = path
        self.peft = peft_model

    def logits(self, tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.peft(torch.tensor([tokens]), use_cache=False).logits[0].float()

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.peft.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens
            )
        return out[0, len(prompt) :].tolist()

    def deltas(self) -> dict[str, torch.Tensor]:
        """Module name ("model.layers.0.self_attn.q_proj") -> PEFT's delta weight [out, in]."""
        out = {}
        for name, module in self.peft.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                out[name.removeprefix("base_model.model.")] = module.get_delta_weight("default")
        return out


def randomize_lora(peft_model: torch.nn.Module, seed: int) -> None:
    """PEFT zeroes lora_B; draw both factors at scales that move the logits visibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="session")
def adapter(tiny_model: Callable, tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """adapter(name) -> Adapter, built once per session from ADAPTERS[name]."""
    built: dict[str, Adapter] = {}

    def get(name: str) -> Adapter:
        if name not in built:
            variant, options = ADAPTERS[name]
            tiny = tiny_model(variant)
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                tiny.path, dtype=torch.float32, attn_implementation="eager"
            )
            peft_model = get_peft_model(hf, LoraConfig(**options)).eval()
            randomize_lora(peft_model, seed=len(built) + 1)
            path = tmp_path_factory.mktemp(f"lora-{name}")
            peft_model.save_pretrained(path)
            built[name] = Adapter(path, peft_model)
        return built[name]

    return get


def random_tokens(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (length,), generator=generator).tolist()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


class Runner:
    """Drives CausalLM.forward directly: sequences with adapters, prefill then decode steps."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.kv: KVCache = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
        self.stacks = AdapterStacks(model.config, dtype=model.dtype)
        self.next_block = 0

    def table(self, length: int) -> list[int]:
        count = -(-length // BLOCK_SIZE)
        self.next_block += count
        return list(range(self.next_block - count, self.next_block))

    def step(
        self,
        chunks: list[tuple[list[int], int, list[int]]],
        uses: list[tuple[tuple[LoraAdapter, float], ...]],
        all_rows: bool = False,
    ) -> torch.Tensor:
        """chunks: (new tokens, context length after them, block table) per sequence."""
        batch = ForwardBatch.build(
            [new for new, _, _ in chunks],
            [length for _, length, _ in chunks],
            [table for _, _, table in chunks],
            BLOCK_SIZE,
        )
        if all_rows:
            batch.logits_indices = torch.arange(batch.num_tokens)
        lora = self.stacks.batch(uses, [len(new) for new, _, _ in chunks])
        return self.model.forward(batch, self.kv, lora)

    def run(
        self,
        prompts: list[list[int]],
        uses: list[tuple[tuple[LoraAdapter, float], ...]],
        new_tokens: int,
    ) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Prefill all prompts in one batch, then greedy decode steps of all of them together.
        Returns per sequence its logits (prompt rows, then one row per step) and tokens."""
        tables = [self.table(len(p) + new_tokens) for p in prompts]
        logits = self.step(
            [(p, len(p), t) for p, t in zip(prompts, tables, strict=True)], uses, all_rows=True
        )
        rows, start = [], 0
        for p in prompts:
            rows.append([logits[start : start + len(p)]])
            start += len(p)
        tokens = [[int(r[0][-1].argmax())] for r in rows]
        for step in range(new_tokens - 1):
            chunks = [
                ([seq[-1]], len(p) + step + 1, t)
                for seq, p, t in zip(tokens, prompts, tables, strict=True)
            ]
            logits = self.step(chunks, uses)
            for i in range(len(prompts)):
                rows[i].append(logits[i : i + 1])
                tokens[i].append(int(logits[i].argmax()))
        return [torch.cat(r) for r in rows], tokens


# ---- one adapter against PEFT ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_matches_peft(tiny_model: Callable, adapter: Callable, name: str) -> None:
    variant, _ = ADAPTERS[name]
    ref = adapter(name)
    model = CausalLM.from_dir(tiny_model(variant).path)
    lora = load_adapter(ref.path, model.config)
    prompt = random_tokens(0, PROMPT_LEN)
    expected_tokens = ref.generate(prompt, NEW_TOKENS)
    expected = ref.logits(prompt + expected_tokens)

    logits, tokens = Runner(model).run([prompt], [((lora, 1.0),)], NEW_TOKENS)
    assert_close(logits[0], expected[: PROMPT_LEN + NEW_TOKENS - 1])
    assert tokens[0] == expected_tokens
    # Guard: the adapter really changes the model, so the comparison above means something.
    base = Runner(model).run([prompt], [()], 1)[0][0]
    assert (base - expected[:PROMPT_LEN]).abs().max() > 0.1


def test_ranks_and_scaling_read_from_the_adapter(tiny_model: Callable, adapter: Callable) -> None:
    model = CausalLM.from_dir(tiny_model("qwen2_tied").path)
    lora = load_adapter(adapter("qv_down_patterns").path, model.config)
    assert {name: w.rank for name, w in lora.weights.items() if name[0] == 0} == {
        (0, "q_proj"): 8,
        (0, "v_proj"): 4,
        (0, "down_proj"): 8,
    }
    assert lora.projections == {"q_proj", "v_proj", "down_proj"}
    assert lora.config.scaling_for("model.layers.0.mlp.down_proj", 8) == 5 / 8
    assert lora.config.scaling_for("model.layers.0.self_attn.v_proj", 4) == 16 / 4
    layered = load_adapter(
        adapter("layers_to_transform").path,
        CausalLM.from_dir(tiny_model("mistral_window").path).config,
    )
    assert {layer for layer, _ in layered.weights} == {1}


def test_bf16_adapter_close_to_float32(tiny_model: Callable, adapter: Callable) -> None:
    ref = adapter("all_r64")
    model = CausalLM.from_dir(tiny_model("llama").path, dtype=torch.bfloat16)
    lora = load_adapter(ref.path, model.config, model.dtype)
    assert lora.dtype == torch.bfloat16
    prompt = random_tokens(1, PROMPT_LEN)
    logits, _ = Runner(model).run([prompt], [((lora, 1.0),)], 1)
    diff = (logits[0] - ref.logits(prompt)).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5


# ---- batches mixing adapters -----------------------------------------------------------------


@pytest.fixture(params=["dense", "segmented"])
def lora_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both PyTorch paths of kernels.lora: every row against every slot, or per segment."""
    monkeypatch.setattr(lora_kernels, "DENSE_MAX_CELLS", 10**9 if request.param == "dense" else 0)
    return request.param


def test_mixed_batch_equals_each_request_alone(
    tiny_model: Callable, adapter: Callable, lora_path: str
) -> None:
    model = CausalLM.from_dir(tiny_model("llama").path)
    attn, mlp, full = (
        load_adapter(adapter(name).path, model.config)
        for name in ("attention_r8", "mlp_r1", "all_r64")
    )
    uses = [
        ((attn, 1.0),),
        (),
        ((full, 1.0),),
        ((mlp, 1.0),),
        ((attn, 0.5), (mlp, -1.5)),  # two adapters, weighted
        ((attn, 1.0),),  # the same adapter in two sequences
        ((full, 0.7), (attn, 0.2), (mlp, 1.0)),
    ]
    prompts = [random_tokens(10 + i, 5 + 2 * i) for i in range(len(uses))]
    together_logits, together_tokens = Runner(model).run(prompts, uses, NEW_TOKENS)
    for i, (prompt, use) in enumerate(zip(prompts, uses, strict=True)):
        alone_logits, alone_tokens = Runner(model).run([prompt], [use], NEW_TOKENS)
        assert_close(together_logits[i], alone_logits[0])
        assert together_tokens[i] == alone_tokens[0]
    # The base row is the base model.
    base_logits, _ = Runner(model).run([prompts[1]], [()], NEW_TOKENS)
    assert_close(together_logits[1], base_logits[0])


def merged_model(tiny_path: Path, weighted: list[tuple[Adapter, float]]) -> torch.nn.Module:
    """transformers with W + sum_i w_i * delta_i in every adapted projection."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    state = hf.state_dict()
    with torch.no_grad():
        for ref, weight in weighted:
            for module, delta in ref.deltas().items():
                state[f"{module}.weight"].add_(weight * delta)
    return hf


def test_weighted_adapters_equal_merged_deltas(tiny_model: Callable, adapter: Callable) -> None:
    tiny = tiny_model("llama")
    names_weights = [("attention_r8", 0.6), ("all_r64", -0.4), ("mlp_r1", 1.3)]
    model = CausalLM.from_dir(tiny.path)
    use = tuple((load_adapter(adapter(n).path, model.config), w) for n, w in names_weights)
    reference = merged_model(tiny.path, [(adapter(n), w) for n, w in names_weights])
    prompt = random_tokens(3, PROMPT_LEN)
    with torch.no_grad():
        expected_tokens = reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS
        )[0, PROMPT_LEN:].tolist()
        expected = reference(torch.tensor([prompt + expected_tokens])).logits[0]
    logits, tokens = Runner(model).run([prompt], [use], NEW_TOKENS)
    assert_close(logits[0], expected[: PROMPT_LEN + NEW_TOKENS - 1])
    assert tokens[0] == expected_tokens


def test_no_adapter_batch_does_no_lora_work(tiny_model: Callable) -> None:
    model = CausalLM.from_dir(tiny_model("llama").path)
    assert AdapterStacks(model.config).batch([(), ()], [3, 1]) is None


def test_stack_slots_are_reused_overwritten_grown_and_compacted(
    tiny_model: Callable, adapter: Callable
) -> None:
    """Across passes the stacks act as a pool of slots; whatever happens to them, a pass gives
    the logits of stacks built afresh for it."""
    model = CausalLM.from_dir(tiny_model("llama").path)
    attn1, mlp, attn2, full = (
        load_adapter(adapter(name).path, model.config)
        for name in ("attention_r8", "mlp_r1", "attention_r8", "all_r64")
    )
    stacks = AdapterStacks(model.config)
    kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    prompts = [random_tokens(40 + i, 3 + i) for i in range(3)]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(3)]
    batch = ForwardBatch.build(prompts, [len(p) for p in prompts], tables, BLOCK_SIZE)

    def run(uses: list) -> tuple:
        """Logits with the shared stacks and with fresh ones; the shared stacks' slots."""
        lens = [len(p) for p in prompts]
        shared = model.forward(batch, kv, stacks.batch(uses, lens))
        fresh = model.forward(batch, kv, AdapterStacks(model.config).batch(uses, lens))
        assert_close(shared, fresh, atol=1e-5)
        return stacks.slots

    assert run([((attn1, 1.0),), (), ((mlp, 1.0),)]) == (attn1, mlp)
    layers = stacks._layers
    qkv = layers[0]["qkv"]
    assert qkv.slot_ranks == (8, 0) and layers[0]["gate_up"].slot_ranks == (0, 1)
    # The same adapters in another order and weights: nothing restacked.
    assert run([((mlp, 2.0),), ((attn1, 0.5),), ()]) == (attn1, mlp)
    assert stacks._layers is layers and layers[0]["qkv"] is qkv
    # One slot unused: kept. Then an adapter of the same shapes takes it over in place.
    assert run([(), (), ((mlp, 1.0),)]) == (attn1, mlp)
    assert run([((attn2, 1.0),), ((mlp, 1.0),), ()]) == (attn2, mlp)
    assert layers[0]["qkv"] is qkv
    # No free slot it fits: a new one; the stacks grow.
    assert run([((full, 1.0),), ((attn2, 1.0), (mlp, -1.0)), ()]) == (attn2, mlp, full)
    assert layers[0]["qkv"].slot_ranks == (8, 0, 64)
    # Unused slots outnumber the used ones: rebuilt for the pass's adapters only.
    assert run([((mlp, 1.0),), (), ()]) == (mlp,)
    assert stacks._layers[0]["qkv"] is None


def test_steady_passes_share_one_batch_until_rows_or_slots_change(
    tiny_model: Callable, adapter: Callable
) -> None:
    """Decode steps of the same sequences get the same LoraBatch, so its masks and kernel
    params are made once; other rows, weights or slots make a new one."""
    model = CausalLM.from_dir(tiny_model("llama").path)
    attn, mlp, full = (
        load_adapter(adapter(name).path, model.config)
        for name in ("attention_r8", "mlp_r1", "all_r64")
    )
    stacks = AdapterStacks(model.config)
    uses = [((attn, 1.0),), ((mlp, 1.0),)]
    first = stacks.batch(uses, [1, 1])
    assert first is not None
    params = first.decode_params()
    assert stacks.batch(uses, [1, 1]) is first and first.decode_params() is params
    assert stacks.batch(uses, [2, 1]) is not first
    weighted = stacks.batch([((attn, 0.5),), ((mlp, 1.0),)], [1, 1])
    assert weighted is not None and weighted is not first
    steady = stacks.batch(uses, [1, 1])
    assert steady is stacks.batch(uses, [1, 1])
    version = stacks.version
    stacks.batch([((full, 1.0),), ((mlp, 1.0),)], [1, 1])  # a new slot: the stacks change
    assert stacks.version != version
    after = stacks.batch(uses, [1, 1])
    assert after is not steady and after is not None
    assert after.layers is stacks._layers


# ---- the engine: requests with adapters ------------------------------------------------------


def make_engine(tiny_model: Callable, tokenizer, **overrides) -> LLMEngine:
    model = CausalLM.from_dir(tiny_model("llama").path)
    config = EngineConfig(**{"kv_cache_bytes": 4 << 20, "block_size": 4, **overrides})
    return LLMEngine(model, tokenizer, config)


def greedy(request_id: str, prompt: list[int], adapters=(), new_tokens: int = NEW_TOKENS):
    return Request(
        request_id,
        prompt,
        SamplingParams(temperature=0.0),
        StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        adapters=adapters,
    )


def test_engine_requests_with_adapters_match_peft(
    tiny_model: Callable, adapter: Callable, sentencepiece_tokenizer
) -> None:
    engine = make_engine(tiny_model, sentencepiece_tokenizer, max_batched_tokens=8)
    names = ["attention_r8", "mlp_r1", "all_r64"]
    for name in names:
        engine.load_adapter(name, adapter(name).path)
    assert engine.adapter_ids() == sorted(names)
    prompts = {f"r{i}": random_tokens(20 + i, 6 + 3 * i) for i in range(4)}
    adapters = {"r0": "attention_r8", "r1": None, "r2": "all_r64", "r3": "mlp_r1"}
    requests = [
        greedy(rid, prompts[rid], ((adapters[rid], 1.0),) if adapters[rid] else ())
        for rid in prompts
    ]
    # An 8-token step budget: prompts prefill in chunks while the others decode.
    outputs = engine.generate(requests)
    for rid, prompt in prompts.items():
        name = adapters[rid]
        if name is None:
            continue
        assert outputs[rid].token_ids == adapter(name).generate(prompt, NEW_TOKENS)
    assert engine.allocator.num_used == 0


def test_prefix_cache_never_mixes_adapters(
    tiny_model: Callable, adapter: Callable, sentencepiece_tokenizer
) -> None:
    """A prompt's cached blocks serve only requests with the same adapters at the same scales:
    the keys and values of an adapter's request differ from the base model's."""
    engine = make_engine(tiny_model, sentencepiece_tokenizer)
    engine.load_adapter("all_r64", adapter("all_r64").path)
    prompt = random_tokens(40, 22)
    full = (len(prompt) - 1) // 4 * 4
    steered = (("all_r64", 1.0),)
    expected = adapter("all_r64").generate(prompt, NEW_TOKENS)
    runs = [("base", (), 0), ("lora", steered, 0), ("lora again", steered, full)]
    runs.append(("half scale", (("all_r64", 0.5),), 0))
    for rid, adapters, cached in runs:
        out = engine.generate([greedy(rid, prompt, adapters)])[rid]
        assert out.cached_prompt_tokens == cached, rid
        if adapters == steered:
            assert out.token_ids == expected, rid
    assert engine.allocator.num_used == 0


def test_engine_adapter_registry_errors(
    tiny_model: Callable, adapter: Callable, sentencepiece_tokenizer, tmp_path: Path
) -> None:
    engine = make_engine(tiny_model, sentencepiece_tokenizer)
    engine.load_adapter("a", adapter("attention_r8").path)
    with pytest.raises(AlreadyExists, match="'a'") as error:
        engine.load_adapter("a", adapter("mlp_r1").path)
    assert error.value.kind == "already_exists"
    with pytest.raises(NotFound, match="unknown adapter 'nope'") as error:
        engine.validate(greedy("x", [5, 6], (("nope", 1.0),)))
    assert error.value.kind == "not_found"
    with pytest.raises(NotFound):
        engine.add_request(greedy("x", [5, 6], (("a", 1.0), ("nope", 1.0))))
    with pytest.raises(NotFound) as error:
        engine.remove_adapter("nope")
    assert error.value.kind == "not_found"
    for bad, message in [
        ((("a", float("nan")),), "finite"),
        ((("a", 1.0), ("a", 0.5)), "twice"),
        (("a",), "pairs"),
    ]:
        with pytest.raises(Exception, match=message) as error:
            engine.validate(greedy("x", [5, 6], bad))
        assert error.value.kind == "invalid_argument"
    # An adapter for another base: refused when added.
    qwen = load_adapter(
        adapter("all_r16_rslora").path, CausalLM.from_dir(tiny_model("qwen3_untied").path).config
    )
    with pytest.raises(AdapterError, match="other shapes"):
        engine.add_adapter("q", qwen)
    with pytest.raises(AdapterError) as error:
        engine.load_adapter("missing", tmp_path / "missing")
    assert error.value.kind == "not_found"
    assert engine.adapter_ids() == ["a"]


def test_removing_an_adapter_lets_running_requests_finish(
    tiny_model: Callable, adapter: Callable, sentencepiece_tokenizer
) -> None:
    engine = make_engine(tiny_model, sentencepiece_tokenizer)
    engine.load_adapter("a", adapter("all_r64").path)
    prompt = random_tokens(30, 8)
    expected = engine.generate([greedy("before", prompt, (("a", 1.0),), 10)])["before"].token_ids
    engine.add_request(greedy("running", prompt, (("a", 1.0),), 10))
    tokens = []
    for _ in range(3):
        tokens += [t for out in engine.step() for t in out.token_ids]
    engine.remove_adapter("a")
    assert engine.adapter_ids() == []
    with pytest.raises(NotFound):
        engine.add_request(greedy("after", prompt, (("a", 1.0),)))
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert tokens == expected
    assert engine._adapter_stacks.holds_stacks
    engine.generate([greedy("base", prompt, (), 2)])
    assert not engine._adapter_stacks.holds_stacks  # freed by a step when nothing uses adapters
    # The id can be loaded again, from the same directory.
    engine.load_adapter("a", adapter("all_r64").path)
    again = engine.generate([greedy("again", prompt, (("a", 1.0),), 10)])["again"].token_ids
    assert again == expected


# ---- refusals --------------------------------------------------------------------------------


def copy_adapter(adapter: Callable, name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(adapter(name).path, out)
    return out


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"lora_bias": True}, "lora_bias"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target module 'lm_head'"),
        ({"target_modules": ["embed_tokens"]}, "target module 'embed_tokens'"),
        ({"target_modules": ["c_attn"]}, "target module 'c_attn'"),
        ({"target_modules": ".*(lm_head|q_proj)"}, "target module 'lm_head'"),
        ({"r": 4}, "rank 8 but adapter_config.json says 4"),
        ({"rank_pattern": {"q_proj": 2}}, "q_proj: the weights have rank 8"),
        ({"r": 300}, r"1\.\.256"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"alora_invocation_tokens": [5]}, "activated LoRA"),
        ({"r": "eight"}, "rank r='eight'"),
        ({"lora_alpha": "big"}, "malformed"),
    ],
)
def test_refused_configs(
    tiny_model: Callable, adapter: Callable, tmp_path: Path, changes: dict, message: str
) -> None:
    path = copy_adapter(adapter, "attention_r8", tmp_path)
    edit_config(path, **changes)
    config = CausalLM.from_dir(tiny_model("llama").path).config
    with pytest.raises(AdapterError, match=message) as error:
        load_adapter(path, config)
    assert error.value.kind == "failed_precondition"


def _rank_mismatch(tensors: dict) -> None:
    tensors[f"{Q0}.lora_B.weight"] = tensors[f"{Q0}.lora_B.weight"][:, :4].contiguous()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(f"{Q0}.lora_B.weight"), "layer 0 q_proj has no lora_B"),
        (_rank_mismatch, r"lora_A \(8, 64\) and lora_B \(64, 4\) do not fit"),
        (
            lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.ones(64)}),
            "DoRA",
        ),
        (
            lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.ones(8, 64)}),
            "target module 'lm_head'",
        ),
        (
            lambda t: t.update(
                {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(8, 200)}
            ),
            "embed_tokens",
        ),
        (
            lambda t: t.update({f"{Q0}.lora_B.bias": torch.ones(64)}),
            "biases",
        ),
        (
            lambda t: t.update(
                {
                    k.replace("layers.0.", "layers.7."): v.clone()
                    for k, v in list(t.items())
                    if "layers.0." in k
                }
            ),
            "layer 7; the base model has 2 layers",
        ),
        (lambda t: t.clear() or t.update({"x": torch.ones(1)}), "unexpected tensor 'x'"),
    ],
)
def test_refused_tensors(
    tiny_model: Callable, adapter: Callable, tmp_path: Path, edit: Callable, message: str
) -> None:
    path = copy_adapter(adapter, "attention_r8", tmp_path)
    edit_tensors(path, edit)
    with pytest.raises(AdapterError, match=message):
        load_adapter(path, CausalLM.from_dir(tiny_model("llama").path).config)


def test_adapter_of_another_base_is_refused(tiny_model: Callable, adapter: Callable) -> None:
    config = CausalLM.from_dir(tiny_model("llama").path).config  # head_dim 16, not 32
    with pytest.raises(AdapterError, match=r"_proj: lora_A .* do not fit the base projection"):
        load_adapter(adapter("all_r16_rslora").path, config)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_dora": True, "target_modules": ["q_proj"]}, "DoRA"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"target_modules": ["embed_tokens"]}, "embed_tokens"),
    ],
)
def test_real_peft_variants_are_refused(
    tiny_model: Callable, tmp_path: Path, options: dict, message: str
) -> None:
    tiny = tiny_model("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    get_peft_model(hf, LoraConfig(r=4, **options)).save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match=message):
        load_adapter(tmp_path, CausalLM.from_dir(tiny.path).config)


def test_missing_and_corrupt_files(tiny_model: Callable, adapter: Callable, tmp_path: Path) -> None:
    config = CausalLM.from_dir(tiny_model("llama").path).config

    def refused(path: Path, message: str, kind: str) -> None:
        with pytest.raises(AdapterError, match=message) as error:
            load_adapter(path, config)
        assert error.value.kind == kind

    refused(tmp_path / "nowhere", "does not exist", "not_found")
    refused(tmp_path, "no adapter_config.json", "not_found")

    path = copy_adapter(adapter, "attention_r8", tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    refused(path, "cannot read .*adapter_model.safetensors", "failed_precondition")
    weights.write_bytes(b"\x00" * 3)
    refused(path, "cannot read", "failed_precondition")
    weights.unlink()
    refused(path, "no adapter_model.safetensors", "not_found")
    (path / "adapter_model.bin").write_bytes(b"pickle")
    refused(path, "pickles are not supported", "not_found")

    config_file = path / "adapter_config.json"
    config_file.write_text("{not json")
    refused(path, "cannot read .*adapter_config.json", "failed_precondition")
    config_file.write_text("[1, 2]")
    refused(path, "not a JSON object", "failed_precondition")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_in_one_call_with_adapters_is_the_layers_one_by_one(
    tiny_model: Callable, adapter: Callable, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mixed batch (one adapter, none, two weighted, adapters on some projection groups
    only) decoded with every layer in one C call, the adapters through the dense C kernel,
    gives the very logits of the layers one by one in Python."""
    model = CausalLM.from_dir(tiny_model("llama").path, dtype)
    attn, mlp, full = (
        load_adapter(adapter(name).path, model.config)
        for name in ("attention_r8", "mlp_r1", "all_r64")
    )
    uses = [((attn, 1.0),), (), ((full, 0.7), (mlp, -1.5)), ((mlp, 1.0),)]
    prompts = [random_tokens(30 + i, 4 + 3 * i) for i in range(len(uses))]
    one_call = CausalLM._decode_in_one_call
    used = []

    def run(fast: bool) -> tuple[list[torch.Tensor], list[list[int]]]:
        def decode_in_one_call(self, *args) -> tuple | None:
            prepared = one_call(self, *args) if fast else None
            # The LM head in the call too.
            used.append(prepared is not None and prepared[2] is not None)
            return prepared

        monkeypatch.setattr(CausalLM, "_decode_in_one_call", decode_in_one_call)
        return Runner(model).run(prompts, uses, NEW_TOKENS)

    expected = run(fast=False)
    used.clear()
    got = run(fast=True)
    assert used == [False] + [True] * (NEW_TOKENS - 1)  # every decode step in one call
    assert got[1] == expected[1]
    for actual, wanted in zip(got[0], expected[0], strict=True):
        assert torch.equal(actual, wanted)
