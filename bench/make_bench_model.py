"""Write the benchmark model: a Qwen2.5-0.5B-shaped Qwen2ForCausalLM with random bf16 weights.

Only the shapes matter for decode speed, so the weights are random (fixed seed) and the
vocabulary is a real tokenizer shipped in mistral_common, which keeps the LM head and embedding
sizes realistic: the 32768-token SentencePiece one (the default), or the 131072-token Tekken one
(`--vocab tekken131k`, for constrained decoding where the vocabulary's size matters). The
directory is cached under bench/.cache/. `--shape llama3.2-1b-6l` writes a LlamaForCausalLM with
Llama-3.2-1B's widths (hidden 2048, MLP 8192, 32 query and 8 KV heads, tied embeddings) and 6 of
its 16 layers instead: weight rows of 4 KB, which the dense kernel treats apart at batch 8 and 16.

    python bench/make_bench_model.py [--vocab sp32k|tekken131k] [--shape NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / "bench" / ".cache"
# vocabulary name -> (size, engine.tokenizer function that writes the tokenizer files)
VOCABS = {
    "sp32k": (32768, "build_sentencepiece_tokenizer_dir"),
    "tekken131k": (131072, "build_tekken_tokenizer_dir"),
}
SEED = 1234
# The weights file is moved into place last, so its presence means the directory is complete.
COMPLETE_MARKER = "model.safetensors"


SHAPES = ("qwen2.5-0.5b", "llama3.2-1b-6l")


def model_dir(vocab: str, shape: str = SHAPES[0]) -> Path:
    return CACHE_DIR / f"{shape}-shape-{vocab}"


def qwen25_05b_config(vocab: str = "sp32k"):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCABS[vocab][0],  # the tokenizer's size, not Qwen's 151936
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        # transformers' default; keeps random activations and logits in a sane range
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )


def llama32_1b_config(vocab: str = "sp32k", layers: int = 6):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCABS[vocab][0],
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )


def _write_model(tmp: Path, vocab: str, shape: str) -> None:
    import torch
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    from engine import tokenizer

    getattr(tokenizer, VOCABS[vocab][1])(tmp)
    torch.manual_seed(SEED)
    if shape == "qwen2.5-0.5b":
        model = Qwen2ForCausalLM(qwen25_05b_config(vocab))
    else:
        model = LlamaForCausalLM(llama32_1b_config(vocab))
    model.to(torch.bfloat16).save_pretrained(str(tmp))


def build_bench_model(
    out_dir: str | os.PathLike[str] | None = None, vocab: str = "sp32k", shape: str = SHAPES[0]
) -> str:
    """Write the model to out_dir (default: model_dir(vocab, shape)) unless it is already
    complete; return the directory."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    out = Path(out_dir) if out_dir is not None else model_dir(vocab, shape)
    if (out / COMPLETE_MARKER).is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        _write_model(tmp, vocab, shape)
        out.mkdir(exist_ok=True)
        names = sorted(os.listdir(tmp), key=lambda name: name == COMPLETE_MARKER)
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", choices=sorted(VOCABS), default="sp32k")
    parser.add_argument("--shape", choices=SHAPES, default=SHAPES[0])
    parser.add_argument("--out", help="model directory (default: bench/.cache/, by vocabulary)")
    args = parser.parse_args()
    print(build_bench_model(args.out, args.vocab, args.shape))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # engine/ when run as a script
    main()
