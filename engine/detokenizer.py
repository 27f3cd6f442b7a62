"""Incremental detokenization: turn a stream of generated token ids into text pieces.

Reference text. For prompt ids P and generated ids G, the text of G is

    decode(P + G)[len(decode(P)):]

(with the detokenizer's `skip_special_tokens`). Decoding in the context of the prompt matters for
SentencePiece, whose decoder drops the leading space of the first word of a string: "▁world"
alone decodes to "world" but to " world" after "Hello". The concatenation of every piece returned
by `push` and `flush` equals the reference text whenever decode(P) is a prefix of decode(P + G),
i.e. whenever the prompt ends on a character boundary (always true for prompts made by `encode`).

Method (vLLM's prefix/read offsets). Keep two offsets into the ids: text up to `read_offset` has
been returned, and the tokens in [prefix_offset, read_offset) are a small context window. Each
step decodes only that window with and without the new tokens and returns the difference, so the
cost per token does not grow with the sequence. The difference is held back while it ends with
U+FFFD (an incomplete UTF-8 sequence that later tokens may complete) or, for ByteFallback
tokenizers, while the last decoded token is a <0xNN> byte token (a later invalid byte would turn
the whole byte run into U+FFFD).
"""

from __future__ import annotations

import copy

from engine.tokenizer import Tokenizer

# Prompt tokens decoded as context before the first generated token (vLLM uses the same 5).
_INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def fork(self) -> IncrementalDetokenizer:
        """An independent copy (for SMC particles); the tokenizer is shared."""
        child = copy.copy(self)
        child._ids = list(self._ids)
        return child

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skipped = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._skip_special_tokens = skip_special_tokens
        # The whole prompt is kept (ids are cheap) so the context window can widen into it.
        self._ids = list(prompt_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = self._window_start(
            max(self._read_offset - _INITIAL_CONTEXT_TOKENS, 0)
        )

    def push(self, token_ids: list[int]) -> str:
        """Add generated tokens; return the text they finalize (possibly empty)."""
        self._ids.extend(token_ids)
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or not self._is_final(new_text):
            return ""
        self._advance()
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return all held-back text, final or not (call once generation has ended)."""
        prefix_text, new_text = self._decode_window()
        self._advance()
        return new_text[len(prefix_text) :]

    def _advance(self) -> None:
        # The text just returned becomes the context of the next step.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def _decode_window(self) -> tuple[str, str]:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        # An empty context cannot tell SentencePiece that the next word is not the first one
        # of the text (its leading space would be dropped): widen it until it yields text.
        while not prefix_text and self._prefix_offset > 0:
            self._prefix_offset = self._window_start(self._prefix_offset - 1)
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return prefix_text, self._decode(self._ids[self._prefix_offset :])

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _window_start(self, start: int) -> int:
        """Move `start` back so the window does not begin inside a run of byte-fallback tokens.

        Skipped special tokens do not end such a run: the decoder never sees them.
        """
        byte_tokens = self._tokenizer.byte_fallback_token_ids
        if not byte_tokens:
            return start
        while start > 0 and (
            self._ids[start - 1] in byte_tokens or self._ids[start - 1] in self._skipped
        ):
            start -= 1
        return start

    def _is_final(self, text: str) -> bool:
        if text.endswith(_REPLACEMENT_CHAR):
            return False
        return self._last_decoded_token() not in self._tokenizer.byte_fallback_token_ids

    def _last_decoded_token(self) -> int | None:
        return next((i for i in reversed(self._ids) if i not in self._skipped), None)
