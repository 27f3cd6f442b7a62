"""The built-in demo model: a small Llama trained here, deterministically, on a templated corpus.

`make serve` needs a model without downloads, so Tandem builds one on first use (about three
minutes on one CPU core) and caches it. The tokenizer is the real 32768-token Mistral SentencePiece
vocabulary; the corpus comes from `engine.corpus`.

Training only ever computes logits for the few hundred vocabulary entries the corpus uses.
The other embedding rows stay frozen at near zero, so their logits are near zero and the full
softmax's denominator is the seen tokens' part plus a constant (one logit of log(unseen count)).
The loss is therefore the full-vocabulary cross-entropy (measured equal to 1e-5 on the saved
model), and the saved model is an ordinary full-vocabulary Llama, at a small fraction of the
LM head's cost.

Usage: `python -m engine.builtin [--out DIR]` builds (or finds in the cache) and prints the path.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from engine import corpus
from engine.tokenizer import build_sentencepiece_tokenizer_dir

FULL_VOCAB_SIZE = 32768
# Small enough that the unseen tokens' logits are ~0 (the loss's assumption), yet distinct, so
# they never tie with each other in top-k or argmax.
_UNSEEN_EMBEDDING_STD = 1e-4
_DOCUMENTS_PER_CHUNK = 4096
_PROGRESS_INTERVAL_S = 5.0
_RECIPE_FILE = "tandem_builtin.json"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the built model's weights; its hash names the cache directory."""

    layers: int = 4
    hidden_size: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    # What config.json advertises (the server's prompt + generation limit); training sees
    # windows of seq_len tokens only.
    max_position_embeddings: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 800
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    # Floating-point reduction order depends on the thread count; fixing it makes the build
    # bit-for-bit reproducible on a given machine. One thread: on a busy machine two threads
    # wait on each other at every op (measured 4x slower here under load).
    threads: int = 1


DEFAULT_RECIPE = Recipe()


def recipe_hash(recipe: Recipe) -> str:
    """Hash of the recipe and of the code that turns it into weights (this module, the corpus)."""
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    for module_file in (__file__, corpus.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:12]


def default_model_dir(
    cache_root: str | None = None, progress: bool = True, recipe: Recipe = DEFAULT_RECIPE
) -> str:
    """Path of the built-in model, building it on the first call.

    It lives in `cache_root/builtin-<recipe hash>`; cache_root defaults to `$TANDEM_HOME/models`,
    or `~/.cache/tandem/models` without TANDEM_HOME. Concurrent callers wait for one build.
    """
    root = Path(cache_root) if cache_root else _default_cache_root()
    target = root / f"builtin-{recipe_hash(recipe)}"
    if target.is_dir():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{target.name}.lock"):
        # The directory only ever appears complete (atomic rename), so existing means done.
        if not target.is_dir():
            build_model_dir(target, recipe, progress)
    return str(target)


def build_model_dir(
    out_dir: str | os.PathLike[str], recipe: Recipe = DEFAULT_RECIPE, progress: bool = True
) -> str:
    """Train the model of `recipe` and save it as a Hugging Face directory at out_dir.

    It is built in a temporary sibling directory and renamed into place, so out_dir never
    holds a partial model. Fails if out_dir exists and is not empty.
    """
    out = Path(out_dir)
    # Checked up front too, so a bad --out fails now rather than after minutes of training.
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _build(staging, recipe, _Progress(enabled=progress))
        _make_readable(staging)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


def _make_readable(directory: Path) -> None:
    # mkdtemp (and some writers) create owner-only modes; the model may be served by another user.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _default_cache_root() -> Path:
    home = os.environ.get("TANDEM_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "tandem") / "models"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(out: Path, recipe: Recipe, progress: _Progress) -> None:
    started = time.monotonic()
    build_sentencepiece_tokenizer_dir(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    progress.say("generating and tokenizing the corpus")
    tokens = _corpus_tokens(tokenizer, recipe)
    seen_ids = torch.unique(tokens)
    with _deterministic(recipe.seed, recipe.threads):
        compact_model, final_loss = _train(
            torch.searchsorted(seen_ids, tokens), len(seen_ids), recipe, progress
        )
        model = _full_vocab_model(compact_model, seen_ids, recipe)
    model.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    summary = {
        "recipe": asdict(recipe),
        "parameters": parameters,
        "final_loss": final_loss,
        "distinct_tokens_trained": len(seen_ids),
    }
    (out / _RECIPE_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    progress.say(
        f"built {parameters / 1e6:.1f}M parameters in {time.monotonic() - started:.0f}s, "
        f"final loss {final_loss:.3f}"
    )


def _corpus_tokens(tokenizer: Tokenizer, recipe: Recipe) -> torch.Tensor:
    """The first steps * batch_size windows of seq_len + 1 tokens of the document stream."""
    bos_id, eos_id = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    needed = recipe.steps * recipe.batch_size * (recipe.seq_len + 1)
    documents = corpus.iter_documents(recipe.seed)
    ids: list[int] = []
    while len(ids) < needed:
        chunk = list(islice(documents, _DOCUMENTS_PER_CHUNK))
        encodings = tokenizer.encode_batch_fast(chunk, add_special_tokens=False)
        for index, encoding in enumerate(encodings):
            # Every other document starts with BOS, so the model works whether or not a caller's
            # tokenization adds one (this tokenizer.json does not).
            if index % 2 == 0:
                ids.append(bos_id)
            ids.extend(encoding.ids)
            ids.append(eos_id)
    return torch.tensor(ids[:needed], dtype=torch.int64)


@contextlib.contextmanager
def _deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seeded RNG, deterministic kernels and a fixed thread count, restored afterwards."""
    previous_threads = torch.get_num_threads()
    previous_mode = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # NaN-filling every new tensor is a debugging aid that doubled the step time here.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill
        torch.use_deterministic_algorithms(previous_mode[0], warn_only=previous_mode[1])
        torch.set_num_threads(previous_threads)


def _llama_config(recipe: Recipe, vocab_size: int, attention: str = "sdpa") -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
        attn_implementation=attention,
    )


def _train(
    tokens: torch.Tensor, vocab_size: int, recipe: Recipe, progress: _Progress
) -> tuple[LlamaForCausalLM, float]:
    """Train on compact token ids (0..vocab_size-1); returns the model and its final loss."""
    # Eager attention: torch's CPU flash-attention backward took a third of each step.
    model = LlamaForCausalLM(_llama_config(recipe, vocab_size, attention="eager"))
    model.train()
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, recipe.weight_decay), lr=recipe.learning_rate, betas=(0.9, 0.95)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, recipe)
    )
    windows = tokens.view(recipe.steps, recipe.batch_size, recipe.seq_len + 1)
    unseen_count = FULL_VOCAB_SIZE - vocab_size
    progress.start(recipe.steps, recipe.batch_size * recipe.seq_len)
    for batch in windows:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = full_vocab_cross_entropy(logits.float(), batch[:, 1:], unseen_count)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.step_done(loss.item())
    return model, progress.recent_loss()


def full_vocab_cross_entropy(
    seen_logits: torch.Tensor, targets: torch.Tensor, unseen_count: int
) -> torch.Tensor:
    """Mean cross-entropy over seen + unseen tokens, given logits of the seen tokens only.

    The unseen tokens' logits are taken as 0: together they add unseen_count * e^0 to the
    softmax denominator, i.e. one extra logit log(unseen_count). Targets are never unseen.
    """
    unseen_log_mass = torch.tensor(float(unseen_count)).log()
    log_normaliser = torch.logaddexp(torch.logsumexp(seen_logits, dim=-1), unseen_log_mass)
    target_logits = seen_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (log_normaliser - target_logits).mean()


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    # Decay matrices (projections, embedding) only; norm gains stay free.
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": matrices, "weight_decay": weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]


def _learning_rate_factor(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _full_vocab_model(
    compact: LlamaForCausalLM, seen_ids: torch.Tensor, recipe: Recipe
) -> LlamaForCausalLM:
    """The trained model with its embedding scattered back into the full vocabulary."""
    state = compact.state_dict()
    embedding = torch.randn(FULL_VOCAB_SIZE, recipe.hidden_size) * _UNSEEN_EMBEDDING_STD
    embedding[seen_ids] = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = embedding
    state["lm_head.weight"] = embedding
    model = LlamaForCausalLM(_llama_config(recipe, FULL_VOCAB_SIZE))
    model.load_state_dict(state)
    return model.eval()


@dataclass
class _Progress:
    """Training progress lines on stderr, at most one every few seconds."""

    enabled: bool
    total_steps: int = 0
    tokens_per_step: int = 0
    losses: list[float] = field(default_factory=list)
    started: float = 0.0
    last_report: float = 0.0

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[tandem builtin] {message}", file=sys.stderr, flush=True)

    def start(self, total_steps: int, tokens_per_step: int) -> None:
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.started = self.last_report = time.monotonic()

    def step_done(self, loss: float) -> None:
        self.losses.append(loss)
        now = time.monotonic()
        finished = len(self.losses) == self.total_steps
        if now - self.last_report < _PROGRESS_INTERVAL_S and not finished:
            return
        self.last_report = now
        elapsed = now - self.started
        steps = len(self.losses)
        eta = elapsed / steps * (self.total_steps - steps)
        self.say(
            f"step {steps}/{self.total_steps}  loss {self.recent_loss():.3f}  "
            f"{steps * self.tokens_per_step / elapsed:,.0f} tokens/s  ETA {eta:.0f}s"
        )

    def recent_loss(self) -> float:
        """Mean loss of the last 20 steps (a single step's loss is noisy)."""
        recent = self.losses[-20:]
        return sum(recent) / len(recent)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engine.builtin", description="Build the built-in demo model."
    )
    parser.add_argument("--out", help="build into this directory instead of the cache")
    args = parser.parse_args(argv)
    try:
        print(build_model_dir(args.out) if args.out else default_model_dir())
    except FileExistsError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
