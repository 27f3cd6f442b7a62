"""The `tandem` command: `serve`, `prepare`, `calibrate`, the clients `generate`, `tokenize`,
`models`, `load-adapter`, `unload-adapter`, `load-expert`, `unload-expert`, and the model kit's
`kit build`, `kit report` and `eval`.

The client commands never import the engine (or torch), so they start instantly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import grpc

from kit.cli import add_commands as add_kit_commands
from server import client
from server.config import (
    WARMUP_DELAY_ENV,
    EngineOptions,
    ServerConfig,
    parse_adapter_spec,
    parse_expert_spec,
    parse_model_spec,
    parse_sparsity_specs,
    warmup_delay_from_env,
)
from tandem.v1 import tandem_pb2 as pb

DEFAULT_ADDRESS = "127.0.0.1:50051"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_serve(commands)
    prepare = commands.add_parser(
        "prepare", help="build the model kit (served by default) if missing"
    )
    prepare.set_defaults(command=_prepare)
    _add_calibrate(commands)
    _add_generate(commands)
    tokenize = commands.add_parser("tokenize", help="print the token ids of a text")
    tokenize.add_argument("text")
    tokenize.add_argument("--model", default="", help="model id (optional with one model)")
    tokenize.add_argument("--address", default=DEFAULT_ADDRESS)
    tokenize.set_defaults(command=_tokenize)
    models = commands.add_parser("models", help="list the served models")
    models.add_argument("--address", default=DEFAULT_ADDRESS)
    models.set_defaults(command=_models)
    _add_adapter_commands(commands)
    _add_expert_commands(commands)
    add_kit_commands(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve models over gRPC",
        epilog=f"{WARMUP_DELAY_ENV}=SECONDS delays each warm-up (tests use it to observe "
        "health NOT_SERVING).",
    )
    serve.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="model directory; its id is the directory's name unless NAME= is given; repeat "
        "for several models; none serves the model kit's base-large",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0: any free)")
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running streams may take to finish",
    )
    serve.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        metavar="TOKENS",
        help="tokens per streamed delta after the first (default 1): fewer messages cost the "
        "server and its clients less CPU per token, each gRPC message about 100 us of each",
    )
    serve.add_argument("--max-prompt-tokens", type=int)
    serve.add_argument("--max-new-tokens", type=int)
    serve.add_argument("--max-queue", type=int, help="requests waiting beyond the running batch")
    serve.add_argument("--max-num-seqs", type=int, help="sequences in one batch")
    serve.add_argument("--max-batched-tokens", type=int, help="tokens per step (prefill chunk)")
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        help="an idle engine's first request waits for others while they follow each other "
        "within this time, so a burst is prefilled together (default 3; 0: never waits)",
    )
    serve.add_argument("--kv-cache-mb", type=int, help="KV cache size per model")
    serve.add_argument(
        "--expert-kv-cache-mb",
        type=int,
        help="KV pool of each small base: its rows and its experts' (default 256)",
    )
    serve.add_argument("--block-size", type=int, help="tokens per KV cache block")
    serve.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="prefill every prompt in full, never taking the KV blocks of an earlier request's "
        "identical prefix",
    )
    serve.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="default: the checkpoint's"
    )
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[MODEL:]ID=DIR",
        help="load a PEFT LoRA adapter at start (MODEL: is needed with several models); repeat",
    )
    serve.add_argument(
        "--adapter-slots",
        type=int,
        help="adapters held stacked for the forward pass, also the most distinct adapters "
        "running at once (default 16)",
    )
    serve.add_argument(
        "--adapter-host-cache",
        type=int,
        help="adapters whose tensors stay in host memory; the others wait on disk (default 128)",
    )
    serve.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="[MODEL:]ID=DIR@SMALL_BASE_DIR",
        help="load a small expert at start: a full model or a PEFT adapter directory, and the "
        "small model it was tuned from (MODEL: is needed with several models); repeat",
    )
    serve.add_argument(
        "--merged-adapter-dir",
        metavar="DIR",
        help="where MergeAdapters writes new adapters (default $TANDEM_HOME/adapters)",
    )
    _add_sparsity_flags(serve)
    serve.add_argument(
        "--engine-in-process",
        action="store_true",
        help="run each engine on a thread of the server's process instead of a process of its "
        "own (debugging; slower where the server writes many streams)",
    )
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(command=_serve)


def _add_sparsity_flags(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "sparse activation",
        "skip the input channels of each attention and MLP projection whose activation is "
        "negligible (WINA or TEAL; off by default). Each flag takes MODEL= to set one model "
        "only; without it, it applies to every model that sets none",
    )
    group.add_argument(
        "--sparsity",
        action="append",
        default=[],
        metavar="[MODEL=]FRACTION",
        help="fraction of input channels skipped, e.g. 0.4 (0: dense, bit for bit)",
    )
    group.add_argument(
        "--sparsity-file",
        action="append",
        default=[],
        metavar="[MODEL=]FILE",
        help="the model's sidecar from `tandem calibrate` (needed by --sparsity-mode threshold)",
    )
    group.add_argument(
        "--sparsity-rule",
        action="append",
        default=[],
        metavar="[MODEL=]wina|teal",
        help="keep channels by |x_j| * ||W[:, j]|| (wina, default) or |x_j| (teal)",
    )
    group.add_argument(
        "--sparsity-mode",
        action="append",
        default=[],
        metavar="[MODEL=]top-k|threshold",
        help="per token exactly the fraction (top-k, default) or calibrated thresholds",
    )


def _add_calibrate(commands: argparse._SubParsersAction) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="write a model's sparsity sidecar (column norms, activation thresholds)",
        description="Run the model over calibration text and write, for `tandem serve "
        "--sparsity S --sparsity-file FILE`, each projection group's column norms and the "
        "quantiles of its input scores (WINA and TEAL), from which any sparsity's thresholds "
        "are read at start.",
    )
    calibrate.add_argument("--model", required=True, metavar="DIR", help="model directory")
    calibrate.add_argument("--out", required=True, metavar="FILE", help="sidecar to write")
    calibrate.add_argument(
        "--text",
        metavar="FILE",
        help="calibration text, documents separated by blank lines (default: the model "
        "kit's general corpus)",
    )
    calibrate.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    calibrate.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    calibrate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    calibrate.set_defaults(command=_calibrate)


def _add_adapter_commands(commands: argparse._SubParsersAction) -> None:
    load = commands.add_parser("load-adapter", help="load a PEFT LoRA adapter into the server")
    load.add_argument("adapter_id")
    load.add_argument("path", help="PEFT directory, as the server sees it")
    load.add_argument("--model", default="", help="model id (optional with one model)")
    load.add_argument("--pin", action="store_true", help="never evict it from host memory")
    load.add_argument("--address", default=DEFAULT_ADDRESS)
    load.set_defaults(command=_load_adapter)
    unload = commands.add_parser("unload-adapter", help="unload an adapter from the server")
    unload.add_argument("adapter_id")
    unload.add_argument("--model", default="", help="model id (optional with one model)")
    unload.add_argument("--address", default=DEFAULT_ADDRESS)
    unload.set_defaults(command=_unload_adapter)


def _add_expert_commands(commands: argparse._SubParsersAction) -> None:
    load = commands.add_parser("load-expert", help="load a small expert into the server")
    load.add_argument("expert_id")
    load.add_argument("path", help="full model or PEFT adapter directory, as the server sees it")
    load.add_argument(
        "--small-base",
        required=True,
        metavar="DIR",
        help="the small model the expert was tuned from (its anti-expert)",
    )
    load.add_argument("--model", default="", help="model id (optional with one model)")
    load.add_argument("--address", default=DEFAULT_ADDRESS)
    load.set_defaults(command=_load_expert)
    unload = commands.add_parser("unload-expert", help="unload an expert from the server")
    unload.add_argument("expert_id")
    unload.add_argument("--model", default="", help="model id (optional with one model)")
    unload.add_argument("--address", default=DEFAULT_ADDRESS)
    unload.set_defaults(command=_unload_expert)


def _add_generate(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="stream a completion to the terminal")
    generate.add_argument("prompt")
    generate.add_argument("--model", default="", help="model id (optional with one model)")
    generate.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="ID[=WEIGHT]",
        help="LoRA adapter; repeat (or give a weight) for a weighted mix of adapters",
    )
    generate.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="ID[=WEIGHT]",
        help="small expert fused into the logits; repeat for several (WEIGHT: static mode only)",
    )
    generate.add_argument(
        "--fusion", choices=("static", "dynamic"), help="how experts are fused (default dynamic)"
    )
    generate.add_argument(
        "--routing",
        choices=("likelihood", "kl"),
        help="dynamic fusion with several experts: which steers each step (default likelihood)",
    )
    generate.add_argument(
        "--show-fusion-weights",
        action="store_true",
        help="print each token's expert alphas after the text (to stderr)",
    )
    _add_constraint_options(generate)
    generate.add_argument("--address", default=DEFAULT_ADDRESS)
    generate.add_argument("--request-id", default="")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--min-p", type=float)
    generate.add_argument("--repetition-penalty", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="extend", nargs="+", default=[], metavar="STR")
    generate.add_argument("--stop-token-id", action="extend", nargs="+", type=int, default=[])
    generate.add_argument("--ignore-eos", action="store_true", default=None)
    generate.add_argument(
        "--logprobs",
        type=int,
        metavar="N",
        help="print each token's logprob and its N best alternatives",
    )
    generate.set_defaults(command=_generate)


def _add_constraint_options(generate: argparse.ArgumentParser) -> None:
    kinds = generate.add_mutually_exclusive_group()
    kinds.add_argument("--json-schema", metavar="SCHEMA", help="JSON schema (text or @FILE)")
    kinds.add_argument("--regex", help="the output must match this regular expression")
    kinds.add_argument("--grammar", metavar="GRAMMAR", help="EBNF (or --lark) grammar, or @FILE")
    kinds.add_argument(
        "--choice", action="append", metavar="TEXT", help="the output is one of these (repeat)"
    )
    generate.add_argument("--lark", action="store_true", help="--grammar is in Lark syntax")
    generate.add_argument(
        "--constraint-method", choices=("awrs", "mask", "smc"), help="default awrs"
    )
    generate.add_argument("--particles", type=int, help="SMC particles (default 5)")
    generate.add_argument(
        "--grammar-engine", choices=("xgrammar", "llguidance"), help="default: xgrammar first"
    )


_CONSTRAINT_METHODS = {
    None: pb.CONSTRAINT_METHOD_UNSPECIFIED,
    "awrs": pb.CONSTRAINT_METHOD_AWRS,
    "mask": pb.CONSTRAINT_METHOD_MASK,
    "smc": pb.CONSTRAINT_METHOD_SMC,
}
_GRAMMAR_ENGINES = {
    None: pb.GRAMMAR_ENGINE_UNSPECIFIED,
    "xgrammar": pb.GRAMMAR_ENGINE_XGRAMMAR,
    "llguidance": pb.GRAMMAR_ENGINE_LLGUIDANCE,
}


def _constraint(args: argparse.Namespace) -> pb.Constraint | None:
    """The --json-schema / --regex / --grammar / --choice constraint; None without one."""
    kind: dict[str, object] = {}
    if args.json_schema is not None:
        kind["json_schema"] = _text_or_file(args.json_schema)
    elif args.regex is not None:
        kind["regex"] = args.regex
    elif args.grammar is not None:
        kind["grammar"] = _text_or_file(args.grammar)
        if args.lark:
            kind["grammar_syntax"] = pb.GRAMMAR_SYNTAX_LARK
    elif args.choice:
        kind["choice"] = pb.Choices(choices=args.choice)
    else:
        return None
    return pb.Constraint(
        **kind,
        method=_CONSTRAINT_METHODS[args.constraint_method],
        particles=args.particles,
        engine=_GRAMMAR_ENGINES[args.grammar_engine],
    )


def _text_or_file(value: str) -> str:
    return Path(value[1:]).read_text() if value.startswith("@") else value


def _prefer_passive_openmp_waits() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the environment chose: in the server, the event loop and
    gRPC's threads need the cores that spinning OpenMP workers would hold between parallel
    regions (measured: batch-8 decode steps 15% slower with spinning workers, the same speed
    as the bare engine with passive ones). OpenMP reads it once, when torch loads it."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = ServerConfig(
            models=tuple(parse_model_spec(value) for value in args.model),
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            drain_timeout_s=args.drain_timeout,
            stream_interval=args.stream_interval,
            engine=EngineOptions(
                kv_cache_mb=args.kv_cache_mb,
                expert_kv_cache_mb=args.expert_kv_cache_mb,
                max_prompt_tokens=args.max_prompt_tokens,
                max_new_tokens=args.max_new_tokens,
                max_queue=args.max_queue,
                max_num_seqs=args.max_num_seqs,
                max_batched_tokens=args.max_batched_tokens,
                batch_wait_ms=args.batch_wait_ms,
                block_size=args.block_size,
                dtype=args.dtype,
                adapter_slots=args.adapter_slots,
                adapter_host_cache=args.adapter_host_cache,
                prefix_caching=not args.no_prefix_caching,
                sparsity=parse_sparsity_specs(
                    args.sparsity, args.sparsity_file, args.sparsity_rule, args.sparsity_mode
                ),
                own_process=not args.engine_in_process,
            ),
            warmup_delay_s=warmup_delay_from_env(),
            adapters=tuple(parse_adapter_spec(value) for value in args.adapter),
            experts=tuple(parse_expert_spec(value) for value in args.expert),
            merged_adapter_dir=args.merged_adapter_dir,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ids = [spec.model_id for spec in config.models]
    if len(set(ids)) != len(ids):
        print(f"error: model ids must be unique, got {', '.join(ids)}", file=sys.stderr)
        return 2
    unknown = _unserved_sparsity_models(config)
    if unknown:
        print(f"error: --sparsity* name models not served: {', '.join(unknown)}", file=sys.stderr)
        return 2
    _prefer_passive_openmp_waits()
    # Imported here: the server's modules (and, with --engine-in-process, the engine's and
    # torch), which the client commands never need.
    from server.app import EngineFailed, StartupError, serve

    log = logging.getLogger("tandem")
    try:
        asyncio.run(serve(config))
    except (StartupError, EngineFailed) as error:
        log.error("%s", error)
        return 1
    except Exception:
        log.exception("the server failed")
        return 1
    return 0


def _unserved_sparsity_models(config: ServerConfig) -> list[str]:
    served = {spec.model_id for spec in config.models}
    if not served:
        from server.engines import DEFAULT_KIT_MODEL

        served = {DEFAULT_KIT_MODEL}
    return [s.model for s in config.engine.sparsity if s.model and s.model not in served]


def _calibrate(args: argparse.Namespace) -> int:
    # Imported here: it loads the engine (and torch).
    from engine.types import EngineError
    from server.engines import calibrate_to_file

    def progress(message: str) -> None:
        print(f"[tandem calibrate] {message}", file=sys.stderr, flush=True)

    try:
        header = calibrate_to_file(
            args.model,
            args.out,
            tokens=args.tokens,
            seq_len=args.seq_len,
            text_file=args.text,
            dtype=args.dtype,
            progress=progress,
        )
    except (OSError, ValueError, EngineError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}\t{header['tokens']} tokens\t{header['text']}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from server.engines import default_model_spec

    print(default_model_spec().path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    try:
        adapters = _adapter_fields(args.adapter)
        experts = _expert_refs(args.expert)
        constraint = _constraint(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    request = pb.GenerateRequest(
        request_id=args.request_id,
        model=args.model,
        text=args.prompt,
        **adapters,
        experts=experts,
        fusion=pb.FusionOptions(
            mode=_FUSION_MODES[args.fusion], routing=_FUSION_ROUTINGS[args.routing]
        ),
        sampling=pb.SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        ),
        stopping=pb.StoppingCriteria(
            max_new_tokens=args.max_new_tokens,
            stop=args.stop,
            stop_token_ids=args.stop_token_id,
            ignore_eos=args.ignore_eos,
        ),
        output=pb.OutputOptions(
            logprobs=args.logprobs is not None,
            top_logprobs=args.logprobs or None,
            fusion_weights=args.show_fusion_weights,
        ),
        constraint=constraint,
    )
    client.stream_generate(args.address, request)
    return 0


def _adapter_fields(values: list[str]) -> dict[str, object]:
    """One `ID` is `adapter_id`; several, or any with `=WEIGHT`, are `adapter_mix`."""
    refs = []
    for value in values:
        adapter_id, sep, weight = value.partition("=")
        try:
            refs.append(pb.AdapterRef(adapter_id=adapter_id, weight=float(weight) if sep else None))
        except ValueError:
            raise ValueError(f"--adapter {value!r}: expected ID or ID=WEIGHT") from None
    if len(refs) == 1 and not refs[0].HasField("weight"):
        return {"adapter_id": refs[0].adapter_id}
    return {"adapter_mix": refs}


_FUSION_MODES = {
    None: pb.FUSION_MODE_UNSPECIFIED,
    "static": pb.FUSION_MODE_STATIC,
    "dynamic": pb.FUSION_MODE_DYNAMIC,
}
_FUSION_ROUTINGS = {
    None: pb.FUSION_ROUTING_UNSPECIFIED,
    "likelihood": pb.FUSION_ROUTING_LIKELIHOOD,
    "kl": pb.FUSION_ROUTING_KL,
}


def _expert_refs(values: list[str]) -> list[pb.ExpertRef]:
    """`ID` or `ID=WEIGHT` per --expert; an unset weight is the server's default (1.0)."""
    refs = []
    for value in values:
        expert_id, sep, weight = value.partition("=")
        try:
            refs.append(pb.ExpertRef(expert_id=expert_id, weight=float(weight) if sep else None))
        except ValueError:
            raise ValueError(f"--expert {value!r}: expected ID or ID=WEIGHT") from None
    return refs


def _tokenize(args: argparse.Namespace) -> int:
    print(" ".join(map(str, client.tokenize(args.address, args.model, args.text))))
    return 0


def _models(args: argparse.Namespace) -> int:
    for model in client.list_models(args.address):
        print(
            f"{model.id}\tvocab_size={model.vocab_size}\t"
            f"max_prompt_tokens={model.max_prompt_tokens}\tmax_new_tokens={model.max_new_tokens}"
            f"\tadapter_slots={model.adapter_slots}\tadapter_host_cache={model.adapter_host_cache}"
            f"{_sparsity_field(model)}"
        )
        for adapter in model.adapters:
            print(f"  adapter {_adapter_line(adapter)}")
        for expert in model.experts:
            print(f"  expert {_expert_line(expert)}")
    return 0


def _sparsity_field(model: pb.ModelInfo) -> str:
    if not model.HasField("sparsity"):
        return ""
    info = model.sparsity
    rule = pb.SparsityRule.Name(info.rule).removeprefix("SPARSITY_RULE_").lower()
    mode = pb.SparsityMode.Name(info.mode).removeprefix("SPARSITY_MODE_").lower()
    return f"\tsparsity={info.sparsity:g},{rule},{mode.replace('_', '-')}"


def _adapter_line(adapter: pb.AdapterInfo) -> str:
    state = pb.AdapterState.Name(adapter.state).removeprefix("ADAPTER_STATE_").lower()
    return (
        f"{adapter.adapter_id}\tstate={state}\trank={adapter.rank}\t"
        f"targets={','.join(adapter.target_modules)}\tsize_bytes={adapter.size_bytes}\t"
        f"pinned={str(adapter.pinned).lower()}\trequests={adapter.num_requests}\t{adapter.path}"
    )


def _expert_line(expert: pb.ExpertInfo) -> str:
    kind = "adapter" if expert.is_adapter else "model"
    return (
        f"{expert.expert_id}\tkind={kind}\trequests={expert.num_requests}\t"
        f"small_base={expert.small_base}\t{expert.path}"
    )


def _load_adapter(args: argparse.Namespace) -> int:
    adapter = client.load_adapter(args.address, args.model, args.adapter_id, args.path, args.pin)
    print(_adapter_line(adapter))
    return 0


def _unload_adapter(args: argparse.Namespace) -> int:
    client.unload_adapter(args.address, args.model, args.adapter_id)
    return 0


def _load_expert(args: argparse.Namespace) -> int:
    expert = client.load_expert(
        args.address, args.model, args.expert_id, args.path, args.small_base
    )
    print(_expert_line(expert))
    return 0


def _unload_expert(args: argparse.Namespace) -> int:
    client.unload_expert(args.address, args.model, args.expert_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
