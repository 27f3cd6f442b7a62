"""The kit's `tandem` subcommands: `kit build`, `kit report`, `eval`.

Only argparse at import time: `tandem generate` and friends must start instantly.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_commands(commands: argparse._SubParsersAction) -> None:
    kit = commands.add_parser("kit", help="the built-in model kit")
    kit_commands = kit.add_subparsers(required=True, metavar="KIT_COMMAND")
    build = kit_commands.add_parser("build", help="train the model kit (cached; 10-20 min once)")
    build.add_argument("--out", help="build into this directory instead of the cache")
    build.set_defaults(command=_build)
    report = kit_commands.add_parser("report", help="accuracy of every kit member, per task")
    report.add_argument("--kit", help="kit directory (default: build or find the cached kit)")
    report.add_argument("--limit", type=int, help="test examples per task (default: all)")
    report.add_argument("--out", help="also write the markdown tables to this file")
    report.add_argument(
        "--fusion-only", action="store_true", help="only the weak-to-strong fusion tables"
    )
    report.add_argument(
        "--sparsity",
        choices=("top-k", "threshold"),
        metavar="MODE",
        help="only the sparse-activation table (WINA vs TEAL on base-large) in this mode: "
        "top-k or threshold",
    )
    report.add_argument(
        "--sparsity-file",
        metavar="FILE",
        help="base-large's sidecar for --sparsity threshold (default: calibrate it first)",
    )
    report.set_defaults(command=_report)
    _add_eval(commands)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval", help="score a model on a kit task's held-out examples, through the engine"
    )
    evaluate.add_argument("--task", required=True, help="a kit task name, or 'ppl'")
    evaluate.add_argument("--model", required=True, metavar="DIR", help="model directory")
    evaluate.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter on the model")
    evaluate.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="DIR",
        help="expert fused into the model's logits (repeat: all offered, multi-task setting)",
    )
    evaluate.add_argument("--small-base", metavar="DIR", help="the experts' small base")
    evaluate.add_argument("--fusion", choices=("static", "dynamic"), default="dynamic")
    evaluate.add_argument(
        "--routing",
        choices=("likelihood", "kl"),
        default="likelihood",
        help="dynamic fusion with several experts: which one steers each step",
    )
    evaluate.add_argument(
        "--sparsity", type=float, metavar="S", help="sparse activation: fraction skipped"
    )
    evaluate.add_argument("--sparsity-rule", choices=("wina", "teal"), default="wina")
    evaluate.add_argument("--sparsity-mode", choices=("top-k", "threshold"), default="top-k")
    evaluate.add_argument(
        "--sparsity-file", metavar="FILE", help="the model's sidecar (tandem calibrate)"
    )
    evaluate.add_argument(
        "--constraint",
        metavar="SPEC",
        help="decode every answer under a constraint: schema (the task's JSON schema), "
        "regex:PATTERN or json-schema:TEXT|@FILE (the answer after its leading space)",
    )
    evaluate.add_argument("--constraint-method", choices=("awrs", "mask", "smc"), default="awrs")
    evaluate.add_argument("--particles", type=int, default=5, help="SMC particles")
    evaluate.add_argument("--limit", type=int, help="first N held-out examples")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    evaluate.add_argument(
        "--details", action="store_true", help="include every example's output and score"
    )
    evaluate.add_argument(
        "--json", action="store_true", help="print one JSON object (the default output too)"
    )
    evaluate.set_defaults(command=_eval)


def _build(args: argparse.Namespace) -> int:
    from kit.build import build_kit, default_kit_dir

    try:
        print(build_kit(args.out) if args.out else default_kit_dir())
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _report(args: argparse.Namespace) -> int:
    from kit.build import default_kit_dir
    from kit.report import write_table

    table = write_table(
        args.kit or default_kit_dir(),
        args.out,
        args.limit,
        args.fusion_only,
        sparsity_mode=args.sparsity,
        sparsity_file=args.sparsity_file,
    )
    print(table, end="")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from engine.types import EngineError
    from kit.evaluate import EvalOptions, evaluate

    options = EvalOptions(
        task=args.task,
        model=args.model,
        adapter=args.adapter,
        limit=args.limit,
        dtype=args.dtype,
        details=args.details,
        experts=tuple(args.expert),
        small_base=args.small_base,
        fusion=args.fusion,
        routing=args.routing,
        sparsity=args.sparsity,
        sparsity_rule=args.sparsity_rule,
        sparsity_mode=args.sparsity_mode,
        sparsity_file=args.sparsity_file,
        constraint=args.constraint,
        constraint_method=args.constraint_method,
        particles=args.particles,
    )
    try:
        result = evaluate(options)
    except (EngineError, KeyError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
