"""`tandem kit report`: the kit's accuracy table, every member on every task, via `tandem eval`."""

from __future__ import annotations

import sys
from pathlib import Path

from kit.build import KitPaths
from kit.evaluate import PERPLEXITY_TASK, EvalOptions, evaluate

# (column, member name pattern, adapter name pattern): {task} is filled in per row.
_COLUMNS = [
    ("base-small", "base-small", None),
    ("base-large", "base-large", None),
    ("expert-T", "expert-{task}", None),
    ("lora-T", "base-large", "lora-{task}"),
    ("ft-T", "ft-{task}", None),
    ("ft-multi", "ft-multi", None),
]


def accuracy_table(kit_dir: str, limit: int | None = None, progress: bool = True) -> str:
    """A markdown table: per task, exact-match accuracy of each kit member; then perplexity."""
    kit = KitPaths.open(kit_dir)
    header = "| task | " + " | ".join(column for column, _, _ in _COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(_COLUMNS) + 1)]
    for task in kit.task_names:
        cells = []
        for column, member, adapter in _COLUMNS:
            options = EvalOptions(
                task=task,
                model=str(kit.member(member.format(task=task))),
                adapter=str(kit.member(adapter.format(task=task))) if adapter else None,
                limit=limit,
            )
            result = evaluate(options)
            cells.append(f"{result['accuracy']:.1%}")
            _say(progress, f"{task} {column}: {result['accuracy']:.1%} ({result['n']} examples)")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| held-out text | base-small | base-large |")
    lines.append("|---|---|---|")
    ppl = []
    for member in ("base-small", "base-large"):
        result = evaluate(EvalOptions(PERPLEXITY_TASK, str(kit.member(member)), limit=limit))
        ppl.append(f"{result['perplexity']:.3f}")
        _say(progress, f"perplexity {member}: {result['perplexity']:.3f}")
    lines.append("| perplexity | " + " | ".join(ppl) + " |")
    return "\n".join(lines) + "\n"


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[tandem kit report] {message}", file=sys.stderr, flush=True)


def write_table(kit_dir: str, out: str | None, limit: int | None) -> str:
    table = accuracy_table(kit_dir, limit)
    if out:
        Path(out).write_text(table)
    return table
