"""Client side of the CLI (`tandem generate | tokenize | models`, loading and unloading
adapters and experts): grpc and messages only."""

from __future__ import annotations

import sys
from typing import TextIO

import grpc

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc


def stream_generate(
    address: str, request: pb.GenerateRequest, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> None:
    """Write text to `out` as it arrives; logprobs and fusion weights (if asked) and the usage
    to `err` at the end."""
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(request)
        deltas: list[pb.Delta] = []
        try:
            for response in call:
                if response.HasField("delta"):
                    out.write(response.delta.text)
                    out.flush()
                    deltas.append(response.delta)
                else:
                    expert_ids = [ref.expert_id for ref in request.experts]
                    _report_final(response.final, deltas, expert_ids, err)
        except KeyboardInterrupt:
            call.cancel()
            raise


def _report_final(
    final: pb.Final, deltas: list[pb.Delta], expert_ids: list[str], err: TextIO
) -> None:
    for entry in (entry for delta in deltas for entry in delta.logprobs):
        alternatives = " ".join(f"{top.token_id}:{top.logprob:.4f}" for top in entry.top)
        err.write(f"\ntoken {entry.token_id} logprob {entry.logprob:.4f}  {alternatives}".rstrip())
    for token_id, weights in _fused_tokens(deltas):
        pairs = zip(expert_ids, weights.alphas, strict=True)
        alphas = " ".join(f"{expert_id}={alpha:.4f}" for expert_id, alpha in pairs)
        err.write(f"\ntoken {token_id} alphas {alphas}")
    reason = pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
    usage = final.usage
    constrained = ""
    if usage.constraint_checks or usage.constraint_mask_steps:
        constrained = (
            f", {usage.constraint_checks} constraint checks, "
            f"{usage.constraint_mask_steps} full masks"
        )
    if final.HasField("log_weight"):
        constrained += f", log weight {final.log_weight:.3f}"
    cached = f" ({usage.cached_prompt_tokens} cached)" if usage.cached_prompt_tokens else ""
    err.write(
        f"\n[finish: {reason}, prompt {usage.prompt_tokens} tokens{cached}, "
        f"completion {usage.completion_tokens} tokens{constrained}]\n"
    )


def _fused_tokens(deltas: list[pb.Delta]) -> list[tuple[int, pb.FusionWeights]]:
    """(token id, its alphas) of every token, when the server sent fusion weights (one per
    token of a delta, or none when they were not asked for)."""
    return [
        (token_id, weights)
        for delta in deltas
        if delta.fusion
        for token_id, weights in zip(delta.token_ids, delta.fusion, strict=True)
    ]


def tokenize(address: str, model: str, text: str) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        return list(stub.Tokenize(pb.TokenizeRequest(model=model, text=text)).token_ids)


def list_models(address: str) -> list[pb.ModelInfo]:
    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.RegistryStub(channel).ListModels(pb.ListModelsRequest()).models)


def load_adapter(
    address: str, model: str, adapter_id: str, path: str, pin: bool = False
) -> pb.AdapterInfo:
    request = pb.LoadAdapterRequest(adapter_id=adapter_id, path=path, model=model, pin=pin)
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.RegistryStub(channel).LoadAdapter(request).adapter


def unload_adapter(address: str, model: str, adapter_id: str) -> None:
    request = pb.UnloadAdapterRequest(adapter_id=adapter_id, model=model)
    with grpc.insecure_channel(address) as channel:
        pb_grpc.RegistryStub(channel).UnloadAdapter(request)


def load_expert(
    address: str, model: str, expert_id: str, path: str, small_base: str
) -> pb.ExpertInfo:
    request = pb.LoadExpertRequest(
        expert_id=expert_id, path=path, small_base=small_base, model=model
    )
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.RegistryStub(channel).LoadExpert(request).expert


def unload_expert(address: str, model: str, expert_id: str) -> None:
    request = pb.UnloadExpertRequest(expert_id=expert_id, model=model)
    with grpc.insecure_channel(address) as channel:
        pb_grpc.RegistryStub(channel).UnloadExpert(request)
