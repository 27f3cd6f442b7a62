from __future__ import annotations

import random

import pytest

from engine.stopping import StopStringMatcher


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    """Feed pieces until a match; return every emitted piece (flush included if no match)."""
    matcher = StopStringMatcher(stops)
    emitted = []
    for piece in pieces:
        safe, matched = matcher.push(piece)
        emitted.append(safe)
        if matched:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def expected_output(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    """Brute force: after each piece, cut the whole text at the earliest stop occurrence."""
    text = ""
    for piece in pieces:
        text += piece
        found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
        if found:
            return text[: min(found)], True
    return text, False


def test_stop_spanning_pieces():
    emitted, matched = run(("STOP",), ["Hello S", "T", "O", "P and more"])
    assert matched and emitted == ["Hello ", "", "", ""]


def test_overlapping_prefix():
    # "ab" is held back as a possible start of "abc"; the second "ab" then completes it.
    emitted, matched = run(("abc",), ["a", "b", "a", "b", "c", "d"])
    assert matched and "".join(emitted) == "ab"
    assert emitted == ["", "", "ab", "", ""]


def test_text_after_the_stop_is_dropped_and_later_pushes_emit_nothing():
    matcher = StopStringMatcher(("\n\n",))
    assert matcher.push("one\n\ntwo") == ("one", True)
    assert matcher.push("three") == ("", True)


def test_several_stop_strings_earliest_wins():
    assert run(("world", "lo w"), ["hello world"]) == (["hel"], True)
    assert run(("xyz", "b"), ["a", "bc"]) == (["a", ""], True)


def test_flush_releases_a_held_partial_match():
    matcher = StopStringMatcher(("</answer>",))
    assert matcher.push("42 </ans") == ("42 ", False)
    assert matcher.flush() == "</ans"
    assert matcher.flush() == ""


def test_without_stop_strings_everything_passes_through():
    assert run((), ["a", "b"]) == (["a", "b", ""], False)


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(("",))


def test_random_pieces_against_brute_force():
    rng = random.Random(7)
    for _ in range(2000):
        stops = tuple("".join(rng.choices("ab", k=rng.randint(1, 4))) for _ in range(2))
        text = "".join(rng.choices("abc", k=rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 5))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, matched = run(stops, pieces)
        assert ("".join(emitted), matched) == expected_output(stops, pieces)
        # Only a tail that could still become a stop string is ever held back.
        matcher, received, released = StopStringMatcher(stops), "", ""
        for piece in pieces:
            safe, matched = matcher.push(piece)
            if matched:
                break
            received, released = received + piece, released + safe
            held = received[len(released) :]
            assert received.startswith(released)
            assert held == max(
                (
                    received[i:]
                    for i in range(len(received) + 1)
                    if could_start_stop(received[i:], stops)
                ),
                key=len,
            )


def could_start_stop(tail: str, stops: tuple[str, ...]) -> bool:
    return any(len(tail) < len(stop) and stop.startswith(tail) for stop in stops)
