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

With `--constraint` every answer is decoded under a constraint (engine.awrs, engine.smc):
`schema` (the task's own JSON schema), `regex:PATTERN` or `json-schema:TEXT|@FILE`. It applies
to the answer after its leading space (the space every kit answer starts with) and lets the
answer end there, with an optional newline; it is compiled as a Lark grammar, so llguidance is
the grammar engine. The result then says how often the answers satisfy it (`constraint_valid`)
and how many constraint checks a token took. JSON tasks always report `schema_valid`: the
fraction of answers that parse and validate against the task's schema (Draft 2020-12).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from engine.grammar import LLGUIDANCE_JSON_LAYOUT
from engine.llm_engine import EngineConfig, LLMEngine
from engine.scoring import token_logprobs
from engine.sparsity import GROUPS, SkipCounter, SparsitySettings, apply_sparsity
from engine.types import (
    Constraint,
    ConstraintKind,
    ConstraintMethod,
    FusionMode,
    FusionRouting,
    GrammarSyntax,
    Request,
    SamplingParams,
    StoppingCriteria,
)
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
    constraint: str | None = None  # "schema", "regex:PATTERN" or "json-schema:TEXT|@FILE"
    constraint_method: str = ConstraintMethod.AWRS.value
    particles: int = 5  # SMC

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
    if options.constraint and options.task == PERPLEXITY_TASK:
        raise ValueError("--constraint applies to a task's answers, not to perplexity")
    answer = (
        AnswerConstraint.parse(options.constraint, tasks.get_task(options.task))
        if options.constraint
        else None
    )
    engine = _engine(options)
    started = time.monotonic()
    if options.task == PERPLEXITY_TASK:
        result = perplexity(engine, options.limit)
    else:
        adapters = ((_EVAL_ADAPTER, 1.0),) if options.adapter else ()
        constraint = None
        if answer is not None:
            method = ConstraintMethod(options.constraint_method)
            constraint = answer.engine_constraint(method, options.particles)
        result = task_accuracy(
            engine,
            tasks.get_task(options.task),
            options.limit,
            adapters,
            options.details,
            options.fusion_request,
            constraint,
            answer,
        )
        if answer is not None:
            result = {
                "constraint": options.constraint,
                "constraint_method": options.constraint_method,
                **result,
            }
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
    constraint: Constraint | None = None,
    answer: AnswerConstraint | None = None,
) -> dict[str, object]:
    """`fusion`: Request fields (experts, fusion_mode, fusion_routing) for every request;
    `constraint`: the engine constraint of every request (`answer`: what it checks)."""
    examples = tasks.held_out_examples(task)[:limit]
    requests = [
        Request(
            request_id=str(index),
            prompt_token_ids=engine.tokenizer.encode(example.prompt),
            sampling=SamplingParams(temperature=0.0),
            stopping=StoppingCriteria(max_new_tokens=task.max_new_tokens, stop=(ANSWER_STOP,)),
            adapters=adapters,
            constraint=constraint,
            **(fusion or {}),
        )
        for index, example in enumerate(examples)
    ]
    outputs = engine.generate(requests)  # the constraint compiles once (cached by content)
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
    texts = [text for _, text, _ in scored]
    if task.json_schema is not None:
        result["schema_valid"] = _fraction(texts, functools.partial(_valid_json, task.json_schema))
    if answer is not None:
        result["constraint_valid"] = _fraction(texts, answer.satisfied_by)
        tokens = sum(len(out.token_ids) for out in outputs.values())
        checks = sum(out.constraint_checks for out in outputs.values())
        masks = sum(out.constraint_mask_steps for out in outputs.values())
        result["constraint_checks_per_token"] = round(checks / max(tokens, 1), 3)
        result["constraint_masks_per_token"] = round(masks / max(tokens, 1), 3)
    if details:
        finish = [outputs[str(index)].finish_reason for index in range(len(examples))]
        result["examples"] = [
            {
                "prompt": ex.prompt,
                "answer": ex.answer,
                "output": out,
                "correct": ok,
                "finish_reason": reason.value if reason else None,
            }
            for (ex, out, ok), reason in zip(scored, finish, strict=True)
        ]
    return result


@dataclass(frozen=True)
class AnswerConstraint:
    """What a task's answers must satisfy after their leading space: a JSON schema or a regex."""

    schema: dict[str, object] | None = None
    regex: str | None = None

    @classmethod
    def parse(cls, value: str, task: Task) -> AnswerConstraint:
        """`schema` (the task's), `regex:PATTERN` or `json-schema:TEXT|@FILE`."""
        if value == "schema":
            if task.json_schema is None:
                raise ValueError(
                    f"task {task.name!r} has no JSON schema; use --constraint regex:PATTERN"
                )
            return cls(schema=task.json_schema)
        kind, _, source = value.partition(":")
        if kind == "regex" and source:
            try:  # a bad pattern is the user's error, said before loading anything
                re.compile(source)
            except re.error as error:
                raise ValueError(f"--constraint regex: {error}") from None
            return cls(regex=source)
        if kind == "json-schema" and source:
            text = Path(source[1:]).read_text() if source.startswith("@") else source
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"--constraint json-schema: not JSON ({error})") from None
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as error:
                raise ValueError(f"--constraint json-schema: {error.message}") from None
            return cls(schema=schema)
        raise ValueError(
            f"--constraint {value!r}: expected schema, regex:PATTERN or json-schema:TEXT|@FILE"
        )

    def engine_constraint(self, method: ConstraintMethod, particles: int) -> Constraint:
        """A Lark grammar: the leading space, the answer, an optional newline (the stop)."""
        if self.schema is not None:
            # The JSON layout of every other JSON constraint (json.dumps's separators).
            layout = {**self.schema, "x-guidance": LLGUIDANCE_JSON_LAYOUT}
            answer = f"%json {json.dumps(layout)}"
        else:
            answer = f"/{self.regex}/"
        grammar = f'start: " " answer NEWLINE?\nanswer: {answer}\nNEWLINE: "\\n"\n'
        return Constraint(
            ConstraintKind.GRAMMAR,
            source=grammar,
            syntax=GrammarSyntax.LARK,
            method=method,
            particles=particles,
        )

    def satisfied_by(self, text: str) -> bool:
        """Whether an answer (as `tandem eval` scores it: up to the newline) satisfies it."""
        if not text.startswith(" "):
            return False
        if self.regex is not None:
            return re.fullmatch(self.regex, text[1:]) is not None
        assert self.schema is not None
        return _valid_json(self.schema, text[1:])


def _valid_json(schema: dict[str, object], text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def _fraction(texts: list[str], accept: Callable[[str], bool]) -> float:
    return sum(accept(text) for text in texts) / max(len(texts), 1)


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
