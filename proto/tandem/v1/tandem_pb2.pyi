from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FusionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_MODE_UNSPECIFIED: _ClassVar[FusionMode]
    FUSION_MODE_STATIC: _ClassVar[FusionMode]
    FUSION_MODE_DYNAMIC: _ClassVar[FusionMode]

class FusionRouting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_ROUTING_UNSPECIFIED: _ClassVar[FusionRouting]
    FUSION_ROUTING_LIKELIHOOD: _ClassVar[FusionRouting]
    FUSION_ROUTING_KL: _ClassVar[FusionRouting]

class ConstraintMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSTRAINT_METHOD_UNSPECIFIED: _ClassVar[ConstraintMethod]
    CONSTRAINT_METHOD_AWRS: _ClassVar[ConstraintMethod]
    CONSTRAINT_METHOD_MASK: _ClassVar[ConstraintMethod]
    CONSTRAINT_METHOD_SMC: _ClassVar[ConstraintMethod]

class GrammarSyntax(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRAMMAR_SYNTAX_UNSPECIFIED: _ClassVar[GrammarSyntax]
    GRAMMAR_SYNTAX_EBNF: _ClassVar[GrammarSyntax]
    GRAMMAR_SYNTAX_LARK: _ClassVar[GrammarSyntax]

class GrammarEngine(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRAMMAR_ENGINE_UNSPECIFIED: _ClassVar[GrammarEngine]
    GRAMMAR_ENGINE_XGRAMMAR: _ClassVar[GrammarEngine]
    GRAMMAR_ENGINE_LLGUIDANCE: _ClassVar[GrammarEngine]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP_TOKEN: _ClassVar[FinishReason]
    FINISH_REASON_STOP_STRING: _ClassVar[FinishReason]
    FINISH_REASON_ABORTED: _ClassVar[FinishReason]

class SparsityRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPARSITY_RULE_UNSPECIFIED: _ClassVar[SparsityRule]
    SPARSITY_RULE_WINA: _ClassVar[SparsityRule]
    SPARSITY_RULE_TEAL: _ClassVar[SparsityRule]

class SparsityMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPARSITY_MODE_UNSPECIFIED: _ClassVar[SparsityMode]
    SPARSITY_MODE_TOP_K: _ClassVar[SparsityMode]
    SPARSITY_MODE_THRESHOLD: _ClassVar[SparsityMode]

class AdapterState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATE_UNSPECIFIED: _ClassVar[AdapterState]
    ADAPTER_STATE_ON_DISK: _ClassVar[AdapterState]
    ADAPTER_STATE_HOST: _ClassVar[AdapterState]
    ADAPTER_STATE_DEVICE: _ClassVar[AdapterState]

class MergeMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_METHOD_UNSPECIFIED: _ClassVar[MergeMethod]
    MERGE_METHOD_LINEAR: _ClassVar[MergeMethod]
    MERGE_METHOD_SVD: _ClassVar[MergeMethod]
    MERGE_METHOD_TIES: _ClassVar[MergeMethod]
    MERGE_METHOD_DARE_LINEAR: _ClassVar[MergeMethod]
    MERGE_METHOD_DARE_TIES: _ClassVar[MergeMethod]
FUSION_MODE_UNSPECIFIED: FusionMode
FUSION_MODE_STATIC: FusionMode
FUSION_MODE_DYNAMIC: FusionMode
FUSION_ROUTING_UNSPECIFIED: FusionRouting
FUSION_ROUTING_LIKELIHOOD: FusionRouting
FUSION_ROUTING_KL: FusionRouting
CONSTRAINT_METHOD_UNSPECIFIED: ConstraintMethod
CONSTRAINT_METHOD_AWRS: ConstraintMethod
CONSTRAINT_METHOD_MASK: ConstraintMethod
CONSTRAINT_METHOD_SMC: ConstraintMethod
GRAMMAR_SYNTAX_UNSPECIFIED: GrammarSyntax
GRAMMAR_SYNTAX_EBNF: GrammarSyntax
GRAMMAR_SYNTAX_LARK: GrammarSyntax
GRAMMAR_ENGINE_UNSPECIFIED: GrammarEngine
GRAMMAR_ENGINE_XGRAMMAR: GrammarEngine
GRAMMAR_ENGINE_LLGUIDANCE: GrammarEngine
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP_TOKEN: FinishReason
FINISH_REASON_STOP_STRING: FinishReason
FINISH_REASON_ABORTED: FinishReason
SPARSITY_RULE_UNSPECIFIED: SparsityRule
SPARSITY_RULE_WINA: SparsityRule
SPARSITY_RULE_TEAL: SparsityRule
SPARSITY_MODE_UNSPECIFIED: SparsityMode
SPARSITY_MODE_TOP_K: SparsityMode
SPARSITY_MODE_THRESHOLD: SparsityMode
ADAPTER_STATE_UNSPECIFIED: AdapterState
ADAPTER_STATE_ON_DISK: AdapterState
ADAPTER_STATE_HOST: AdapterState
ADAPTER_STATE_DEVICE: AdapterState
MERGE_METHOD_UNSPECIFIED: MergeMethod
MERGE_METHOD_LINEAR: MergeMethod
MERGE_METHOD_SVD: MergeMethod
MERGE_METHOD_TIES: MergeMethod
MERGE_METHOD_DARE_LINEAR: MergeMethod
MERGE_METHOD_DARE_TIES: MergeMethod

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "adapter_id", "experts", "text", "token_ids", "sampling", "stopping", "constraint", "fusion", "output", "adapter_mix")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MIX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    adapter_id: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    stopping: StoppingCriteria
    constraint: Constraint
    fusion: FusionOptions
    output: OutputOptions
    adapter_mix: _containers.RepeatedCompositeFieldContainer[AdapterRef]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., adapter_id: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stopping: _Optional[_Union[StoppingCriteria, _Mapping]] = ..., constraint: _Optional[_Union[Constraint, _Mapping]] = ..., fusion: _Optional[_Union[FusionOptions, _Mapping]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., adapter_mix: _Optional[_Iterable[_Union[AdapterRef, _Mapping]]] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("adapter_id", "weight")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    weight: float
    def __init__(self, adapter_id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class StoppingCriteria(_message.Message):
    __slots__ = ("max_new_tokens", "stop", "stop_token_ids", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class ExpertRef(_message.Message):
    __slots__ = ("expert_id", "weight")
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    expert_id: str
    weight: float
    def __init__(self, expert_id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class FusionOptions(_message.Message):
    __slots__ = ("mode", "routing")
    MODE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    mode: FusionMode
    routing: FusionRouting
    def __init__(self, mode: _Optional[_Union[FusionMode, str]] = ..., routing: _Optional[_Union[FusionRouting, str]] = ...) -> None: ...

class Choices(_message.Message):
    __slots__ = ("choices",)
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    choices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, choices: _Optional[_Iterable[str]] = ...) -> None: ...

class Constraint(_message.Message):
    __slots__ = ("json_schema", "regex", "grammar", "choice", "method", "particles", "grammar_syntax", "engine", "ess_threshold")
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARTICLES_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_SYNTAX_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    json_schema: str
    regex: str
    grammar: str
    choice: Choices
    method: ConstraintMethod
    particles: int
    grammar_syntax: GrammarSyntax
    engine: GrammarEngine
    ess_threshold: float
    def __init__(self, json_schema: _Optional[str] = ..., regex: _Optional[str] = ..., grammar: _Optional[str] = ..., choice: _Optional[_Union[Choices, _Mapping]] = ..., method: _Optional[_Union[ConstraintMethod, str]] = ..., particles: _Optional[int] = ..., grammar_syntax: _Optional[_Union[GrammarSyntax, str]] = ..., engine: _Optional[_Union[GrammarEngine, str]] = ..., ess_threshold: _Optional[float] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("logprobs", "top_logprobs", "fusion_weights", "particles")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FUSION_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PARTICLES_FIELD_NUMBER: _ClassVar[int]
    logprobs: bool
    top_logprobs: int
    fusion_weights: bool
    particles: bool
    def __init__(self, logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., fusion_weights: _Optional[bool] = ..., particles: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "delta", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    delta: Delta
    final: Final
    def __init__(self, request_id: _Optional[str] = ..., delta: _Optional[_Union[Delta, _Mapping]] = ..., final: _Optional[_Union[Final, _Mapping]] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("token_ids", "text", "logprobs", "fusion")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    fusion: _containers.RepeatedCompositeFieldContainer[FusionWeights]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., fusion: _Optional[_Iterable[_Union[FusionWeights, _Mapping]]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class FusionWeights(_message.Message):
    __slots__ = ("alphas",)
    ALPHAS_FIELD_NUMBER: _ClassVar[int]
    alphas: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, alphas: _Optional[_Iterable[float]] = ...) -> None: ...

class Final(_message.Message):
    __slots__ = ("finish_reason", "usage", "particles", "log_weight")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PARTICLES_FIELD_NUMBER: _ClassVar[int]
    LOG_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    particles: _containers.RepeatedCompositeFieldContainer[Particle]
    log_weight: float
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., particles: _Optional[_Iterable[_Union[Particle, _Mapping]]] = ..., log_weight: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "constraint_checks", "constraint_mask_steps", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_CHECKS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_MASK_STEPS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    constraint_checks: int
    constraint_mask_steps: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., constraint_checks: _Optional[int] = ..., constraint_mask_steps: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class Particle(_message.Message):
    __slots__ = ("token_ids", "text", "log_weight")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOG_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    log_weight: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., log_weight: _Optional[float] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "text")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "vocab_size", "max_prompt_tokens", "max_new_tokens", "adapters", "experts", "adapter_slots", "adapter_host_cache", "sparsity", "prefix_caching")
    ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_HOST_CACHE_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    id: str
    vocab_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    adapter_slots: int
    adapter_host_cache: int
    sparsity: SparsityInfo
    prefix_caching: bool
    def __init__(self, id: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ..., adapter_slots: _Optional[int] = ..., adapter_host_cache: _Optional[int] = ..., sparsity: _Optional[_Union[SparsityInfo, _Mapping]] = ..., prefix_caching: _Optional[bool] = ...) -> None: ...

class SparsityInfo(_message.Message):
    __slots__ = ("sparsity", "rule", "mode", "calibration_file")
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FILE_FIELD_NUMBER: _ClassVar[int]
    sparsity: float
    rule: SparsityRule
    mode: SparsityMode
    calibration_file: str
    def __init__(self, sparsity: _Optional[float] = ..., rule: _Optional[_Union[SparsityRule, str]] = ..., mode: _Optional[_Union[SparsityMode, str]] = ..., calibration_file: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("adapter_id", "path", "rank", "target_modules", "state", "pinned", "size_bytes", "num_requests")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    path: str
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    state: AdapterState
    pinned: bool
    size_bytes: int
    num_requests: int
    def __init__(self, adapter_id: _Optional[str] = ..., path: _Optional[str] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[AdapterState, str]] = ..., pinned: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., num_requests: _Optional[int] = ...) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("expert_id", "path", "small_base", "is_adapter", "num_requests")
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SMALL_BASE_FIELD_NUMBER: _ClassVar[int]
    IS_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    expert_id: str
    path: str
    small_base: str
    is_adapter: bool
    num_requests: int
    def __init__(self, expert_id: _Optional[str] = ..., path: _Optional[str] = ..., small_base: _Optional[str] = ..., is_adapter: _Optional[bool] = ..., num_requests: _Optional[int] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "path", "model", "pin")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    path: str
    model: str
    pin: bool
    def __init__(self, adapter_id: _Optional[str] = ..., path: _Optional[str] = ..., model: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "model")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    model: str
    def __init__(self, adapter_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MergeAdaptersRequest(_message.Message):
    __slots__ = ("adapter_id", "model", "sources", "method", "density", "rank", "seed", "pin")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    model: str
    sources: _containers.RepeatedCompositeFieldContainer[AdapterRef]
    method: MergeMethod
    density: float
    rank: int
    seed: int
    pin: bool
    def __init__(self, adapter_id: _Optional[str] = ..., model: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[AdapterRef, _Mapping]]] = ..., method: _Optional[_Union[MergeMethod, str]] = ..., density: _Optional[float] = ..., rank: _Optional[int] = ..., seed: _Optional[int] = ..., pin: _Optional[bool] = ...) -> None: ...

class MergeAdaptersResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class LoadExpertRequest(_message.Message):
    __slots__ = ("expert_id", "path", "model", "small_base")
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SMALL_BASE_FIELD_NUMBER: _ClassVar[int]
    expert_id: str
    path: str
    model: str
    small_base: str
    def __init__(self, expert_id: _Optional[str] = ..., path: _Optional[str] = ..., model: _Optional[str] = ..., small_base: _Optional[str] = ...) -> None: ...

class LoadExpertResponse(_message.Message):
    __slots__ = ("expert",)
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    expert: ExpertInfo
    def __init__(self, expert: _Optional[_Union[ExpertInfo, _Mapping]] = ...) -> None: ...

class UnloadExpertRequest(_message.Message):
    __slots__ = ("expert_id", "model")
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    expert_id: str
    model: str
    def __init__(self, expert_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class UnloadExpertResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
