"""Incremental detokenization with the real 32k SentencePiece and 131k Tekken tokenizers.

Reference: the text of generated ids G after prompt ids P is decode(P + G)[len(decode(P)):].
"""

from __future__ import annotations

import random

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world, this is plain ASCII text.",
    "Café naïve résumé — déjà vu. Größe straße.",
    "Emoji: 🎉🚀 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽.",
    "中文字符和日本語のテキスト、한국어 텍스트도.",
    "Mixed: αβγ ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and\nnew lines\n\n\ttabs   spaces",
]
PROMPTS = ["", "Hello", "Réponds en français :", "数学", "🙂 then"]


@pytest.fixture(params=["sentencepiece", "tekken"])
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")


def reference_text(tokenizer: Tokenizer, prompt: list[int], generated: list[int], skip: bool):
    full = tokenizer.decode(prompt + generated, skip_special_tokens=skip)
    base = tokenizer.decode(prompt, skip_special_tokens=skip)
    assert full.startswith(base), "the reference needs a prompt ending on a character boundary"
    return full[len(base) :]


def detokenize(
    tokenizer: Tokenizer,
    prompt: list[int],
    generated: list[int],
    chunk_sizes: list[int],
    skip: bool = True,
) -> list[str]:
    """Push `generated` in chunks of the given sizes (cycled) and return every piece."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    pieces, start, i = [], 0, 0
    while start < len(generated):
        size = chunk_sizes[i % len(chunk_sizes)]
        pieces.append(detokenizer.push(generated[start : start + size]))
        start, i = start + size, i + 1
    pieces.append(detokenizer.flush())
    return pieces


@pytest.mark.parametrize("prompt_text", PROMPTS)
def test_encoded_text_one_token_at_a_time(tokenizer, prompt_text):
    rng = random.Random(prompt_text)
    prompt = tokenizer.encode(prompt_text)
    for text in TEXTS:
        generated = tokenizer.encode(text, add_special_tokens=False)
        for chunks in ([1], [rng.randint(1, 5) for _ in range(20)]):
            pieces = detokenize(tokenizer, prompt, generated, chunks)
            assert "".join(pieces) == reference_text(tokenizer, prompt, generated, True)
            # Valid text never shows a replacement character, not even transiently.
            assert not any("\ufffd" in piece for piece in pieces)


def test_plain_text_is_not_held_back(tokenizer):
    prompt = tokenizer.encode("Say:")
    generated = tokenizer.encode(" the quick brown fox jumps over the lazy dog", False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    for n, token in enumerate(generated, start=1):
        piece = detokenizer.push([token])
        assert piece == reference_text(tokenizer, prompt, generated[:n], True)[-len(piece) :]
        assert piece  # every word piece is final as soon as it arrives


def test_leading_space_of_the_first_generated_word(sentencepiece_tokenizer):
    # SentencePiece drops the space of a text's first word, but not after a prompt.
    tokenizer = sentencepiece_tokenizer
    prompt = tokenizer.encode("Hello")
    world = tokenizer.encode(" world", add_special_tokens=False)
    assert tokenizer.decode(world) == "world"
    assert "".join(detokenize(tokenizer, prompt, world, [1])) == " world"
    # Only special tokens before: there is no text yet, so no space either.
    assert "".join(detokenize(tokenizer, [tokenizer.bos_token_id], world, [1])) == "world"


def test_space_survives_special_tokens_in_the_context(sentencepiece_tokenizer):
    tokenizer = sentencepiece_tokenizer
    prompt = tokenizer.encode("Hello") + [tokenizer.eos_token_ids[0]] * 8
    world = tokenizer.encode(" world", add_special_tokens=False)
    assert "".join(detokenize(tokenizer, prompt, world, [1])) == " world"


def random_stream(rng: random.Random, tokenizer: Tokenizer, length: int) -> list[int]:
    """Random ids, rich in special tokens and (for SentencePiece) <0xNN> byte tokens."""
    specials = sorted(tokenizer.special_token_ids)[:20]
    byte_tokens = sorted(tokenizer.byte_fallback_token_ids)
    stream = []
    for _ in range(length):
        kind = rng.random()
        if kind < 0.15:
            stream.append(rng.choice(specials))
        elif kind < 0.5 and byte_tokens:
            stream.append(rng.choice(byte_tokens))
        else:
            stream.append(rng.randrange(tokenizer.vocab_size))
    return stream


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_streams(tokenizer, skip_special_tokens):
    rng = random.Random(1234)
    for trial in range(150):
        prompt = tokenizer.encode(rng.choice(PROMPTS))
        generated = random_stream(rng, tokenizer, rng.randint(1, 60))
        chunks = [1] if trial % 2 else [rng.randint(1, 6) for _ in range(30)]
        pieces = detokenize(tokenizer, prompt, generated, chunks, skip_special_tokens)
        expected = reference_text(tokenizer, prompt, generated, skip_special_tokens)
        assert "".join(pieces) == expected, (prompt, generated)


def test_emoji_spelled_in_bytes_is_released_whole(sentencepiece_tokenizer):
    tokenizer = sentencepiece_tokenizer
    party = [tokenizer.backend.token_to_id(f"<0x{b:02X}>") for b in "🎉".encode()]
    ok = tokenizer.encode(" ok", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Go"))
    assert [detokenizer.push([t]) for t in party] == ["", "", "", ""]
    # The byte run could still be spoiled by an invalid byte until a normal token ends it.
    assert detokenizer.push(ok) == "🎉 ok"
    assert detokenizer.flush() == ""


def test_incomplete_character_is_released_by_flush(tekken_tokenizer):
    tokenizer = tekken_tokenizer
    prompt = tokenizer.encode("Go")
    head = tokenizer.encode("🎉", add_special_tokens=False)[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detokenizer.push([t]) for t in head) == ""
    assert detokenizer.flush() == reference_text(tokenizer, prompt, head, True)


class WindowSpy(Tokenizer):
    """The real tokenizer, recording how many ids each decode call is given."""

    def __init__(self, inner: Tokenizer) -> None:
        super().__init__(inner.backend, inner.bos_token_id, inner.eos_token_ids)
        self.window_sizes: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.window_sizes.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_cost_per_token_does_not_grow_with_length(tokenizer):
    spy = WindowSpy(tokenizer)
    prompt = spy.encode("A long prompt " * 50)
    # TEXTS[-1] is left out: SentencePiece spells 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 as 28 byte tokens, a run that
    # must be decoded as a whole before any of it is final.
    generated = spy.encode(" ".join(TEXTS[:-1]) * 10, add_special_tokens=False)
    pieces = detokenize(spy, prompt, generated, [1])
    assert "".join(pieces) == reference_text(tokenizer, prompt, generated, True)
    assert len(generated) > 400
    assert max(spy.window_sizes) <= 16
