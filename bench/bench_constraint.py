"""Constrained decoding: AWRS against full vocabulary masks (design.md section 7, issue 6).

1. End to end on the model kit's ft-record (a trained model, SentencePiece 32k): the record
   task's held-out prompts under its JSON schema, sampled (temperature 1, one seed per prompt),
   unconstrained / AWRS / MASK in turn, same batch: tokens/s, and for AWRS the constraint checks
   per token (median, p99) and how often a walk ended with a full mask (after all its candidates,
   or once its checks would cost more than a mask: engine.grammar.GrammarCosts).
2. Per-token constraint time with the 32k and the 131k (Tekken) vocabularies: the AWRS outputs
   of part 1 are re-tokenized with each vocabulary and replayed through xgrammar; at every
   state: the time of xgrammar's full mask, of llguidance's full mask, and of one check
   (accept + rollback). AWRS's time at a state is its check time times the number of checks
   part 1 made at that position of its outputs, plus xgrammar's full mask there where part 1's
   walk ended with one (an estimate at 131k: no trained model there).
3. Compile time p50/p99 over the dev schemas (tests/data/jsonschemabench-dev), xgrammar
   (through the compile worker, serialization included) and llguidance, both vocabularies,
   and how many each compiles.

Prints figures, asserts nothing.

    python bench/bench_constraint.py [--kit DIR] [--prompts 16] [--schemas 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = REPO_ROOT / "tests" / "data" / "jsonschemabench-dev"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


Steps = list[tuple[int, bool]]  # per generated token: (constraint checks, ended with a mask)


Outputs = list[tuple[Steps, list[int], str]]


def end_to_end(kit: Path, prompts: int) -> dict[str, Outputs]:
    """Part 1; returns the outputs of AWRS and of AWRS with full walks (every candidate checked
    before a mask, the walk of earlier sessions): (checks and mask per token, token ids, text).
    Both sample the same tokens; only their checks differ."""
    from engine.grammar import GrammarCosts
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.types import (
        Constraint,
        ConstraintKind,
        ConstraintMethod,
        Request,
        SamplingParams,
        StoppingCriteria,
    )
    from kit.tasks import get_task, held_out_examples

    task = get_task("record")
    examples = held_out_examples(task)[:prompts]
    engine = LLMEngine.from_dir(str(kit / "ft-record"), EngineConfig(max_num_seqs=prompts))
    schema = json.dumps(task.json_schema)
    engine.compile_constraint(Constraint(ConstraintKind.JSON_SCHEMA, schema))
    modes = {
        "warm-up": None,  # first forwards, kernel loading: not timed against the others
        "unconstrained": None,
        # Full walks first: they time the grammar's checks and masks, so AWRS then walks with
        # its limit from the first token on, as a server that has seen the schema before.
        "awrs-full-walks": Constraint(ConstraintKind.JSON_SCHEMA, schema),
        "awrs": Constraint(ConstraintKind.JSON_SCHEMA, schema),
        "mask": Constraint(ConstraintKind.JSON_SCHEMA, schema, method=ConstraintMethod.MASK),
    }
    walk_limit = GrammarCosts.walk_limit
    print(f"[1] ft-record, {prompts} record prompts in one batch, temperature 1", flush=True)
    checks: dict[str, Outputs] = {}
    base_rate = None
    for name, constraint in modes.items():
        requests = [
            Request(
                request_id=f"{name}-{i}",
                prompt_token_ids=engine.tokenizer.encode(example.prompt),
                sampling=SamplingParams(temperature=1.0, seed=i),
                stopping=StoppingCriteria(max_new_tokens=task.max_new_tokens, stop=("\n",)),
                constraint=constraint,
            )
            for i, example in enumerate(examples)
        ]
        per_token: dict[str, Steps] = {r.request_id: [] for r in requests}
        full_walks = name == "awrs-full-walks"
        GrammarCosts.walk_limit = (lambda _, n: n) if full_walks else walk_limit  # type: ignore
        for request in requests:
            engine.add_request(request)
        start, tokens, outputs, ids = time.perf_counter(), 0, {}, {}
        while engine.has_unfinished():
            walking = [seq for seq in engine.scheduler.running if seq.constraint is not None]
            before = [(seq.constraint.checks, seq.constraint.mask_steps) for seq in walking]
            for out in engine.step():
                tokens += len(out.token_ids)
                outputs[out.request_id] = outputs.get(out.request_id, "") + out.text
                ids[out.request_id] = ids.get(out.request_id, []) + out.token_ids
            for seq, (checked, masked) in zip(walking, before, strict=True):
                state = seq.constraint
                if state.checks > checked or state.mask_steps > masked:
                    steps = per_token[seq.request_id]
                    steps.append((state.checks - checked, state.mask_steps > masked))
        rate = tokens / (time.perf_counter() - start)
        if name == "warm-up":
            continue
        base_rate = base_rate or rate
        valid = sum(_is_json(text) for text in outputs.values())
        line = f"    {name:14s} {rate:7.1f} tok/s ({rate / base_rate:.2f}x)"
        line += f"  valid JSON {valid}/{prompts}"
        if name.startswith("awrs"):
            flat = [c for steps in per_token.values() for c, _ in steps]
            masks = sum(m for steps in per_token.values() for _, m in steps)
            line += (
                f"  checks/token median {statistics.median(flat):.0f} p99 "
                f"{_percentile(flat, 0.99):.0f} (vocabulary {engine.tokenizer.vocab_size}),"
                f" {masks} of {len(flat)} tokens ended with a full mask"
            )
            checks[name] = [
                (per_token[f"{name}-{i}"], ids[f"{name}-{i}"], outputs[f"{name}-{i}"])
                for i in range(prompts)
            ]
        print(line, flush=True)
    GrammarCosts.walk_limit = walk_limit  # type: ignore[method-assign]
    engine.constraints.close()
    return checks


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def per_token_time(tokenizer_dir: str, schema: str, runs: dict[str, Outputs], native: bool) -> None:
    """Part 2 for one vocabulary; `native`: the outputs' own token ids (else re-encoded)."""
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    from engine.grammar import LLGUIDANCE_JSON_LAYOUT
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    vocab = tokenizer.vocab_size
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[2])
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False)
    ll_tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    ll_grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults=LLGUIDANCE_JSON_LAYOUT
    )
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    mask_x, mask_l = [], []
    awrs: dict[str, list[float]] = {name: [] for name in runs}
    for name, outputs in runs.items():
        for steps, token_ids, text in outputs:
            ids = token_ids if native else tokenizer.encode(text, add_special_tokens=False)
            xm = xgrammar.GrammarMatcher(compiled)
            lm = llguidance.LLMatcher(ll_tokenizer, ll_grammar)
            for position, token in enumerate(ids):
                t0 = time.perf_counter()
                xm.fill_next_token_bitmask(bitmask)
                t1 = time.perf_counter()
                llguidance.torch.fill_next_token_bitmask(lm, bitmask)
                t2 = time.perf_counter()
                if not xm.accept_token(token):
                    break  # the text's tokenization under this vocabulary leaves the grammar
                xm.rollback(1)
                t3 = time.perf_counter()
                xm.accept_token(token)
                lm.consume_token(token)
                checks, masked = steps[position] if position < len(steps) else (1, False)
                if name == "awrs":  # the masks once: both runs replay the same tokens
                    mask_x.append(t1 - t0)
                    mask_l.append(t2 - t1)
                awrs[name].append(max(checks, 1) * (t3 - t2) + (t1 - t0 if masked else 0.0))
    print(f"    vocabulary {vocab}: {len(mask_x)} states")
    for name, times in (("xgrammar mask", mask_x), ("llguidance mask", mask_l), *awrs.items()):
        print(
            f"      {name:16s} p50 {1e6 * _percentile(times, 0.5):8.1f} us  "
            f"p99 {1e6 * _percentile(times, 0.99):8.1f} us"
        )
    for name, times in awrs.items():
        print(
            f"      {name} p99 / xgrammar-mask p99: "
            f"{_percentile(times, 0.99) / _percentile(mask_x, 0.99):.3f}",
            flush=True,
        )


def compile_times(tokenizer_dir: str, limit: int) -> None:
    """Part 3 for one vocabulary."""
    from engine.grammar import CompileLimits, ConstraintCompiler
    from engine.tokenizer import Tokenizer
    from engine.types import Constraint, ConstraintKind, GrammarBackend, InvalidRequest

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    compiler = ConstraintCompiler(
        tokenizer, tokenizer.vocab_size, (2,), CompileLimits(timeout_s=60.0, cache_size=0)
    )
    compiler.prepare()
    files = sorted(SCHEMAS.glob("*.json"))[:: max(1, 300 // limit)][:limit]
    for backend in (GrammarBackend.XGRAMMAR, GrammarBackend.LLGUIDANCE):
        times, failed = [], 0
        for i, path in enumerate(files):
            constraint = Constraint(ConstraintKind.JSON_SCHEMA, path.read_text(), backend=backend)
            start = time.perf_counter()
            try:
                compiler.compile(constraint).matcher()
            except InvalidRequest:
                failed += 1
            times.append(time.perf_counter() - start)
            print(f"\r      {backend.value}: {i + 1}/{len(files)}", end="", flush=True)
        print(
            f"\r    vocabulary {tokenizer.vocab_size} {backend.value:10s}: compiled "
            f"{len(files) - failed}/{len(files)}, p50 {1e3 * _percentile(times, 0.5):.0f} ms, "
            f"p99 {1e3 * _percentile(times, 0.99):.0f} ms",
            flush=True,
        )
    compiler.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, help="kit directory (default: the built-in kit)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--schemas", type=int, default=60, help="0 skips the compile times")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    from engine.tokenizer import build_tekken_tokenizer_dir
    from kit.build import default_kit_dir
    from kit.tasks import get_task

    kit = args.kit or Path(default_kit_dir())
    outputs = end_to_end(kit, args.prompts)
    cache = REPO_ROOT / "bench" / ".cache"
    vocabularies = {
        "32k": str(kit / "ft-record"),  # the kit's own SentencePiece vocabulary
        "131k": build_tekken_tokenizer_dir(cache / "tekken"),
    }
    schema = json.dumps(get_task("record").json_schema)
    print("[2] per-token constraint time, replaying the AWRS outputs", flush=True)
    for name, directory in vocabularies.items():
        per_token_time(directory, schema, outputs, native=name == "32k")
    if args.schemas > 0:  # 0: parts 1 and 2 only
        print(f"[3] compile time over {args.schemas} dev schemas", flush=True)
        for directory in vocabularies.values():
            compile_times(directory, args.schemas)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
