"""Stop strings over streamed text.

Semantics: after each pushed piece, if any stop string occurs in the text received so far, the
output is that text cut just before the earliest occurrence and generation must stop; the stop
string and everything after it are dropped. (So when a single piece completes two stop strings,
the one that starts first wins.) A tail that could still grow into a stop string is held back,
so no part of a stop string is ever returned.
"""

from __future__ import annotations


def _longest_partial_match(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = stops
        self._held = ""
        self.matched = False

    def push(self, text: str) -> tuple[str, bool]:
        """Feed the next piece; return (text safe to emit, whether a stop string matched)."""
        if self.matched:
            return "", True
        # Any occurrence must start inside the held tail: emitted text never begins a stop string.
        pending = self._held + text
        positions = [i for i in (pending.find(stop) for stop in self._stops) if i >= 0]
        if positions:
            self.matched = True
            self._held = ""
            return pending[: min(positions)], True
        hold = _longest_partial_match(pending, self._stops)
        self._held = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """Release the held-back tail once generation has ended without a match."""
        held, self._held = self._held, ""
        return held
