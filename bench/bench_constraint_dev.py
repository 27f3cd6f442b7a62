"""Per-token constraint time on the dev schemas: AWRS against xgrammar's and llguidance's full
masks, with the 32k SentencePiece and the 131k Tekken vocabularies (issue 6).

No trained model knows these 300 schemas, so the tokens come from a synthetic model whose
one knob is what a real model's prompt and training decide: its mass on the tokens the schema
allows at each state (`--compliance`, e.g. 0.99 for a model told the schema, 0.5 for one that
guesses). At every state its logits are fresh noise (sigma `--sigma`) plus a bias on the
tokens that close strings, numbers and containers (so its strings and arrays end, as a real
model's do), then the allowed tokens are shifted together to hold exactly that mass. The
constraint work is real: the schema compiled by the engine's compiler, the engine's AWRS walk
(`engine.awrs.sample_constrained`, with its walk limit from the grammar's measured costs),
xgrammar and llguidance matchers on the real vocabularies.

Per state (every token of every document): the time of xgrammar's full mask (the one the
synthetic model needs anyway, timed), of llguidance's full mask (the engine's wrapper: its end
handling included), and of AWRS's matcher calls with each engine (its checks, plus the full
mask where the walk ended with one; both walks draw with the same noise, so they take the same
token wherever the engines agree). Before each timed operation 64 MB are written over, as a CPU
server's forward pass streams the weights between two steps (`--no-evict`: the caches as the
grammar work left them, closer to a GPU server's host). One untimed document per schema first,
so every walk runs with what the grammar's costs measured. Prints p50 / p99 / mean pooled over
all states, and how many schemas' own AWRS p99 is at most a tenth of their mask p99. Asserts
nothing.

    python bench/bench_constraint_dev.py [--schemas 100] [--tokens 64] [--compliance 0.99 0.9 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = REPO_ROOT / "tests" / "data" / "jsonschemabench-dev"
CACHE = REPO_ROOT / "bench" / ".cache"
EVICTION_BYTES = 64 << 20  # more than this EPYC's 32 MB L3
# Token texts that end strings, numbers and containers (what the synthetic model favours).
CLOSING = re.compile(r'^\s*["\]},:0-9]+\s*$|^\s*(true|false|null)\s*$')


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class TimedMatcher:
    """The engine's matcher with the time of its calls added up (what AWRS spends)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.vocab_size = inner.vocab_size
        self.costs = inner.costs
        self.seconds = 0.0

    def check(self, token: int) -> bool:
        start = time.perf_counter()
        try:
            return self._inner.check(token)
        finally:
            self.seconds += time.perf_counter() - start

    def fill_bitmask(self, bitmask, row: int) -> None:
        start = time.perf_counter()
        self._inner.fill_bitmask(bitmask, row)
        self.seconds += time.perf_counter() - start

    def accept(self, token: int) -> None:
        self._inner.accept(token)

    def is_terminated(self) -> bool:
        return self._inner.is_terminated()


@dataclass
class States:
    """Per state, for one grammar engine: the seconds of its full mask and of AWRS's matcher
    calls with it; AWRS's checks and whether its walk ended with a mask."""

    mask: list[float] = field(default_factory=list)
    awrs: list[float] = field(default_factory=list)
    checks: list[int] = field(default_factory=list)
    masked: list[bool] = field(default_factory=list)

    def extend(self, other: States) -> None:
        for key in ("mask", "awrs", "checks", "masked"):
            getattr(self, key).extend(getattr(other, key))


class SyntheticModel:
    def __init__(self, closing, sigma: float, bias: float, seed: int) -> None:
        import torch

        self._bias = closing.float() * bias
        self._sigma = sigma
        self.generator = torch.Generator().manual_seed(seed)

    def logprobs(self, allowed, compliance: float):
        """log-probabilities [V]: noise + bias, the allowed tokens shifted to hold `compliance`."""
        import torch

        noise = torch.randn(self._bias.shape, generator=self.generator)
        logits = self._sigma * noise + self._bias
        if bool(allowed.all()):
            return torch.log_softmax(logits, dim=-1)
        held = torch.logsumexp(logits[allowed], dim=-1)
        rest = torch.logsumexp(logits[~allowed], dim=-1)
        # (held + shift) - logaddexp(held + shift, rest) = log(compliance)
        shift = math.log(compliance / (1.0 - compliance)) + float(rest - held)
        return torch.log_softmax(logits + shift * allowed.float(), dim=-1)


_EVICTION_BUFFER: list = []


def evict() -> None:
    """Writes over more memory than the last-level cache holds: each timed operation starts
    as it does in a server, right after a forward pass has streamed the model's weights."""
    import torch

    if EVICTION_BYTES == 0:
        return
    if not _EVICTION_BUFFER:
        _EVICTION_BUFFER.append(torch.zeros(EVICTION_BYTES // 4))
    _EVICTION_BUFFER[0].add_(1.0)


def document(compiled, model, compliance: float, tokens: int) -> dict[str, States]:
    """One document of at most `tokens` tokens from the synthetic model; per grammar engine
    in `compiled` (xgrammar first: its mask is the model's view of the schema), its states."""
    import torch

    from engine.awrs import sample_constrained
    from engine.grammar import allocate_bitmask, bitmask_to_bool
    from engine.types import InvalidRequest

    matchers = {name: TimedMatcher(c.matcher()) for name, c in compiled.items()}
    states = {name: States() for name in compiled}
    vocab = compiled["xgrammar"].vocab_size
    for _ in range(tokens):
        allowed = None
        for name, matcher in matchers.items():
            bitmask = allocate_bitmask(1, vocab)
            evict()
            start = time.perf_counter()
            matcher.fill_bitmask(bitmask, 0)
            states[name].mask.append(time.perf_counter() - start)
            if allowed is None:
                allowed = bitmask_to_bool(bitmask, vocab)[0]
        if not bool(allowed.any()):
            break
        logprobs = model.logprobs(allowed, compliance)[None]
        noise = torch.rand((1, vocab), generator=model.generator)  # the same draw for each

        def uniform(_, noise=noise):
            return noise

        chosen = {}
        for name, matcher in matchers.items():
            matcher.seconds = 0.0
            evict()
            (outcome,) = sample_constrained(logprobs, [matcher], [False], [False], uniform)
            states[name].awrs.append(matcher.seconds)
            states[name].checks.append(outcome.checks)
            states[name].masked.append(outcome.used_mask)
            chosen[name] = outcome.token
        token = chosen["xgrammar"]
        for name, matcher in list(matchers.items()):
            try:
                if chosen[name] != token:
                    raise InvalidRequest("the engines disagree")
                matcher.accept(token)
            except InvalidRequest:  # llguidance reads this schema otherwise: it stops here
                del matchers[name]
        if matchers["xgrammar"].is_terminated():
            break
    return states


def run_vocabulary(name: str, tokenizer_dir: str, args) -> None:
    import torch

    from engine.grammar import CompileLimits, ConstraintCompiler
    from engine.tokenizer import Tokenizer
    from engine.types import Constraint, ConstraintKind, GrammarBackend, InvalidRequest

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    vocab = tokenizer.vocab_size
    closing = torch.tensor(
        [bool(CLOSING.match(tokenizer.decode([i]))) for i in range(vocab)], dtype=torch.bool
    )
    closing[list(tokenizer.eos_token_ids)] = True
    compiler = ConstraintCompiler(
        tokenizer, vocab, tokenizer.eos_token_ids, CompileLimits(timeout_s=args.timeout)
    )
    compiler.prepare()
    files = sorted(SCHEMAS.glob("*.json"))[:: max(1, 300 // args.schemas)][: args.schemas]
    engines = {"xgrammar": GrammarBackend.XGRAMMAR, "llguidance": GrammarBackend.LLGUIDANCE}
    states = {(e, c): States() for e in engines for c in args.compliance}
    per_schema: dict[tuple[str, float], list[float]] = {key: [] for key in states}
    refused = 0
    for index, path in enumerate(files):
        print(f"\r    {name}: schema {index + 1}/{len(files)}", end="", flush=True)
        compiled = {}
        for engine, backend in engines.items():
            constraint = Constraint(ConstraintKind.JSON_SCHEMA, path.read_text(), backend=backend)
            with contextlib.suppress(InvalidRequest):  # xgrammar's refusal is counted below
                compiled[engine] = compiler.compile(constraint)
        if "xgrammar" not in compiled:
            refused += 1
            continue
        model = SyntheticModel(closing, args.sigma, args.bias, seed=index)
        document(compiled, model, 0.9, args.tokens)  # untimed: measures the grammars' costs
        for compliance in args.compliance:
            for engine, mine in document(compiled, model, compliance, args.tokens).items():
                states[engine, compliance].extend(mine)
                if mine.awrs:
                    ratio = _percentile(mine.awrs, 0.99) / _percentile(mine.mask, 0.99)
                    per_schema[engine, compliance].append(ratio)
    compiler.close()
    print(
        f"\r    vocabulary {vocab} ({name}): {len(files) - refused} of {len(files)} schemas "
        f"(xgrammar refused {refused})",
        flush=True,
    )
    for (engine, compliance), pooled in states.items():
        if not pooled.awrs:
            continue
        ratios = per_schema[engine, compliance]
        print(f"      {engine}, compliance {compliance}: {len(pooled.awrs)} states", flush=True)
        for label, times in (("full mask", pooled.mask), ("AWRS", pooled.awrs)):
            print(
                f"        {label:10s} p50 {1e6 * _percentile(times, 0.5):7.1f} us  p99 "
                f"{1e6 * _percentile(times, 0.99):7.1f} us  mean "
                f"{1e6 * statistics.fmean(times):7.1f} us",
                flush=True,
            )
        print(
            f"        AWRS p99 / mask p99: pooled "
            f"{_percentile(pooled.awrs, 0.99) / _percentile(pooled.mask, 0.99):.3f}; "
            f"per schema median {statistics.median(ratios):.3f}, <= 0.1 in "
            f"{sum(r <= 0.1 for r in ratios)} of {len(ratios)}; checks per token median "
            f"{statistics.median(pooled.checks):.0f} p99 {_percentile(pooled.checks, 0.99):.0f}; "
            f"walks ended with a mask {sum(pooled.masked)} of {len(pooled.masked)}",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=int, default=100, help="every (300 / N)-th dev schema")
    parser.add_argument("--tokens", type=int, default=64, help="most tokens per document")
    parser.add_argument("--compliance", type=float, nargs="+", default=[0.99, 0.9, 0.5])
    parser.add_argument("--sigma", type=float, default=2.0, help="the synthetic logits' noise")
    parser.add_argument("--bias", type=float, default=8.0, help="bias on closing tokens")
    parser.add_argument("--timeout", type=float, default=10.0, help="compile limit, seconds")
    parser.add_argument(
        "--no-evict",
        action="store_true",
        help="time with the caches as the grammar left them (a GPU server's host) instead of "
        "after a forward pass has streamed the weights (a CPU server)",
    )
    parser.add_argument("--vocab", nargs="+", default=["32k", "131k"], choices=["32k", "131k"])
    args = parser.parse_args()
    if args.no_evict:
        global EVICTION_BYTES
        EVICTION_BYTES = 0
    sys.path.insert(0, str(REPO_ROOT))
    from engine.tokenizer import build_sentencepiece_tokenizer_dir, build_tekken_tokenizer_dir

    builders = {
        "32k": lambda: build_sentencepiece_tokenizer_dir(CACHE / "sentencepiece"),
        "131k": lambda: build_tekken_tokenizer_dir(CACHE / "tekken"),
    }
    print(
        f"per-token constraint time over {args.schemas} dev schemas, a synthetic model "
        f"(sigma {args.sigma}, closing-token bias {args.bias}), at most {args.tokens} tokens "
        f"a document, caches {'warm' if args.no_evict else 'evicted before each operation'}",
        flush=True,
    )
    for name in args.vocab:
        run_vocabulary(name, builders[name](), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
