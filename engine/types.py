"""Messages between the engine and its callers: plain dataclasses, no tensors, no grpc."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EngineError(Exception):
    """Base of the engine's errors; `kind` tells the server which status code to answer."""

    kind = "internal"


class InvalidRequest(EngineError):
    kind = "invalid_argument"


class QueueFull(EngineError):
    kind = "resource_exhausted"


class ResourceExhausted(EngineError):
    """A fixed capacity is used up (e.g. every place of the adapter host cache is pinned)."""

    kind = "resource_exhausted"


class UnsupportedModel(EngineError):
    kind = "failed_precondition"


class NotFound(EngineError):
    """An unknown adapter (or other named resource) id."""

    kind = "not_found"


class AlreadyExists(EngineError):
    kind = "already_exists"


class ExpertError(EngineError):
    """An expert or small base that cannot steer this model (tokenizer, shapes: the message
    says why) or whose files are unreadable; `kind` is "not_found" for a missing path."""

    kind = "failed_precondition"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class AdapterError(EngineError):
    """An adapter that cannot be used with this base model (the message says why), or whose
    files are unreadable; `kind` is "not_found" when the path or a file does not exist."""

    kind = "failed_precondition"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class SparsityError(EngineError):
    """A sparsity setting or sidecar that cannot serve this model (the message says why)."""

    kind = "failed_precondition"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        checks = [
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)


@dataclass(frozen=True)
class StoppingCriteria:
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be >= 1")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")


@dataclass(frozen=True)
class OutputOptions:
    logprobs: bool = False
    top_logprobs: int = 0  # number of alternatives per token, 0..20
    fusion_weights: bool = False  # report the experts' alphas of each token
    particles: bool = False  # SMC: report every particle at the end

    def validate(self) -> None:
        if not 0 <= self.top_logprobs <= 20:
            raise InvalidRequest("top_logprobs must be in [0, 20]")


class FusionMode(enum.Enum):
    """How experts' logits are fused (design.md section 6)."""

    STATIC = "static"  # fixed alpha per expert (proxy tuning)
    DYNAMIC = "dynamic"  # per-step alpha by KL matching; one expert per step


class FusionRouting(enum.Enum):
    """Which expert dynamic fusion uses at a step when a request names several."""

    # The expert under which the sequence so far (prompt and output) is most likely, relative
    # to the small base: the task the text comes from. Its alpha is then chosen by KL matching.
    LIKELIHOOD = "likelihood"
    # The paper's: the (expert, alpha) of lowest KL-matching cost over every expert's grid.
    KL = "kl"


class ConstraintKind(enum.Enum):
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    GRAMMAR = "grammar"
    CHOICE = "choice"


class GrammarSyntax(enum.Enum):
    EBNF = "ebnf"  # GBNF-style EBNF, start rule `root`
    LARK = "lark"  # Lark, start rule `start` (llguidance only)


class GrammarBackend(enum.Enum):
    XGRAMMAR = "xgrammar"
    LLGUIDANCE = "llguidance"


class ConstraintMethod(enum.Enum):
    AWRS = "awrs"  # adaptive weighted rejection sampling: checks only the tokens it draws
    MASK = "mask"  # a full vocabulary mask at every step (the usual baseline)
    SMC = "smc"  # particles extended by AWRS steps, resampled on their weights


@dataclass(frozen=True)
class Constraint:
    """What the output must match (design.md section 7)."""

    kind: ConstraintKind
    source: str = ""  # the schema, regex or grammar text
    choices: tuple[str, ...] = ()  # CHOICE: the output is exactly one of these
    syntax: GrammarSyntax = GrammarSyntax.EBNF
    backend: GrammarBackend | None = None  # None: xgrammar, falling back to llguidance
    method: ConstraintMethod = ConstraintMethod.AWRS
    particles: int = 5  # SMC only
    ess_threshold: float = 0.5  # SMC: resample when ESS < ess_threshold * particles

    def validate(self) -> None:
        lark_on_xgrammar = (
            self.syntax is GrammarSyntax.LARK and self.backend is GrammarBackend.XGRAMMAR
        )
        checks = [
            (self.kind is ConstraintKind.CHOICE or bool(self.source), "the constraint is empty"),
            (self.kind is not ConstraintKind.CHOICE or bool(self.choices), "no choices given"),
            (1 <= self.particles <= 64, "particles must be in [1, 64]"),
            (0.0 <= self.ess_threshold <= 1.0, "ess_threshold must be in [0, 1]"),
            (not lark_on_xgrammar, "Lark grammars need the llguidance engine"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(f"constraint: {message}")


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    output: OutputOptions = field(default_factory=OutputOptions)
    arrival_time: float = 0.0
    # LoRA adapters by id, each with its weight; () runs the base model, (("id", 1.0),) one
    # adapter. Several are applied together: y += sum_i w_i * scaling_i * B_i A_i x.
    adapters: tuple[tuple[str, float], ...] = ()
    # Small experts fused into the logits at every step, by id, each with its fixed alpha for
    # static fusion (None: 1.0; ignored by dynamic fusion). All must share one small base.
    experts: tuple[tuple[str, float | None], ...] = ()
    fusion_mode: FusionMode = FusionMode.DYNAMIC
    fusion_routing: FusionRouting = FusionRouting.LIKELIHOOD
    constraint: Constraint | None = None


class AdapterState(enum.Enum):
    """Where a registered LoRA adapter's weights are (see engine.adapters)."""

    ON_DISK = "on_disk"  # only its path and validated config: read back when a request needs it
    HOST = "host"  # its tensors are in host memory (the host cache)
    DEVICE = "device"  # also in a slot of the stacked copy that the forward pass reads


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    path: str
    rank: int  # the largest rank of its projections
    target_modules: tuple[str, ...]  # the projections it adapts, e.g. ("q_proj", "v_proj")
    state: AdapterState
    pinned: bool  # never evicted from host memory
    size_bytes: int  # its tensors in the model's dtype: the host memory it takes when loaded
    num_requests: int  # requests in flight that use it


@dataclass(frozen=True)
class ExpertInfo:
    expert_id: str
    path: str  # the full small model or the PEFT adapter directory it was loaded from
    small_base: str  # directory of the small model it was tuned from (the anti-expert)
    is_adapter: bool  # a PEFT LoRA adapter on the small base (else a full model)
    num_requests: int  # requests in flight that use it


@dataclass(frozen=True)
class MergeSpec:
    """How Registry.MergeAdapters combines adapters (see engine.lora_merge for the methods)."""

    method: str = "linear"
    density: float = 1.0  # fraction kept by ties / dare_*
    rank: int | None = None  # rank of the SVD methods (default: the inputs' largest)
    seed: int = 0  # DARE's random drops
    pin: bool = False  # never evict the result from host memory


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens or the model's context length
    EOS = "eos"  # the model's end-of-sequence token
    STOP_TOKEN = "stop_token"  # one of stop_token_ids
    STOP_STRING = "stop_string"  # one of the stop strings (not included in the text)
    ABORTED = "aborted"  # cancelled by the client or the server


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class Particle:
    token_ids: tuple[int, ...]
    text: str
    log_weight: float


@dataclass
class RequestOutput:
    """One streamed increment of a request; the last one has `finish_reason` set."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Per token when requested (OutputOptions.fusion_weights): the alpha of each of the
    # request's experts, in the request's order (dynamic fusion: at most one is not 0).
    fusion_weights: list[tuple[float, ...]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # Timestamps (time.monotonic) for metrics; filled on the final output.
    arrival_time: float = 0.0
    first_scheduled_time: float = 0.0
    first_token_time: float = 0.0
    # Constrained requests (on the final output): tokens checked by the grammar engine, steps
    # that fell back to a full mask, and SMC's log weight and particles.
    constraint_checks: int = 0
    constraint_mask_steps: int = 0
    log_weight: float | None = None
    particles: list[Particle] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def aborted(cls, request: Request, completion_tokens: int = 0) -> RequestOutput:
        """The final output of a request ended before (or without) the engine's own."""
        return cls(
            request_id=request.request_id,
            token_ids=[],
            text="",
            finish_reason=FinishReason.ABORTED,
            prompt_tokens=len(request.prompt_token_ids),
            completion_tokens=completion_tokens,
            arrival_time=request.arrival_time,
        )


# ---- engine settings and counters: plain values, torch-free (the server holds them) ----


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_batched_tokens: int = 512  # per-step token budget: the prefill chunk size
    max_prompt_tokens: int | None = None  # default: what the context and the cache can hold
    max_new_tokens: int = 4096
    max_queue: int = 1024
    # AsyncEngine: an idle engine's first request waits for others sent with it while they
    # follow each other within this time (0: never waits); see AsyncEngine._drain_inbox.
    batch_wait_s: float = 0.003
    dtype: str | None = None  # None keeps the checkpoint's dtype
    seed: int = 0  # seeds the generators of requests that give no seed
    # LoRA adapters: how many the forward pass holds stacked ("on device"; also the most that
    # running requests use at once) and how many keep their tensors in host memory.
    adapter_slots: int = 16
    adapter_host_cache: int = 128
    # Each small base's KV pool: its rows and those of its experts (one per fused sequence).
    expert_kv_cache_bytes: int = 256 << 20
    # Constraint compilation: per constraint, at most this long and this much memory.
    constraint_compile_timeout_s: float = 10.0
    constraint_compile_memory_bytes: int = 4 << 30
    # Automatic prefix caching (engine.prefix_cache): requests take the cached KV blocks of a
    # prompt prefix that earlier requests computed.
    prefix_caching: bool = True


@dataclass(frozen=True)
class EngineLimits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_queue: int
    max_seq_tokens: int  # prompt + output, bounded by the context length and the KV cache


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    # Prefix caching, cumulative: prompt tokens of admitted requests, and those found cached.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Running sequences sent back to the queue to free KV blocks (they recompute), cumulative.
    num_preemptions: int = 0


# Sparse activation (engine.sparsity): the rules that score channels, the ways to cut.
SPARSITY_RULES = ("wina", "teal")
SPARSITY_MODES = ("top-k", "threshold")


@dataclass(frozen=True)
class SparsitySettings:
    """What was asked for: plain values (the server reports them in ListModels)."""

    sparsity: float  # target fraction of each group's input channels skipped
    rule: str = "wina"
    mode: str = "top-k"
    calibration_file: str = ""  # needed by the threshold mode; optional with top-k

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise SparsityError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.rule not in SPARSITY_RULES:
            rules = ", ".join(SPARSITY_RULES)
            raise SparsityError(f"sparsity rule must be one of {rules}: {self.rule!r}")
        if self.mode not in SPARSITY_MODES:
            modes = ", ".join(SPARSITY_MODES)
            raise SparsityError(f"sparsity mode must be one of {modes}: {self.mode!r}")
        if self.mode == "threshold" and not self.calibration_file:
            raise SparsityError("the threshold mode needs a calibration file (tandem calibrate)")

    def describe(self) -> str:
        source = f", {self.calibration_file}" if self.calibration_file else ""
        return f"{self.rule.upper()} {self.mode} {self.sparsity:.0%}{source}"
