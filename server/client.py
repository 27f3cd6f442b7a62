"""Client side of the CLI (`tandem generate | tokenize | models`): grpc and messages only."""

from __future__ import annotations

import sys
from typing import TextIO

import grpc

from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc


def stream_generate(
    address: str, request: pb.GenerateRequest, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> None:
    """Write text to `out` as it arrives; logprobs (if asked) and the usage to `err` at the end."""
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(request)
        logprobs: list[pb.TokenLogprob] = []
        try:
            for response in call:
                if response.HasField("delta"):
                    out.write(response.delta.text)
                    out.flush()
                    logprobs.extend(response.delta.logprobs)
                else:
                    _report_final(response.final, logprobs, err)
        except KeyboardInterrupt:
            call.cancel()
            raise


def _report_final(final: pb.Final, logprobs: list[pb.TokenLogprob], err: TextIO) -> None:
    for entry in logprobs:
        alternatives = " ".join(f"{top.token_id}:{top.logprob:.4f}" for top in entry.top)
        err.write(f"\ntoken {entry.token_id} logprob {entry.logprob:.4f}  {alternatives}".rstrip())
    reason = pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
    usage = final.usage
    err.write(
        f"\n[finish: {reason}, prompt {usage.prompt_tokens} tokens, "
        f"completion {usage.completion_tokens} tokens]\n"
    )


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
