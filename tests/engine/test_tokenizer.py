"""Tokenizer loading against independent implementations: sentencepiece, mistral_common, HF."""

from __future__ import annotations

import json
import os
import shutil
from importlib.resources import files
from pathlib import Path

import pytest
import sentencepiece
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from transformers import AutoTokenizer

from engine.tokenizer import Tokenizer, build_sentencepiece_tokenizer_dir
from engine.types import UnsupportedModel

DATA = Path(str(files("mistral_common") / "data"))
TEXTS = [
    "Hello world",
    "naïve café, déjà vu — Größe",
    "emoji 🎉 and family 👩‍👩‍👧 and flags 🇫🇷",
    "中文字符和日本語のテキスト",
    "line one\nline two\n\n\ttabbed",
]
# Runs of spaces are merged differently by HF's conversion than by the sentencepiece library.
CODE = "code: def f(x):\n    return x ** 2  # square"


@pytest.fixture(scope="module")
def sentencepiece_reference() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(
        model_file=str(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    )


@pytest.fixture(scope="module")
def tekken_reference() -> Tekkenizer:
    return Tekkenizer.from_file(str(DATA / "tekken_240911.json"))


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_matches_sentencepiece_library(
    sentencepiece_tokenizer, sentencepiece_reference, text
):
    reference = sentencepiece_reference
    ids = sentencepiece_tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text)
    assert sentencepiece_tokenizer.decode(ids) == reference.decode(ids) == text


@pytest.mark.parametrize("text", [*TEXTS, CODE])
def test_tekken_matches_mistral_common(tekken_tokenizer, tekken_reference, text):
    reference = tekken_reference
    ids = tekken_tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, bos=False, eos=False)
    assert tekken_tokenizer.encode(text) == reference.encode(text, bos=True, eos=False)
    assert tekken_tokenizer.decode(ids) == text


def test_vocabulary_and_special_tokens(sentencepiece_tokenizer, tekken_tokenizer):
    for tokenizer, vocab_size in ((sentencepiece_tokenizer, 32768), (tekken_tokenizer, 131072)):
        assert tokenizer.vocab_size == vocab_size
        assert tokenizer.bos_token_id == 1
        assert tokenizer.eos_token_ids == (2,)
        assert tokenizer.convert_ids_to_tokens([1, 2]) == ["<s>", "</s>"]
        ids = tokenizer.encode("Hi")
        assert ids[0] == 1 and tokenizer.encode("Hi", add_special_tokens=False) == ids[1:]
        assert tokenizer.decode([1, *ids[1:], 2]) == "Hi"
    # SentencePiece spells bytes as <0xNN> tokens and decodes them with ByteFallback.
    assert len(sentencepiece_tokenizer.byte_fallback_token_ids) == 256
    assert not tekken_tokenizer.byte_fallback_token_ids


def test_agrees_with_transformers_on_leading_spaces(sentencepiece_tokenizer_dir):
    # HF's converted tokenizer differs from the sentencepiece library on leading whitespace;
    # transformers is the project's reference, so follow it.
    ours = Tokenizer.from_dir(sentencepiece_tokenizer_dir)
    theirs = AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir)
    for text in [" leading space", "  two", "\nnewline first", CODE, *TEXTS]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, False) == theirs.decode(ids, skip_special_tokens=False)


def test_converts_a_sentencepiece_model_without_tokenizer_json(sentencepiece_tokenizer, tmp_path):
    shutil.copyfile(
        DATA / "mistral_instruct_tokenizer_240323.model.v3", tmp_path / "tokenizer.model"
    )
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    converted = Tokenizer.from_dir(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()  # converted in memory, directory untouched
    for text in TEXTS:
        assert converted.encode(text) == sentencepiece_tokenizer.encode(text)


def test_eos_ids_come_from_every_config(sentencepiece_tokenizer_dir, tmp_path):
    shutil.copytree(sentencepiece_tokenizer_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9, "bos_token_id": 1}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (2, 7, 9)


def test_directory_without_tokenizer_is_rejected(tmp_path):
    with pytest.raises(UnsupportedModel):
        Tokenizer.from_dir(tmp_path)


def test_builder_skips_a_complete_directory(sentencepiece_tokenizer_dir):
    marker = Path(sentencepiece_tokenizer_dir) / "tokenizer.json"
    before = os.stat(marker).st_mtime_ns
    assert (
        build_sentencepiece_tokenizer_dir(sentencepiece_tokenizer_dir)
        == sentencepiece_tokenizer_dir
    )
    assert os.stat(marker).st_mtime_ns == before
    assert not [p for p in os.listdir(sentencepiece_tokenizer_dir) if p.startswith(".build-")]
