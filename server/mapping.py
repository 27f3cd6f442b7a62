"""Translation between the public API (tandem.v1 messages) and the engine's request types.

Imports only `engine.types`, which is plain dataclasses: no tensors on this side.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from engine.types import (
    AdapterInfo,
    AdapterState,
    Constraint,
    ConstraintKind,
    ConstraintMethod,
    EngineError,
    ExpertInfo,
    FinishReason,
    FusionMode,
    FusionRouting,
    GrammarBackend,
    GrammarSyntax,
    MergeSpec,
    OutputOptions,
    Request,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
)
from tandem.v1 import tandem_pb2 as pb

_FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
}

_ADAPTER_STATES = {
    AdapterState.ON_DISK: pb.ADAPTER_STATE_ON_DISK,
    AdapterState.HOST: pb.ADAPTER_STATE_HOST,
    AdapterState.DEVICE: pb.ADAPTER_STATE_DEVICE,
}

_STATUS_BY_ERROR_KIND = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


class RequestRejected(Exception):
    """A request the server refuses with `code` before (or instead of) reaching an engine."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_for(error: EngineError) -> grpc.StatusCode:
    return _STATUS_BY_ERROR_KIND.get(error.kind, grpc.StatusCode.INTERNAL)


def prompt_of(request: pb.GenerateRequest) -> str | list[int]:
    """The prompt as text or token ids; exactly one of the two must be given."""
    has_text = request.HasField("text")
    has_ids = len(request.token_ids) > 0
    if has_text == has_ids:
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT,
            "give exactly one of text and token_ids" + (", not both" if has_text else ""),
        )
    return request.text if has_text else list(request.token_ids)


def engine_request(
    request_id: str, request: pb.GenerateRequest, prompt_token_ids: list[int], max_new_tokens: int
) -> Request:
    """`max_new_tokens` is the model's limit; unset in the request means min(default, limit)."""
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        sampling=_sampling(request.sampling),
        stopping=_stopping(request.stopping, max_new_tokens),
        output=_output(request.output),
        # The engine restamps it when it accepts the request; this one covers an abort before.
        arrival_time=time.monotonic(),
        adapters=adapters_of(request),
        experts=experts_of(request),
        fusion_mode=_fusion_mode(request.fusion),
        fusion_routing=_fusion_routing(request.fusion),
        constraint=constraint_of(request),
    )


_CONSTRAINT_METHODS = {
    pb.CONSTRAINT_METHOD_UNSPECIFIED: ConstraintMethod.AWRS,
    pb.CONSTRAINT_METHOD_AWRS: ConstraintMethod.AWRS,
    pb.CONSTRAINT_METHOD_MASK: ConstraintMethod.MASK,
    pb.CONSTRAINT_METHOD_SMC: ConstraintMethod.SMC,
}
_GRAMMAR_SYNTAXES = {
    pb.GRAMMAR_SYNTAX_UNSPECIFIED: GrammarSyntax.EBNF,
    pb.GRAMMAR_SYNTAX_EBNF: GrammarSyntax.EBNF,
    pb.GRAMMAR_SYNTAX_LARK: GrammarSyntax.LARK,
}
_GRAMMAR_ENGINES = {
    pb.GRAMMAR_ENGINE_UNSPECIFIED: None,
    pb.GRAMMAR_ENGINE_XGRAMMAR: GrammarBackend.XGRAMMAR,
    pb.GRAMMAR_ENGINE_LLGUIDANCE: GrammarBackend.LLGUIDANCE,
}
_CONSTRAINT_KINDS = {
    "json_schema": ConstraintKind.JSON_SCHEMA,
    "regex": ConstraintKind.REGEX,
    "grammar": ConstraintKind.GRAMMAR,
    "choice": ConstraintKind.CHOICE,
}


def constraint_of(request: pb.GenerateRequest) -> Constraint | None:
    """The request's constraint; None when it has none. What it says is the engine's to
    check (empty text, particle counts, ...)."""
    if not request.HasField("constraint"):
        return None
    c = request.constraint
    kind = c.WhichOneof("kind")
    if kind is None:
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT,
            "constraint: give one of json_schema, regex, grammar and choice",
        )
    options: dict[str, float] = {}
    if c.HasField("particles"):
        options["particles"] = c.particles
    if c.HasField("ess_threshold"):
        options["ess_threshold"] = c.ess_threshold
    return Constraint(
        kind=_CONSTRAINT_KINDS[kind],
        source="" if kind == "choice" else getattr(c, kind),
        choices=tuple(c.choice.choices) if kind == "choice" else (),
        syntax=_pick(_GRAMMAR_SYNTAXES, c.grammar_syntax, "grammar_syntax"),
        backend=_pick(_GRAMMAR_ENGINES, c.engine, "engine"),
        method=_pick(_CONSTRAINT_METHODS, c.method, "method"),
        **options,
    )


def _pick(table: dict[int, Any], value: int, name: str) -> Any:
    """An enum's engine value; INVALID_ARGUMENT for a number this server does not know."""
    if value not in table:
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT, f"constraint: unknown {name} {value}"
        )
    return table[value]


def adapters_of(request: pb.GenerateRequest) -> tuple[tuple[str, float], ...]:
    """`adapter_id` (weight 1) or `adapter_mix`, not both; () runs the base model. Ids the
    engine does not know, weights that are not finite and repeated ids are the engine's to
    refuse."""
    mix = request.adapter_mix
    if request.HasField("adapter_id"):
        if mix:
            raise RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT, "give adapter_id or adapter_mix, not both"
            )
        if not request.adapter_id:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "adapter_id is empty")
        return ((request.adapter_id, 1.0),)
    if any(not ref.adapter_id for ref in mix):
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT, "adapter_mix has an entry without adapter_id"
        )
    return tuple((ref.adapter_id, ref.weight if ref.HasField("weight") else 1.0) for ref in mix)


def experts_of(request: pb.GenerateRequest) -> tuple[tuple[str, float | None], ...]:
    """(expert id, static alpha or None for the default) per ExpertRef, in request order. Ids
    the engine does not know, repeated ids, mixed small bases and weights that are not finite
    are the engine's to refuse."""
    if any(not ref.expert_id for ref in request.experts):
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT, "experts has an entry without expert_id"
        )
    return tuple(
        (ref.expert_id, ref.weight if ref.HasField("weight") else None) for ref in request.experts
    )


_FUSION_MODES = {
    # Unspecified is dynamic: the mode that needs no weights.
    pb.FUSION_MODE_UNSPECIFIED: FusionMode.DYNAMIC,
    pb.FUSION_MODE_STATIC: FusionMode.STATIC,
    pb.FUSION_MODE_DYNAMIC: FusionMode.DYNAMIC,
}


_FUSION_ROUTINGS = {
    pb.FUSION_ROUTING_UNSPECIFIED: FusionRouting.LIKELIHOOD,
    pb.FUSION_ROUTING_LIKELIHOOD: FusionRouting.LIKELIHOOD,
    pb.FUSION_ROUTING_KL: FusionRouting.KL,
}


def _fusion_mode(fusion: pb.FusionOptions) -> FusionMode:
    if fusion.mode not in _FUSION_MODES:
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT, f"unknown fusion mode {fusion.mode}"
        )
    return _FUSION_MODES[fusion.mode]


def _fusion_routing(fusion: pb.FusionOptions) -> FusionRouting:
    if fusion.routing not in _FUSION_ROUTINGS:
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT, f"unknown fusion routing {fusion.routing}"
        )
    return _FUSION_ROUTINGS[fusion.routing]


def adapter_to_load(request: pb.LoadAdapterRequest) -> tuple[str, str]:
    """(adapter id, path) of a LoadAdapter request; both must be given."""
    for name in ("adapter_id", "path"):
        if not getattr(request, name):
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is required")
    return request.adapter_id, request.path


def expert_to_load(request: pb.LoadExpertRequest) -> tuple[str, str, str]:
    """(expert id, path, small base) of a LoadExpert request; all three must be given."""
    for name in ("expert_id", "path", "small_base"):
        if not getattr(request, name):
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is required")
    return request.expert_id, request.path, request.small_base


_MERGE_METHODS = {
    pb.MERGE_METHOD_UNSPECIFIED: "linear",
    pb.MERGE_METHOD_LINEAR: "linear",
    pb.MERGE_METHOD_SVD: "svd",
    pb.MERGE_METHOD_TIES: "ties",
    pb.MERGE_METHOD_DARE_LINEAR: "dare_linear",
    pb.MERGE_METHOD_DARE_TIES: "dare_ties",
}


def merge_of(request: pb.MergeAdaptersRequest) -> tuple[str, list[tuple[str, float]], MergeSpec]:
    """(new adapter id, (source id, weight) pairs, how) of a MergeAdapters request; the engine
    checks the values (weights, density, rank) against the method."""
    if not request.adapter_id:
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "adapter_id is required")
    if not request.sources:
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "sources is empty")
    if request.method not in _MERGE_METHODS:
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT, f"unknown merge method {request.method}"
        )
    sources = [
        (ref.adapter_id, ref.weight if ref.HasField("weight") else 1.0) for ref in request.sources
    ]
    spec = MergeSpec(
        method=_MERGE_METHODS[request.method],
        density=request.density if request.HasField("density") else 1.0,
        rank=request.rank if request.HasField("rank") else None,
        seed=request.seed,
        pin=request.pin,
    )
    return request.adapter_id, sources, spec


def adapter_info(info: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        adapter_id=info.adapter_id,
        path=info.path,
        rank=info.rank,
        target_modules=info.target_modules,
        state=_ADAPTER_STATES[info.state],
        pinned=info.pinned,
        size_bytes=info.size_bytes,
        num_requests=info.num_requests,
    )


def expert_info(info: ExpertInfo) -> pb.ExpertInfo:
    return pb.ExpertInfo(
        expert_id=info.expert_id,
        path=info.path,
        small_base=info.small_base,
        is_adapter=info.is_adapter,
        num_requests=info.num_requests,
    )


def _sampling(sampling: pb.SamplingParams) -> SamplingParams:
    given = {name: getattr(sampling, name) for name in _SAMPLING_FIELDS if sampling.HasField(name)}
    return SamplingParams(**given)


def _stopping(stopping: pb.StoppingCriteria, max_new_tokens_limit: int) -> StoppingCriteria:
    if stopping.HasField("max_new_tokens"):
        max_new_tokens = stopping.max_new_tokens
    else:
        max_new_tokens = min(StoppingCriteria.max_new_tokens, max_new_tokens_limit)
    return StoppingCriteria(
        max_new_tokens=max_new_tokens,
        stop=tuple(stopping.stop),
        stop_token_ids=tuple(stopping.stop_token_ids),
        ignore_eos=stopping.ignore_eos,
    )


def _output(output: pb.OutputOptions) -> OutputOptions:
    if output.top_logprobs and not output.logprobs:
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT, "output.top_logprobs needs output.logprobs"
        )
    return OutputOptions(
        logprobs=output.logprobs,
        top_logprobs=output.top_logprobs,
        fusion_weights=output.fusion_weights,
        particles=output.particles,
    )


def responses(request_id: str, output: RequestOutput) -> list[pb.GenerateResponse]:
    """One delta for the step's tokens (if any), then the final when the request finished."""
    messages = []
    if output.token_ids or output.text:
        messages.append(pb.GenerateResponse(request_id=request_id, delta=_delta(output)))
    if output.finish_reason is not None:
        final = _final(output, output.finish_reason)
        messages.append(pb.GenerateResponse(request_id=request_id, final=final))
    return messages


def _delta(output: RequestOutput) -> pb.Delta:
    return pb.Delta(
        token_ids=output.token_ids,
        text=output.text,
        logprobs=[
            pb.TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
            )
            for lp in output.logprobs
        ],
        fusion=[pb.FusionWeights(alphas=alphas) for alphas in output.fusion_weights],
    )


def _final(output: RequestOutput, reason: FinishReason) -> pb.Final:
    final = pb.Final(
        finish_reason=_FINISH_REASONS[reason],
        usage=pb.Usage(
            prompt_tokens=output.prompt_tokens,
            completion_tokens=output.completion_tokens,
            cached_prompt_tokens=output.cached_prompt_tokens,
            constraint_checks=output.constraint_checks,
            constraint_mask_steps=output.constraint_mask_steps,
        ),
        particles=[
            pb.Particle(token_ids=p.token_ids, text=p.text, log_weight=p.log_weight)
            for p in output.particles
        ],
    )
    if output.log_weight is not None:
        final.log_weight = output.log_weight
    return final
