"""`tandem kit report`: the kit's accuracy tables, via `tandem eval`.

Members: every kit member on every task, and perplexity. Weak-to-strong: base-large steered by
small experts (dynamic logit fusion), against base-large alone and the large fine-tunes, as gap
closed = (fused - base) / (ft - base): single task (the task's expert, static and dynamic) against
ft-T, and multi-task (all experts offered, nothing says which task; dynamic, routed by likelihood
and by the paper's KL rule) against ft-multi.

Sparsity (`--sparsity`): base-large with training-free sparse activation at several levels,
WINA against TEAL: perplexity, and task accuracy with each task's LoRA adapter (base-large
alone solves no task), which also runs the adapters on the sparse input.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
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


class _Scores:
    """Accuracies by evaluation, each evaluated once (the tables share base and ft runs)."""

    def __init__(self, limit: int | None, progress: bool) -> None:
        self.limit = limit
        self.progress = progress
        self._done: dict[EvalOptions, float] = {}

    def accuracy(self, label: str, options: EvalOptions) -> float:
        options = replace(options, limit=self.limit)
        if options not in self._done:
            result = evaluate(options)
            self._done[options] = float(result["accuracy"])
            _say(self.progress, f"{options.task} {label}: {result['accuracy']:.1%} ({result['n']})")
        return self._done[options]


def accuracy_table(kit_dir: str, limit: int | None = None, progress: bool = True) -> str:
    """A markdown table: per task, exact-match accuracy of each kit member; then perplexity."""
    return _members_table(KitPaths.open(kit_dir), _Scores(limit, progress))


def _members_table(kit: KitPaths, scores: _Scores) -> str:
    header = "| task | " + " | ".join(column for column, _, _ in _COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(_COLUMNS) + 1)]
    for task in kit.task_names:
        cells = []
        for column, member, adapter in _COLUMNS:
            options = EvalOptions(
                task=task,
                model=str(kit.member(member.format(task=task))),
                adapter=str(kit.member(adapter.format(task=task))) if adapter else None,
            )
            cells.append(f"{scores.accuracy(column, options):.1%}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| held-out text | base-small | base-large |")
    lines.append("|---|---|---|")
    ppl = []
    for member in ("base-small", "base-large"):
        options = EvalOptions(PERPLEXITY_TASK, str(kit.member(member)), limit=scores.limit)
        result = evaluate(options)
        ppl.append(f"{result['perplexity']:.3f}")
        _say(scores.progress, f"perplexity {member}: {result['perplexity']:.3f}")
    lines.append("| perplexity | " + " | ".join(ppl) + " |")
    return "\n".join(lines) + "\n"


def fusion_table(kit_dir: str, limit: int | None = None, progress: bool = True) -> str:
    """Markdown tables of weak-to-strong fusion: single task, then multi-task."""
    return _fusion_tables(KitPaths.open(kit_dir), _Scores(limit, progress))


def _fusion_tables(kit: KitPaths, scores: _Scores) -> str:
    large = str(kit.member("base-large"))
    small = str(kit.member("base-small"))
    all_experts = tuple(str(kit.member(f"expert-{t}")) for t in kit.task_names)

    def fused(task: str, experts: tuple[str, ...], fusion: str, routing: str) -> EvalOptions:
        return EvalOptions(
            task, large, experts=experts, small_base=small, fusion=fusion, routing=routing
        )

    single = [
        "| task | base-large | + expert, static | + expert, dynamic | ft-T "
        "| gap closed, static | gap closed, dynamic |",
        "|---|---|---|---|---|---|---|",
    ]
    multi = [
        "| task | base-large | all experts, likelihood routing | all experts, KL routing "
        "(paper) | ft-multi | gap closed, likelihood | gap closed, KL |",
        "|---|---|---|---|---|---|---|",
    ]
    gaps: dict[str, list[float]] = {}
    for task in kit.task_names:
        own = (str(kit.member(f"expert-{task}")),)
        base = scores.accuracy("base-large", EvalOptions(task, large))
        ft = scores.accuracy("ft-T", EvalOptions(task, str(kit.member(f"ft-{task}"))))
        ft_multi = scores.accuracy("ft-multi", EvalOptions(task, str(kit.member("ft-multi"))))
        runs = {
            "static": (scores.accuracy("static", fused(task, own, "static", "likelihood")), ft),
            "dynamic": (scores.accuracy("dynamic", fused(task, own, "dynamic", "likelihood")), ft),
            "likelihood": (
                scores.accuracy(
                    "multi likelihood", fused(task, all_experts, "dynamic", "likelihood")
                ),
                ft_multi,
            ),
            "kl": (
                scores.accuracy("multi kl", fused(task, all_experts, "dynamic", "kl")),
                ft_multi,
            ),
        }
        for name, (accuracy, reference) in runs.items():
            gaps.setdefault(name, []).append(_gap(accuracy, base, reference))
        s, d, li, kl = (runs[n][0] for n in ("static", "dynamic", "likelihood", "kl"))
        single.append(
            f"| {task} | {base:.1%} | {s:.1%} | {d:.1%} | {ft:.1%} "
            f"| {_pct(gaps['static'][-1])} | {_pct(gaps['dynamic'][-1])} |"
        )
        multi.append(
            f"| {task} | {base:.1%} | {li:.1%} | {kl:.1%} | {ft_multi:.1%} "
            f"| {_pct(gaps['likelihood'][-1])} | {_pct(gaps['kl'][-1])} |"
        )
    mean = {name: _mean(values) for name, values in gaps.items()}
    single.append(f"| mean | | | | | {_pct(mean['static'])} | {_pct(mean['dynamic'])} |")
    multi.append(f"| mean | | | | | {_pct(mean['likelihood'])} | {_pct(mean['kl'])} |")
    return "\n".join(single) + "\n\n" + "\n".join(multi) + "\n"


SPARSITY_LEVELS = (0.25, 0.4, 0.5, 0.65)
_RULES = ("wina", "teal")


def sparsity_table(
    kit_dir: str,
    limit: int | None = None,
    mode: str = "top-k",
    sparsity_file: str | None = None,
    progress: bool = True,
    levels: tuple[float, ...] = SPARSITY_LEVELS,
) -> str:
    """Markdown: per sparsity level, base-large's perplexity and its LoRA adapters' task
    accuracy with WINA and TEAL (threshold mode: calibrated first when no file is given)."""
    kit = KitPaths.open(kit_dir)
    with tempfile.TemporaryDirectory(prefix="tandem-sparsity-") as tmp:
        if mode == "threshold" and sparsity_file is None:
            sparsity_file = _calibrate_large(kit, Path(tmp), progress)
        return _sparsity_rows(kit, limit, mode, sparsity_file, progress, levels)


def _calibrate_large(kit: KitPaths, out_dir: Path, progress: bool) -> str:
    from engine.sparsity import calibrate_dir
    from kit import corpus

    out = out_dir / "base-large.sparsity.safetensors"
    calibrate_dir(
        str(kit.member("base-large")),
        out,
        corpus.iter_documents(0),
        "kit corpus (seed 0)",
        progress=lambda message: _say(progress, f"calibrate: {message}"),
    )
    return str(out)


def _sparsity_rows(
    kit: KitPaths,
    limit: int | None,
    mode: str,
    sparsity_file: str | None,
    progress: bool,
    levels: tuple[float, ...],
) -> str:
    large = str(kit.member("base-large"))
    tasks = list(kit.task_names)

    def run(task: str, level: float, rule: str) -> tuple[float, float]:
        """(perplexity or accuracy, fraction of channels skipped)."""
        adapter = None if task == PERPLEXITY_TASK else str(kit.member(f"lora-{task}"))
        options = EvalOptions(
            task, large, adapter=adapter, limit=limit, sparsity=level, sparsity_rule=rule,
            sparsity_mode=mode, sparsity_file=sparsity_file,
        )  # fmt: skip
        result = evaluate(options)
        score = float(result["perplexity" if task == PERPLEXITY_TASK else "accuracy"])
        skipped = float(result["skipped"]["all"])
        _say(progress, f"sparsity {level:.0%} {rule} {task}: {score:.4g} (skipped {skipped:.1%})")
        return score, skipped

    base_ppl = run(PERPLEXITY_TASK, 0.0, "wina")[0]
    dense = [f"{run(task, 0.0, 'wina')[0]:.1%}" for task in tasks]
    header = ["sparsity", "skipped WINA / TEAL", "ppl WINA", "ppl TEAL", "Δppl WINA", "Δppl TEAL"]
    header += [f"{task} (lora) WINA / TEAL" for task in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(f"| 0% (dense) | 0% | {base_ppl:.4f} | {base_ppl:.4f} | | | {' | '.join(dense)} |")
    for level in levels:
        ppl = {rule: run(PERPLEXITY_TASK, level, rule) for rule in _RULES}
        cells = [f"{level:.0%}", " / ".join(f"{ppl[r][1]:.1%}" for r in _RULES)]
        cells += [f"{ppl[r][0]:.4f}" for r in _RULES]
        cells += [f"{ppl[r][0] / base_ppl - 1:+.2%}" for r in _RULES]
        for task in tasks:
            wina, teal = (run(task, level, rule)[0] for rule in _RULES)
            cells.append(f"{wina:.1%} / {teal:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _gap(fused: float, base: float, reference: float) -> float | None:
    """Gap closed, (fused - base) / (reference - base); None when the reference is no better."""
    return (fused - base) / (reference - base) if reference > base else None


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[tandem kit report] {message}", file=sys.stderr, flush=True)


def write_table(
    kit_dir: str,
    out: str | None,
    limit: int | None,
    fusion_only: bool = False,
    sparsity_mode: str | None = None,
    sparsity_file: str | None = None,
) -> str:
    """All tables, or the fusion tables only, or (with `sparsity_mode`) the sparsity table only."""
    kit, scores = KitPaths.open(kit_dir), _Scores(limit, progress=True)
    if sparsity_mode is not None:
        table = sparsity_table(kit_dir, limit, sparsity_mode, sparsity_file)
    else:
        table = _fusion_tables(kit, scores)
        if not fusion_only:
            table = _members_table(kit, scores) + "\n" + table
    if out:
        Path(out).write_text(table)
    return table
