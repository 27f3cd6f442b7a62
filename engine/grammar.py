"""Constraints compiled into grammar matchers: xgrammar by default, llguidance as the alternative.

A `Matcher` follows one sequence: `check(token)` says whether the token may come next without
changing the state (what AWRS calls per proposed token), `accept(token)` advances,
`fill_bitmask` writes the full vocabulary mask (MASK, and AWRS's fallback), `fork` copies the
state (SMC particles). End of sequence is a token like any other: the matchers know the model's
EOS ids and accept one only where the constraint can end, after which `is_terminated` is True.

Compilation is bounded. xgrammar compiles in a worker process (one per compiler) that is killed
when it runs past `timeout_s` or `max_memory_bytes` of resident memory: some real-world schemas
take minutes. The worker also catches the warnings xgrammar prints when it cannot represent a
schema exactly (e.g. `oneOf` read as `anyOf`, ignored `minLength`): such a grammar would let
through outputs the schema rejects, so it is refused. llguidance bounds itself (parser "fuel"
limits) and refuses features it does not implement. With no backend named, a constraint that
xgrammar refuses, relaxes or times out on is compiled by llguidance. Results, failures
included, are cached by content so a repeated bad schema costs nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar, Protocol

import numpy as np
import torch

from engine.tokenizer import Tokenizer
from engine.types import (
    Constraint,
    ConstraintKind,
    GrammarBackend,
    GrammarSyntax,
    InvalidRequest,
)


@dataclass
class GrammarCosts:
    """Running means of what one compiled grammar's operations take (seconds), shared by all its
    matchers: AWRS stops a walk of rejected checks once more checks would cost more than the
    full mask that ends the walk anyway (engine/awrs.py)."""

    check_seconds: float = 0.0
    mask_seconds: float = 0.0

    SMOOTHING: ClassVar[float] = 0.1  # weight of each new measurement

    def add_checks(self, count: int, seconds: float) -> None:
        if count > 0:
            self.check_seconds = _running_mean(self.check_seconds, seconds / count)

    def add_mask(self, seconds: float) -> None:
        self.mask_seconds = _running_mean(self.mask_seconds, seconds)

    def walk_limit(self, candidates: int) -> int:
        """Checks worth making before the full mask: as many as one mask costs (at least one,
        at most `candidates`); all candidates until both costs have been measured."""
        if self.check_seconds <= 0.0 or self.mask_seconds <= 0.0:
            return candidates
        return max(1, min(candidates, math.ceil(self.mask_seconds / self.check_seconds)))


def _running_mean(mean: float, value: float) -> float:
    return value if mean <= 0.0 else mean + GrammarCosts.SMOOTHING * (value - mean)


class Matcher(Protocol):
    vocab_size: int  # the width of the bitmask it fills
    costs: GrammarCosts  # shared by the matchers of one compiled grammar

    def check(self, token: int) -> bool: ...

    def accept(self, token: int) -> None: ...

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...

    def is_terminated(self) -> bool: ...

    def fork(self) -> Matcher: ...


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """int32 [rows, ceil(V / 32)]: bit j of word w allows token 32 w + j (both engines' layout)."""
    return torch.zeros((rows, -(-vocab_size // 32)), dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, V] from allocate_bitmask's layout."""
    # Little-endian words: byte b of word w holds tokens 32 w + 8 b ..., lowest bit first.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
    return torch.from_numpy(bits[:, :vocab_size].view(np.bool_))


class _XGrammarMatcher:
    def __init__(self, matcher: Any, vocab_size: int, costs: GrammarCosts) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.costs = costs

    def check(self, token: int) -> bool:
        # xgrammar has no side-effect-free test: accept, then undo.
        if self._matcher.accept_token(token):
            self._matcher.rollback(1)
            return True
        return False

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise InvalidRequest(f"token {token} does not satisfy the constraint")

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def fork(self) -> _XGrammarMatcher:
        return _XGrammarMatcher(self._matcher.fork(), self.vocab_size, self.costs)


class _LLGuidanceMatcher:
    """llguidance stops by itself once nothing but the end can follow, and its token test does
    not cover EOS: end of sequence is handled here (allowed iff the matcher accepts)."""

    def __init__(
        self, matcher: Any, vocab_size: int, eos_token_ids: frozenset[int], costs: GrammarCosts
    ) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.costs = costs
        self._eos = eos_token_ids
        self._ended = False

    def check(self, token: int) -> bool:
        if token in self._eos:
            return not self._ended and self._can_end()
        return self._matcher.validate_tokens([token]) == 1

    def _can_end(self) -> bool:
        # A matcher that hit a limit is stopped too, in error: that is no place to end.
        if self._matcher.is_error():
            return False
        return self._matcher.is_stopped() or self._matcher.is_accepting()

    def accept(self, token: int) -> None:
        if not self.check(token):
            raise InvalidRequest(f"token {token} does not satisfy the constraint")
        if token in self._eos:
            self._ended = True
            return
        if not self._matcher.consume_token(token) or self._matcher.is_error():
            raise InvalidRequest(f"token {token} does not satisfy the constraint")

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        import llguidance.torch

        if self._ended or self._matcher.is_stopped():
            bitmask[row] = 0
        else:
            llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)
        for token in self._eos:
            word, bit = divmod(token, 32)
            value = int(bitmask[row, word]) & ~(1 << bit)
            if self._can_end() and not self._ended:
                value |= 1 << bit
            bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value

    def is_terminated(self) -> bool:
        return self._ended

    def fork(self) -> _LLGuidanceMatcher:
        child = _LLGuidanceMatcher(
            self._matcher.deep_copy(), self.vocab_size, self._eos, self.costs
        )
        child._ended = self._ended
        return child


@dataclass(frozen=True)
class CompiledConstraint:
    backend: GrammarBackend
    vocab_size: int
    _grammar: Any  # xgrammar.CompiledGrammar, or an llguidance grammar string
    _tokenizer: Any = None  # llguidance.LLTokenizer
    _limits: Any = None
    _eos_token_ids: frozenset[int] = frozenset()
    costs: GrammarCosts = field(default_factory=GrammarCosts, compare=False)

    def matcher(self) -> Matcher:
        if self.backend is GrammarBackend.XGRAMMAR:
            import xgrammar

            matcher = xgrammar.GrammarMatcher(self._grammar)
            return _XGrammarMatcher(matcher, self.vocab_size, self.costs)
        import llguidance

        matcher = llguidance.LLMatcher(
            self._tokenizer, self._grammar, log_level=0, limits=self._limits
        )
        if matcher.is_error():
            raise InvalidRequest(f"constraint: {matcher.get_error()}")
        return _LLGuidanceMatcher(matcher, self.vocab_size, self._eos_token_ids, self.costs)


@dataclass(frozen=True)
class CompileLimits:
    timeout_s: float = 10.0
    max_memory_bytes: int = 4 << 30
    cache_size: int = 256


class ConstraintCompiler:
    """Compiles constraints for one tokenizer and vocabulary (thread-safe, blocking)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        limits: CompileLimits | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.limits = limits or CompileLimits()
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._lock = threading.Lock()  # one compilation at a time: one worker
        self._cache_lock = threading.Lock()  # hits never wait for a compilation
        self._cache: OrderedDict[str, CompiledConstraint | InvalidRequest] = OrderedDict()
        self._xgrammar_info: Any = None
        self._llguidance_tokenizer: Any = None
        self._worker: _XGrammarWorker | None = None

    def prepare(self) -> None:
        """Build both engines' views of the vocabulary and start the worker (seconds with a
        131k vocabulary): a server does it at start, not on its first constrained request."""
        with self._lock:
            self._xgrammar_worker()
            self._llguidance()

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """Raises InvalidRequest for a constraint that does not compile within the limits."""
        key = _cache_key(constraint)
        result = self._cached(key)
        if result is None:
            with self._lock:
                result = self._cached(key)  # compiled by another thread meanwhile?
                if result is None:
                    try:
                        result = self._compile(constraint)
                    except InvalidRequest as exc:
                        result = exc
                    with self._cache_lock:
                        self._cache[key] = result
                        if len(self._cache) > self.limits.cache_size:
                            self._cache.popitem(last=False)
        if isinstance(result, InvalidRequest):
            raise InvalidRequest(str(result))
        return result

    def _cached(self, key: str) -> CompiledConstraint | InvalidRequest | None:
        with self._cache_lock:
            result = self._cache.get(key)
            if result is not None:
                self._cache.move_to_end(key)
            return result

    def _compile(self, constraint: Constraint) -> CompiledConstraint:
        backend = constraint.backend
        if constraint.syntax is GrammarSyntax.LARK and constraint.kind is ConstraintKind.GRAMMAR:
            backend = GrammarBackend.LLGUIDANCE
        if backend is GrammarBackend.LLGUIDANCE:
            return self._compile_llguidance(constraint)
        try:
            return self._compile_xgrammar(constraint)
        except InvalidRequest as xgrammar_error:
            if backend is GrammarBackend.XGRAMMAR:
                raise
            try:
                return self._compile_llguidance(constraint)
            except InvalidRequest as llguidance_error:
                second = str(llguidance_error).removeprefix("constraint: ")
                raise InvalidRequest(f"{xgrammar_error}; {second}") from None

    # ---- xgrammar ------------------------------------------------------------------------------

    def _xgrammar_worker(self) -> _XGrammarWorker:
        if self._xgrammar_info is None:
            import xgrammar

            self._xgrammar_info = xgrammar.TokenizerInfo.from_huggingface(
                _hf_tokenizer(self._tokenizer),
                vocab_size=self.vocab_size,
                stop_token_ids=self._eos,
            )
        if self._worker is None or not self._worker.alive():
            self._worker = _XGrammarWorker(self._xgrammar_info.serialize_json())
        return self._worker

    def _compile_xgrammar(self, constraint: Constraint) -> CompiledConstraint:
        import xgrammar

        worker = self._xgrammar_worker()
        job = {"kind": constraint.kind.value, "source": _xgrammar_source(constraint)}
        try:
            serialized = worker.compile(job, self.limits)
        except _WorkerLost as exc:
            self._worker = None
            raise InvalidRequest(f"constraint: xgrammar: {exc}") from None
        grammar = xgrammar.CompiledGrammar.deserialize_json(serialized, self._xgrammar_info)
        return CompiledConstraint(GrammarBackend.XGRAMMAR, self.vocab_size, grammar)

    # ---- llguidance --------------------------------------------------------------------------

    def _llguidance(self) -> Any:
        if self._llguidance_tokenizer is None:
            import llguidance.hf

            self._llguidance_tokenizer = llguidance.hf.from_tokenizer(
                _hf_tokenizer(self._tokenizer), n_vocab=self.vocab_size, eos_token=self._eos
            )
        return self._llguidance_tokenizer

    def _compile_llguidance(self, constraint: Constraint) -> CompiledConstraint:
        import llguidance

        tokenizer = self._llguidance()
        try:
            grammar = _llguidance_grammar(constraint)
        except ValueError as exc:
            raise InvalidRequest(f"constraint: llguidance: {exc}") from None
        limits = llguidance.LLParserLimits(verbose_errors=False)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, tokenizer, limits=limits
        )
        if is_error:
            raise InvalidRequest(f"constraint: llguidance: {messages[0]}")
        return CompiledConstraint(
            GrammarBackend.LLGUIDANCE,
            self.vocab_size,
            grammar,
            tokenizer,
            limits,
            frozenset(self._eos),
        )


# Python's json.dumps layout, as xgrammar's any_whitespace=False writes it.
LLGUIDANCE_JSON_LAYOUT = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def _cache_key(constraint: Constraint) -> str:
    fields = [
        constraint.kind.value,
        constraint.source,
        *constraint.choices,
        constraint.syntax.value,
        constraint.backend.value if constraint.backend else "",
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _hf_tokenizer(tokenizer: Tokenizer) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)


def _literal(text: str) -> str:
    """A double-quoted string literal (JSON escapes, which EBNF and Lark both read)."""
    return json.dumps(text, ensure_ascii=False)


def _xgrammar_source(constraint: Constraint) -> str:
    if constraint.kind is ConstraintKind.CHOICE:
        return "root ::= " + " | ".join(_literal(choice) for choice in constraint.choices)
    return constraint.source


def _llguidance_grammar(constraint: Constraint) -> str:
    from llguidance import LLMatcher, gbnf_to_lark

    match constraint.kind:
        case ConstraintKind.JSON_SCHEMA:
            schema = parse_schema(constraint.source)
            return LLMatcher.grammar_from_json_schema(schema, defaults=LLGUIDANCE_JSON_LAYOUT)
        case ConstraintKind.REGEX:
            return LLMatcher.grammar_from_regex(constraint.source)
        case ConstraintKind.CHOICE:
            alternatives = " | ".join(_literal(choice) for choice in constraint.choices)
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        case ConstraintKind.GRAMMAR if constraint.syntax is GrammarSyntax.LARK:
            return LLMatcher.grammar_from_lark(constraint.source)
        case _:
            return LLMatcher.grammar_from_lark(gbnf_to_lark(constraint.source))


def parse_schema(source: str) -> Any:
    try:
        schema = json.loads(source)
    except json.JSONDecodeError as exc:
        raise ValueError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise ValueError("json_schema must be a JSON object (or a boolean)")
    return schema


# ---- the xgrammar worker process -----------------------------------------------------------


class _WorkerLost(Exception):
    """The worker was killed (time or memory limit) or died."""


class _XGrammarWorker:
    """`python -m engine.grammar_worker`: compiles with xgrammar and sends back the serialized
    grammar. A plain subprocess, not multiprocessing, which would re-import the caller's
    __main__ module in the child."""

    def __init__(self, tokenizer_info_json: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "engine.grammar_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._send({"tokenizer_info": tokenizer_info_json})

    def alive(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> None:
        self._process.kill()
        self._process.wait(timeout=5)
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()

    def _send(self, message: dict[str, str]) -> None:
        assert self._process.stdin is not None
        write_frame(self._process.stdin, message)

    def compile(self, job: dict[str, str], limits: CompileLimits) -> str:
        """The serialized CompiledGrammar; InvalidRequest for a refused constraint."""
        try:
            self._send(job)
        except OSError:
            self.stop()
            raise _WorkerLost("worker died") from None
        stdout = self._process.stdout
        assert stdout is not None
        deadline = time.monotonic() + limits.timeout_s
        while not select.select([stdout], [], [], 0.02)[0]:
            if not self.alive():
                self.stop()
                raise _WorkerLost("compilation crashed")
            if time.monotonic() > deadline:
                self.stop()
                raise _WorkerLost(f"compilation took over {limits.timeout_s:g} s")
            if _resident_bytes(self._process.pid) > limits.max_memory_bytes:
                self.stop()
                raise _WorkerLost(f"compilation used over {limits.max_memory_bytes >> 20} MiB")
        reply = read_frame(stdout)
        if reply is None:
            self.stop()
            raise _WorkerLost("compilation crashed")
        if "error" in reply:
            raise InvalidRequest(f"constraint: xgrammar: {reply['error']}")
        return reply["grammar"]


def write_frame(stream: BinaryIO, message: dict[str, str]) -> None:
    data = json.dumps(message).encode()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def read_frame(stream: BinaryIO) -> dict[str, str] | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return json.loads(stream.read(size))


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
