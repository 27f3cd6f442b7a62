"""`tandem eval`: score a model on a kit task's held-out examples through Tandem's own engine.

Generation is greedy, up to the task's token budget, ending at EOS or the first newline; the
answer is scored by exact match (the same JSON value for JSON tasks). `--task ppl` reports the
perplexity of held-out general text instead.

With `--expert DIR` (repeatable) and `--small-base DIR`, every request fuses those experts into
the model's logits (dynamic logit fusion, engine.fusion) in the `--fusion` mode; several experts
and no hint of the task is the multi-task setting.

With `--sparsity S` the model runs with training-free sparse activation (engine.sparsity: WINA
or TEAL, top-k or calibrated thresholds); the result then says which fraction of the input
channels was really skipped (`skipped`, per group and overall).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

from engine.llm_engine import EngineConfig, LLMEngine
from engine.scoring import token_logprobs
from engine.sparsity import GROUPS, SkipCounter, SparsitySettings, apply_sparsity
from engine.types import FusionMode, FusionRouting, Request, SamplingParams, StoppingCriteria
from kit import tasks
from kit.tasks import ANSWER_STOP, Task

PERPLEXITY_TASK = "ppl"
_EVAL_ADAPTER = "eval-adapter"


@dataclass(frozen=True)
class EvalOptions:
    task: str
    model: str
    adapter: str | None = None
    limit: int | None = None
    dtype: str | None = None
    details: bool = False  # include every example's prompt, output and score
    experts: tuple[str, ...] = ()  # expert directories fused into every request
    small_base: str | None = None  # the experts' small base (needed with experts)
    fusion: str = FusionMode.DYNAMIC.value
    routing: str = FusionRouting.LIKELIHOOD.value
    sparsity: float | None = None  # None: dense
    sparsity_rule: str = "wina"
    sparsity_mode: str = "top-k"
    sparsity_file: str | None = None  # the model's sidecar (tandem calibrate)

    @property
    def sparsity_settings(self) -> SparsitySettings | None:
        if self.sparsity is None:
            return None
        return SparsitySettings(
            self.sparsity, self.sparsity_rule, self.sparsity_mode, self.sparsity_file or ""
        )

    @property
    def fusion_request(self) -> dict[str, object]:
        """The Request fields that fuse the experts (loaded as expert-0, expert-1, ...)."""
        if not self.experts:
            return {}
        return {
            "experts": tuple((f"expert-{i}", None) for i in range(len(self.experts))),
            "fusion_mode": FusionMode(self.fusion),
            "fusion_routing": FusionRouting(self.routing),
        }


def evaluate(options: EvalOptions) -> dict[str, object]:
    """One JSON-ready result: task, n, accuracy (or perplexity), and what was evaluated."""
    engine = _engine(options)
    started = time.monotonic()
    if options.task == PERPLEXITY_TASK:
        result = perplexity(engine, options.limit)
    else:
        adapters = ((_EVAL_ADAPTER, 1.0),) if options.adapter else ()
        result = task_accuracy(
            engine,
            tasks.get_task(options.task),
            options.limit,
            adapters,
            options.details,
            options.fusion_request,
        )
    fusion = {}
    if options.experts:
        fusion = {
            "experts": list(options.experts),
            "small_base": options.small_base,
            "fusion": options.fusion,
            "routing": options.routing,
        }
    return {
        "task": options.task,
        "model": options.model,
        "adapter": options.adapter,
        **fusion,
        **_sparsity_result(options, engine.model.skip_counter),
        **result,
        "seconds": round(time.monotonic() - started, 2),
    }


def _sparsity_result(options: EvalOptions, counter: SkipCounter | None) -> dict[str, object]:
    settings = options.sparsity_settings
    if settings is None:
        return {}
    skipped = {"all": counter.fraction() if counter else 0.0}
    if counter is not None:
        skipped.update({group: counter.fraction(group) for group in GROUPS})
    return {
        "sparsity": settings.sparsity,
        "sparsity_rule": settings.rule,
        "sparsity_mode": settings.mode,
        "sparsity_file": settings.calibration_file or None,
        "skipped": {name: round(value, 4) for name, value in skipped.items()},
    }


def _engine(options: EvalOptions) -> LLMEngine:
    engine = LLMEngine.from_dir(
        options.model, EngineConfig(max_num_seqs=64, kv_cache_bytes=256 << 20, dtype=options.dtype)
    )
    settings = options.sparsity_settings
    if settings is not None:
        apply_sparsity(engine.model, settings)
        engine.model.skip_counter = SkipCounter()
    if options.adapter:
        engine.load_adapter(_EVAL_ADAPTER, options.adapter)
    if options.experts and not options.small_base:
        raise ValueError("experts need their small base (--small-base)")
    for index, expert in enumerate(options.experts):
        engine.load_expert(f"expert-{index}", expert, options.small_base)
    return engine


def task_accuracy(
    engine: LLMEngine,
    task: Task,
    limit: int | None = None,
    adapters: tuple[tuple[str, float], ...] = (),
    details: bool = False,
    fusion: dict[str, object] | None = None,
) -> dict[str, object]:
    """`fusion`: Request fields (experts, fusion_mode, fusion_routing) for every request."""
    examples = tasks.held_out_examples(task)[:limit]
    requests = [
        Request(
            request_id=str(index),
            prompt_token_ids=engine.tokenizer.encode(example.prompt),
            sampling=SamplingParams(temperature=0.0),
            stopping=StoppingCriteria(max_new_tokens=task.max_new_tokens, stop=(ANSWER_STOP,)),
            adapters=adapters,
            **(fusion or {}),
        )
        for index, example in enumerate(examples)
    ]
    outputs = engine.generate(requests)
    scored = [
        (example, outputs[str(index)].text, task.score(outputs[str(index)].text, example.answer))
        for index, example in enumerate(examples)
    ]
    correct = sum(ok for _, _, ok in scored)
    result: dict[str, object] = {
        "n": len(examples),
        "correct": correct,
        "accuracy": correct / len(examples),
    }
    if details:
        result["examples"] = [
            {"prompt": ex.prompt, "answer": ex.answer, "output": out, "correct": ok}
            for ex, out, ok in scored
        ]
    return result


def perplexity(engine: LLMEngine, limit: int | None = None) -> dict[str, object]:
    """exp(mean negative log-likelihood) over every token of the held-out documents after BOS."""
    documents = _perplexity_documents()[:limit]
    total, count = 0.0, 0
    for document in documents:
        ids = [*engine.tokenizer.encode(document), engine.tokenizer.eos_token_ids[0]]
        logprobs = token_logprobs(engine, ids)
        total -= sum(logprobs)
        count += len(logprobs)
    return {"n": len(documents), "tokens": count, "perplexity": math.exp(total / count)}


@functools.cache
def _perplexity_documents() -> tuple[str, ...]:
    # Seconds to compute (it screens out the pretraining stream), and a report asks many times.
    return tuple(tasks.perplexity_documents())
