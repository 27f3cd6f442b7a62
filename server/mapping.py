"""Translation between the public API (tandem.v1 messages) and the engine's request types.

Imports only `engine.types`, which is plain dataclasses: no tensors on this side.
"""

from __future__ import annotations

import time

import grpc

from engine.types import (
    EngineError,
    FinishReason,
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

_STATUS_BY_ERROR_KIND = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
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


def reject_unsupported(request: pb.GenerateRequest, model_id: str) -> None:
    """Adapters, experts and constraints arrive in later releases; say so instead of ignoring."""
    if request.HasField("adapter_id"):
        raise RequestRejected(
            grpc.StatusCode.NOT_FOUND,
            f"adapter {request.adapter_id!r} is not loaded on model {model_id!r}",
        )
    if request.experts:
        raise RequestRejected(
            grpc.StatusCode.NOT_FOUND,
            f"expert {request.experts[0].expert_id!r} is not loaded for model {model_id!r}",
        )
    if request.HasField("constraint"):
        raise RequestRejected(
            grpc.StatusCode.UNIMPLEMENTED, "constraint: constrained decoding is not available yet"
        )


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
    return OutputOptions(logprobs=output.logprobs, top_logprobs=output.top_logprobs)


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
    )


def _final(output: RequestOutput, reason: FinishReason) -> pb.Final:
    return pb.Final(
        finish_reason=_FINISH_REASONS[reason],
        usage=pb.Usage(
            prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens
        ),
    )
