"""The xgrammar compile worker (`python -m engine.grammar_worker`, started by engine.grammar).

Frames on stdin/stdout (engine.grammar.write_frame): first the tokenizer info, then one job
per constraint, answered with the serialized grammar or an error. xgrammar's C++ code prints
its warnings on file descriptor 2; they go to a file read after each job, and a job that warns
is refused: the warning means the grammar is looser than the constraint.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Any, BinaryIO

from engine.grammar import parse_schema, read_frame, write_frame
from engine.types import ConstraintKind


def main() -> None:
    import xgrammar

    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        os.dup2(log.fileno(), 1)  # stray prints must not corrupt the frames
        _serve(xgrammar, requests, replies, log)


def _serve(xgrammar: Any, requests: BinaryIO, replies: BinaryIO, log: BinaryIO) -> None:
    first = read_frame(requests)
    if first is None:
        return
    info = xgrammar.TokenizerInfo.deserialize_json(first["tokenizer_info"])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    while (job := read_frame(requests)) is not None:
        start = log.seek(0, os.SEEK_END)
        try:
            grammar = _compile(xgrammar, compiler, job["kind"], job["source"])
        except Exception as exc:
            write_frame(replies, {"error": _first_line(str(exc)) or repr(exc)})
            continue
        log.seek(start)
        warnings = log.read().decode(errors="replace").strip()
        if warnings:
            reason = _first_line(warnings).split("Warning: ", 1)[-1]
            write_frame(replies, {"error": f"cannot represent the constraint exactly ({reason})"})
            continue
        write_frame(replies, {"grammar": grammar.serialize_json()})


def _first_line(text: str) -> str:
    """The message's first line without the "[time] file.cc:line: " prefix of xgrammar's logs."""
    lines = text.strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[0]) if lines else ""


# xgrammar writes the characters of a string with minLength or maxLength as [^"\\\r\n], which
# lets raw control characters in: JSON forbids them inside strings (json.loads refuses such a
# document). Its other strings exclude them; so does this class once patched.
_LENGTH_STRING_CHARACTERS = r"[^\"\\\r\n]"
_JSON_STRING_CHARACTERS = r"[^\0-\x1f\"\\\r\n]"


def _compile(xgrammar: Any, compiler: Any, kind: str, source: str) -> Any:
    if kind == ConstraintKind.JSON_SCHEMA.value:
        parse_schema(source)
        grammar = xgrammar.Grammar.from_json_schema(source, any_whitespace=False, strict_mode=True)
        return compiler.compile_grammar(json_schema_ebnf(str(grammar)))
    if kind == ConstraintKind.REGEX.value:
        return compiler.compile_regex(source)
    return compiler.compile_grammar(source)


def json_schema_ebnf(ebnf: str) -> str:
    """xgrammar's grammar of a JSON schema with its length-limited strings' characters made
    JSON's (no raw control characters)."""
    return ebnf.replace(_LENGTH_STRING_CHARACTERS, _JSON_STRING_CHARACTERS)


if __name__ == "__main__":
    main()
