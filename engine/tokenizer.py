"""Tokenizer loading (HF model directories) and builders for the real tokenizers used in tests.

Encoding and decoding go straight through the Rust `tokenizers` library; transformers is only
used to convert a SentencePiece `tokenizer.model` into a `tokenizer.json` when a directory has
no `tokenizer.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from importlib.resources import files
from pathlib import Path

import tokenizers

from engine.types import UnsupportedModel

# `tokenizer.json` is moved into place last, so its presence means the directory is complete.
_COMPLETE_MARKER = "tokenizer.json"
_SENTENCEPIECE_MODEL = "mistral_instruct_tokenizer_240323.model.v3"
_TEKKEN_JSON = "tekken_240911.json"


def _mistral_common_data(name: str) -> Path:
    return Path(str(files("mistral_common") / "data" / name))


def _build_atomically(out_dir: str | os.PathLike[str], write: Callable[[Path], None]) -> str:
    """Run `write(tmp_dir)` and move its files into `out_dir`, the completion marker last.

    Each move is an atomic rename, so concurrent builders (other test workers) never see a
    half-written file, and a directory with the marker is never rebuilt.
    """
    out = Path(out_dir)
    if (out / _COMPLETE_MARKER).is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        write(tmp)
        names = sorted(os.listdir(tmp), key=lambda name: name == _COMPLETE_MARKER)
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _write_sentencepiece(tmp: Path) -> None:
    from transformers import AutoTokenizer

    source = tmp / "source"
    source.mkdir()
    shutil.copyfile(_mistral_common_data(_SENTENCEPIECE_MODEL), source / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_bos_token = True  # as Mistral's own HF repos do
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(source)


def _write_tekken(tmp: Path) -> None:
    from transformers.integrations.mistral import convert_tekken_tokenizer

    tokenizer = convert_tekken_tokenizer(str(_mistral_common_data(_TEKKEN_JSON)))
    tokenizer.add_bos_token = True  # as Mistral's own HF repos do
    tokenizer.save_pretrained(str(tmp))


def build_sentencepiece_tokenizer_dir(out_dir: str | os.PathLike[str]) -> str:
    """Write the 32768-token Mistral SentencePiece tokenizer (`tokenizer.json`, adds BOS)."""
    return _build_atomically(out_dir, _write_sentencepiece)


def build_tekken_tokenizer_dir(out_dir: str | os.PathLike[str]) -> str:
    """Write the 131072-token Mistral Tekken tokenizer (`tokenizer.json`, adds BOS)."""
    return _build_atomically(out_dir, _write_tekken)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(entry: str | dict | None) -> str | None:
    """tokenizer_config.json stores special tokens either as strings or as AddedToken dicts."""
    return entry.get("content") if isinstance(entry, dict) else entry


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _load_backend(model_dir: Path) -> tokenizers.Tokenizer:
    if (model_dir / "tokenizer.json").is_file():
        return tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if (model_dir / "tokenizer.model").is_file():
        # SentencePiece only: transformers converts it to a fast tokenizer in memory once.
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer
    raise UnsupportedModel(f"{model_dir} has neither tokenizer.json nor tokenizer.model")


def _uses_byte_fallback(backend: tokenizers.Tokenizer) -> bool:
    def types(node: object) -> Iterable[str]:
        if isinstance(node, dict):
            yield str(node.get("type"))
            for child in node.get("decoders", ()):
                yield from types(child)

    return backend.decoder is not None and "ByteFallback" in types(
        json.loads(backend.decoder.__getstate__())
    )


class Tokenizer:
    """A model's tokenizer, backed by the Rust `tokenizers` library."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_token_ids = frozenset(
            token_id
            for token_id, token in backend.get_added_tokens_decoder().items()
            if token.special
        )
        # With a ByteFallback decoder, a run of <0xNN> tokens decodes as a unit: one invalid
        # byte turns the whole run into U+FFFD, so text ending in such a run is not final yet.
        byte_tokens = [backend.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        self.byte_fallback_token_ids = (
            frozenset(i for i in byte_tokens if i is not None)
            if _uses_byte_fallback(backend)
            else frozenset()
        )

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        """Load from a Hugging Face model directory.

        EOS ids are the union, in this order, of tokenizer_config.json's `eos_token`,
        generation_config.json's `eos_token_id` and config.json's `eos_token_id`.
        """
        path = Path(model_dir)
        backend = _load_backend(path)
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        generation_config = _read_json(path / "generation_config.json")
        model_config = _read_json(path / "config.json")

        def token_id(entry: str | dict | None) -> int | None:
            content = _token_content(entry)
            return backend.token_to_id(content) if content else None

        eos_ids = [token_id(tokenizer_config.get("eos_token"))]
        eos_ids += _as_id_list(generation_config.get("eos_token_id"))
        eos_ids += _as_id_list(model_config.get("eos_token_id"))
        bos_candidates = [
            token_id(tokenizer_config.get("bos_token")),
            generation_config.get("bos_token_id"),
            model_config.get("bos_token_id"),
        ]
        return cls(
            backend,
            bos_token_id=next((i for i in bos_candidates if i is not None), None),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]
