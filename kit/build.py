"""`tandem kit build`: train the model kit deterministically on CPU and cache it.

The kit is a family of small models sharing the real 32k Mistral SentencePiece vocabulary:
base-large and base-small pretrained on the general mix (tasks appear in it only rarely), and for
each task T: expert-T (base-small fully fine-tuned), lora-T (a PEFT LoRA adapter for base-large),
ft-T (base-large fully fine-tuned); plus ft-multi (base-large fine-tuned on all tasks). Outputs
are ordinary Hugging Face model directories and PEFT adapter directories.

base-large pretrains first, alone, on `large_pretrain_threads` threads; then the other jobs run in
`workers` processes of `threads` threads each. Every job seeds itself from its own name and
always runs on the same number of threads, so the result does not depend on which worker ran it
or when (bit for bit on one CPU type).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM
from transformers.utils import logging as transformers_logging

from engine.tokenizer import build_sentencepiece_tokenizer_dir
from kit import data, tasks, train
from kit.train import Architecture, Progress, Schedule, TokenSpace

KIT_FILE = "kit.json"
TASKS_FILE = "tasks.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Task examples drawn to find every token the tasks can produce (the token space).
_TOKEN_SAMPLE_PER_TASK = 20_000


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LORA_TARGETS


_LARGE = Architecture(layers=4, hidden_size=256, heads=8, kv_heads=4, intermediate_size=768)
_SMALL = Architecture(layers=3, hidden_size=96, heads=4, kv_heads=2, intermediate_size=256)
_LARGE_PRETRAIN = Schedule(steps=700, batch_size=16, learning_rate=2e-3, warmup_steps=50)
_SMALL_PRETRAIN = Schedule(steps=700, batch_size=16, learning_rate=3e-3, warmup_steps=50)
# Learning rates from trials on this kit: the large model's full fine-tune learned nothing in 1000
# steps at 3e-3 and its LoRA nothing at 5e-3; at 1e-3 LoRA was still halfway after 1000 steps.
# Large fine-tune steps cut from a first build's (1500 LoRA, 1000 full, 2000 multi: 30 min) to
# approach the 20-minute budget; kit/README.md has the accuracies of this recipe.
_EXPERT = Schedule(steps=1500, batch_size=32, learning_rate=3e-3, weight_decay=0.0)
_FULL_FINETUNE = Schedule(steps=700, batch_size=32, learning_rate=1e-3, weight_decay=0.0)
_LORA_FINETUNE = Schedule(steps=1000, batch_size=32, learning_rate=2e-3, weight_decay=0.0)
_MULTI_FINETUNE = Schedule(steps=1200, batch_size=32, learning_rate=1e-3, weight_decay=0.0)
_LORA = LoraSpec()


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the kit's weights; its hash (with the code's) names the cache."""

    large: Architecture = _LARGE
    small: Architecture = _SMALL
    seq_len: int = 128
    large_pretrain: Schedule = _LARGE_PRETRAIN
    small_pretrain: Schedule = _SMALL_PRETRAIN
    expert: Schedule = _EXPERT
    full_finetune: Schedule = _FULL_FINETUNE
    lora_finetune: Schedule = _LORA_FINETUNE
    multi_finetune: Schedule = _MULTI_FINETUNE
    lora: LoraSpec = _LORA
    task_names: tuple[str, ...] = tuple(tasks.TASKS)
    # Single-task fine-tunes run steps * scale: the record task (a copy task with the longest
    # examples) is learned in a fraction of the others' steps.
    task_step_scale: tuple[tuple[str, float], ...] = (("record", 0.5),)
    # Fraction of general-mix documents replaced by a task example: rare enough that the base
    # models cannot do the tasks, present so the format is not entirely new to them.
    task_rate: float = 0.002
    # Experts learn their task's prompts too, not only its answers: they then know which text
    # is theirs, which is what fusion's likelihood routing asks them (engine.fusion). Without
    # it, each expert forgot the prompt format of every task, its own included.
    expert_prompt_loss: bool = True
    seed: int = 0
    workers: int = 2
    threads: int = 1
    # Every other job starts from a base model, so while base-large pretrained on one thread the
    # second worker idled for 3 of the fp32 build's 19 minutes once base-small and the experts
    # were done; on two threads a base-large step took 1/1.86 of the time (fp32), 1/1.76 (bf16).
    large_pretrain_threads: int = 2
    # The matmuls' precision: "bf16" (autocast), "fp32", or "auto": bf16 where the CPU
    # multiplies it in hardware (train.native_bf16), fp32 elsewhere, where bf16 is emulated.
    precision: str = "auto"


DEFAULT_RECIPE = Recipe()
PRECISIONS = ("auto", "bf16", "fp32")


def training_precision(recipe: Recipe) -> str:
    """recipe.precision with "auto" resolved for this CPU: "bf16" or "fp32"."""
    if recipe.precision not in PRECISIONS:
        raise ValueError(f"precision {recipe.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if recipe.precision == "auto":
        return "bf16" if train.native_bf16() else "fp32"
    return recipe.precision


def recipe_hash(recipe: Recipe) -> str:
    """Hash of the recipe (its precision as resolved here) and of the code that turns it into
    weights."""
    resolved = replace(recipe, precision=training_precision(recipe))
    digest = hashlib.sha256(json.dumps(asdict(resolved), sort_keys=True).encode())
    for name in ("build", "corpus", "data", "tasks", "train"):
        digest.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()[:12]


def default_kit_dir(
    cache_root: str | None = None, progress: bool = True, recipe: Recipe = DEFAULT_RECIPE
) -> str:
    """Path of the kit of `recipe`, building it on the first call (concurrent callers wait).

    It lives in `cache_root/kit-<hash>`; cache_root defaults to `$TANDEM_HOME/models`, or
    `~/.cache/tandem/models` without TANDEM_HOME.
    """
    root = Path(cache_root) if cache_root else default_cache_root()
    target = root / f"kit-{recipe_hash(recipe)}"
    if target.is_dir():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{target.name}.lock"):
        # The directory only ever appears complete (atomic rename), so existing means done.
        if not target.is_dir():
            build_kit(target, recipe, progress)
    return str(target)


def default_cache_root() -> Path:
    home = os.environ.get("TANDEM_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "tandem") / "models"


def build_kit(
    out_dir: str | os.PathLike[str], recipe: Recipe = DEFAULT_RECIPE, progress: bool = True
) -> str:
    """Train the kit of `recipe` into out_dir (built in a sibling directory, then renamed)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _build(staging, recipe, progress)
        _make_readable(staging)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


# ---- the build -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    name: str
    kind: str  # "pretrain", "finetune" or "lora"
    arch: Architecture
    schedule: Schedule
    base: str | None = None  # the job whose weights it starts from
    task_names: tuple[str, ...] = ()
    threads: int = 1
    alone: bool = False  # runs before the others, with no job beside it


def _jobs(recipe: Recipe) -> list[_Job]:
    """Every training run, longest first among those sharing a base (workers pick in order)."""
    names = recipe.task_names
    scales = dict(recipe.task_step_scale)
    small, large = (recipe.small, "base-small"), (recipe.large, "base-large")

    def scaled(schedule: Schedule, task: str) -> Schedule:
        return replace(schedule, steps=max(1, round(schedule.steps * scales.get(task, 1.0))))

    jobs = [
        _Job(
            "base-large",
            "pretrain",
            recipe.large,
            recipe.large_pretrain,
            threads=recipe.large_pretrain_threads,
            alone=True,
        ),
        _Job("base-small", "pretrain", recipe.small, recipe.small_pretrain, threads=recipe.threads),
        _Job(
            "ft-multi", "finetune", large[0], recipe.multi_finetune, large[1], names, recipe.threads
        ),
    ]
    for kind, schedule, (arch, base) in [
        ("lora", recipe.lora_finetune, large),
        ("ft", recipe.full_finetune, large),
        ("expert", recipe.expert, small),
    ]:
        for task in names:
            job_kind = "lora" if kind == "lora" else "finetune"
            jobs.append(
                _Job(
                    f"{kind}-{task}",
                    job_kind,
                    arch,
                    scaled(schedule, task),
                    base,
                    (task,),
                    recipe.threads,
                )
            )
    return jobs


@dataclass
class _Workspace:
    """Shared inputs of every job, written once by the parent process."""

    root: Path
    recipe: Recipe
    progress: bool

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "_work" / "tokenizer"

    @property
    def state_dir(self) -> Path:
        return self.root / "_work" / "states"

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_dir / "tokenizer.json"))

    def space(self) -> TokenSpace:
        return TokenSpace(load_file(self.root / "_work" / "space.safetensors")["seen_ids"])

    def pretraining_tokens(self) -> torch.Tensor:
        return load_file(self.root / "_work" / "pretrain.safetensors")["tokens"].long()


def _build(out: Path, recipe: Recipe, progress: bool) -> None:
    started = time.monotonic()
    say = Progress("build", progress).say
    workspace = _Workspace(out, recipe, progress)
    workspace.state_dir.mkdir(parents=True)
    build_sentencepiece_tokenizer_dir(workspace.tokenizer_dir)
    precision = training_precision(recipe)
    if recipe.precision == "auto" and precision == "fp32":
        say("training in fp32: this CPU has no bf16 multiply (AVX512-BF16 or AMX) to train in")
    say("generating and tokenizing the general mix and the tasks")
    _write_token_data(workspace)
    results = _run_jobs(workspace, _jobs(recipe), say)
    say("writing Hugging Face model directories")
    transformers_logging.disable_progress_bar()
    for job in _jobs(recipe):
        if job.kind != "lora":
            _export_model(workspace, job)
    _write_metadata(workspace, results, time.monotonic() - started)
    shutil.rmtree(out / "_work")
    say(f"kit built in {time.monotonic() - started:.0f}s")


def _write_token_data(workspace: _Workspace) -> None:
    recipe = workspace.recipe
    tokenizer = workspace.tokenizer()
    task_list = [tasks.get_task(name) for name in recipe.task_names]
    needed = max(
        s.steps * s.batch_size * (recipe.seq_len + 1)
        for s in (recipe.large_pretrain, recipe.small_pretrain)
    )
    documents = data.general_documents(recipe.seed, task_list, recipe.task_rate)
    stream = data.general_token_stream(tokenizer, documents)
    tokens = torch.tensor(list(islice(stream, needed)), dtype=torch.int32)
    seen = set(tokens.tolist())
    for task in task_list:
        examples = [*islice(tasks.train_examples(task, recipe.seed), _TOKEN_SAMPLE_PER_TASK)]
        for example in examples + tasks.held_out_examples(task):
            prompt, answer = data.encode_example(tokenizer, example)
            seen.update(prompt + answer)
    work = workspace.root / "_work"
    save_file({"tokens": tokens}, work / "pretrain.safetensors")
    seen_ids = torch.tensor(sorted(seen), dtype=torch.int64)
    save_file({"seen_ids": seen_ids}, work / "space.safetensors")


def _run_jobs(workspace: _Workspace, jobs: list[_Job], say: Callable[[str], None]) -> dict:
    """Run the jobs marked alone one by one, then every other job once its base is done,
    `workers` at a time; returns name -> summary."""
    results: dict[str, dict] = {}
    alone = [job for job in jobs if job.alone]
    pending = [job for job in jobs if not job.alone]
    if workspace.recipe.workers <= 1:
        pending = alone + pending
        while pending:
            job = next(j for j in pending if j.base is None or j.base in results)
            pending.remove(job)
            results[job.name] = _run_job(workspace, job)
        return results
    with ProcessPoolExecutor(workspace.recipe.workers, mp_context=get_context("spawn")) as pool:
        for job in alone:
            results[job.name] = pool.submit(_run_job, workspace, job).result()
            say(f"{job.name} done ({len(results)}/{len(jobs)})")
        running: dict[Future, _Job] = {}
        while pending or running:
            for job in [j for j in pending if j.base is None or j.base in results]:
                pending.remove(job)
                running[pool.submit(_run_job, workspace, job)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                results[job.name] = future.result()
                say(f"{job.name} done ({len(results)}/{len(jobs)})")
    return results


def _run_job(workspace: _Workspace, job: _Job) -> dict:
    """One training run in this process; saves its weights under the workspace."""
    started = time.monotonic()
    recipe = workspace.recipe
    space = workspace.space()
    progress = Progress(job.name, workspace.progress)
    seed = int.from_bytes(hashlib.sha256(f"{recipe.seed}-{job.name}".encode()).digest()[:4])
    with train.deterministic(seed, job.threads):
        model = train.new_compact_model(job.arch, space)
        if job.base is not None:
            _load_compact(model, workspace.state_dir / f"{job.base}.safetensors")
        batches = _batches(workspace, job, space)
        if job.kind == "lora":
            model = _with_lora(model, recipe.lora)
        bf16 = training_precision(recipe) == "bf16"
        loss = train.train(model, batches, job.schedule, space.unseen_count, progress, bf16)
        if job.kind == "lora":
            _save_adapter(model, workspace.root / job.name, job.base)
        else:
            state = {name: t.contiguous() for name, t in model.state_dict().items()}
            state.pop("lm_head.weight", None)  # tied to the embedding
            save_file(state, workspace.state_dir / f"{job.name}.safetensors")
    return {"final_loss": loss, "seconds": round(time.monotonic() - started, 1)}


def _batches(workspace: _Workspace, job: _Job, space: TokenSpace) -> Iterator[train.Batch]:
    recipe = workspace.recipe
    if job.kind == "pretrain":
        stream = iter(workspace.pretraining_tokens().tolist())
        return data.pretraining_batches(stream, space, job.schedule.batch_size, recipe.seq_len)
    task_list = [tasks.get_task(name) for name in job.task_names]
    prompt_loss = recipe.expert_prompt_loss and job.name.startswith("expert-")
    return data.task_batches(
        workspace.tokenizer(), space, task_list, recipe.seed, job.schedule.batch_size, prompt_loss
    )


def _load_compact(model: torch.nn.Module, path: Path) -> None:
    """Load a saved compact state; lm_head is not saved, it is tied to the embedding."""
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"{path}: missing {missing}, unexpected {unexpected}")


def _with_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # PEFT calls a transformers method that transformers 5 deprecates; nothing to act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(model, config)


def _save_adapter(model: torch.nn.Module, out: Path, base: str | None) -> None:
    model.peft_config["default"].base_model_name_or_path = base
    # No embedding layers: else PEFT looks the base up (on the Hub) to compare vocabularies.
    model.save_pretrained(out, save_embedding_layers=False)
    # PEFT writes target_modules from a set, in hash order; sorted, the file is reproducible.
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _export_model(workspace: _Workspace, job: _Job) -> None:
    space = workspace.space()
    compact = train.new_compact_model(job.arch, space)
    _load_compact(compact, workspace.state_dir / f"{job.name}.safetensors")
    # Unseen rows are seeded per architecture, so fine-tunes keep their base's unseen rows.
    model = train.full_vocab_model(compact, job.arch, space, workspace.recipe.seed)
    out = workspace.root / job.name
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(workspace.tokenizer_dir / name, out / name)


def _write_metadata(workspace: _Workspace, results: dict, seconds: float) -> None:
    recipe = workspace.recipe
    descriptions = [tasks.get_task(name).describe() for name in recipe.task_names]
    (workspace.root / TASKS_FILE).write_text(json.dumps({"tasks": descriptions}, indent=2) + "\n")
    summary = {
        "recipe": asdict(recipe),
        "recipe_hash": recipe_hash(recipe),
        "precision": training_precision(recipe),
        "distinct_tokens_trained": len(workspace.space()),
        "seconds": round(seconds, 1),
        "jobs": results,
        "parameters": {
            "base-large": _parameter_count(recipe.large),
            "base-small": _parameter_count(recipe.small),
        },
    }
    (workspace.root / KIT_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def _parameter_count(arch: Architecture) -> int:
    config = train.llama_config(arch, train.FULL_VOCAB_SIZE)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def _make_readable(directory: Path) -> None:
    # mkdtemp (and some writers) create owner-only modes; the kit may be served by another user.
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class KitPaths:
    """Where each member of a built kit lives."""

    root: Path
    task_names: tuple[str, ...] = field(default=())

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> KitPaths:
        root = Path(root)
        described = json.loads((root / TASKS_FILE).read_text())["tasks"]
        return cls(root, tuple(task["name"] for task in described))

    def member(self, name: str) -> Path:
        path = self.root / name
        if not path.is_dir():
            raise FileNotFoundError(f"the kit at {self.root} has no {name}")
        return path
