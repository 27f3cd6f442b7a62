"""The synchronous engine: one `step()` is schedule -> run -> sample -> postprocess."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.adapters import AdapterRefs, AdapterRegistry
from engine.awrs import ConstraintState, StepOutcome, mask_logits, sample_constrained
from engine.batch import ForwardBatch
from engine.detokenizer import IncrementalDetokenizer
from engine.experts import Expert, ExpertRegistry
from engine.fusion import FusionRow, FusionState, fuse, prepare_experts
from engine.grammar import CompiledConstraint, CompileLimits, ConstraintCompiler
from engine.kv_cache import BlockAllocator, KVCache, OutOfBlocks
from engine.lora import AdapterStacks, AdapterUse, LoraAdapter, LoraBatch
from engine.lora_merge import merge_adapters, save_adapter
from engine.model import CausalLM
from engine.prefix_cache import BlockDigests
from engine.sampling import (
    compute_logprobs,
    filter_logits,
    race_keys,
    request_generator,
    sample,
)
from engine.scheduler import ScheduledSequence, Scheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus
from engine.smc import ParticleGroup, fork_sequence, resample
from engine.sparsity import apply_sparsity
from engine.stopping import StopStringMatcher
from engine.tokenizer import Tokenizer
from engine.types import (
    AdapterInfo,
    AlreadyExists,
    Constraint,
    ConstraintMethod,
    EngineConfig,
    EngineLimits,
    EngineStats,
    ExpertInfo,
    FinishReason,
    InvalidRequest,
    MergeSpec,
    Particle,
    Request,
    RequestOutput,
    SparsitySettings,
    TokenLogprob,
)
from kernels.cpu_ops import race_uniform
from kernels.threads import serial_ops

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        mc = model.config
        per_block = KVCache.bytes_per_block(
            mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim, model.dtype
        )
        num_blocks = max(1, config.kv_cache_bytes // per_block)
        self.kv = model.new_kv_cache(num_blocks, config.block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.block_size,
                config.max_num_seqs,
                config.max_batched_tokens,
                max_adapters=config.adapter_slots,
            ),
            self.allocator,
        )
        max_seq_tokens = min(mc.max_position_embeddings, num_blocks * config.block_size)
        max_prompt = max_seq_tokens - 1
        if config.max_prompt_tokens is not None:
            max_prompt = min(max_prompt, config.max_prompt_tokens)
        self.limits = EngineLimits(
            max_prompt_tokens=max_prompt,
            max_new_tokens=config.max_new_tokens,
            max_queue=config.max_queue,
            max_seq_tokens=max_seq_tokens,
        )
        self.eos_token_ids = frozenset(mc.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        # Unseeded rows share one batched draw from this generator each step.
        self._rng = torch.Generator().manual_seed(config.seed)
        self._seqs: dict[str, Sequence] = {}
        self.adapters = AdapterRegistry(
            mc, model.dtype, config.adapter_slots, config.adapter_host_cache
        )
        self._adapter_stacks = AdapterStacks(
            mc,
            model.weights.embed.device,
            model.dtype,
            max_slots=config.adapter_slots,
            victim_key=self.adapters.victim_key,
        )
        self._stacks_version = self._adapter_stacks.version
        self.experts = ExpertRegistry(
            mc, tokenizer, model.dtype, config.expert_kv_cache_bytes, config.block_size
        )
        self.constraints = ConstraintCompiler(
            tokenizer,
            mc.vocab_size,
            tuple(sorted(self.eos_token_ids)),
            CompileLimits(
                config.constraint_compile_timeout_s, config.constraint_compile_memory_bytes
            ),
        )

    @classmethod
    def from_dir(
        cls, path: str, config: EngineConfig | None = None, sparsity: SparsitySettings | None = None
    ) -> LLMEngine:
        """The model at `path`, with sparse activation when `sparsity` is given."""
        config = config or EngineConfig()
        dtype = _DTYPES[config.dtype] if config.dtype else None
        engine = cls(CausalLM.from_dir(path, dtype=dtype), Tokenizer.from_dir(path), config)
        if sparsity is not None:  # changes the weights' layout: before any step
            apply_sparsity(engine.model, sparsity)
        return engine

    # ---- requests -------------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        """Raise InvalidRequest when the request can never run, NotFound when it names an
        adapter that is not loaded; cheap, reads no state but the adapter registry."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        if len(prompt) > self.limits.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt has {len(prompt)} tokens, the limit is {self.limits.max_prompt_tokens}"
            )
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequest(f"token ids must be in [0, {vocab})")
        if request.stopping.max_new_tokens > self.limits.max_new_tokens:
            raise InvalidRequest(
                f"max_new_tokens {request.stopping.max_new_tokens} is over the limit "
                f"{self.limits.max_new_tokens}"
            )
        request.sampling.validate()
        request.stopping.validate()
        request.output.validate()
        self.adapters.check(request.adapters)
        if request.experts:
            self._check_fusion(request, self.experts.check(request.experts))
        if request.constraint is not None:
            self._check_constraint(request, request.constraint)

    def _check_constraint(self, request: Request, constraint: Constraint) -> None:
        constraint.validate()
        if request.stopping.ignore_eos:
            raise InvalidRequest(
                "ignore_eos cannot be combined with a constraint: a constrained output ends "
                "where the constraint does"
            )

    def compile_constraint(self, constraint: Constraint) -> CompiledConstraint:
        """Compile (or find in the cache) a request's constraint: blocking, up to the compile
        time limit; run it off the step thread. Raises InvalidRequest."""
        return self.constraints.compile(constraint)

    def _check_fusion(self, request: Request, experts: tuple[Expert, ...]) -> None:
        vocab = min(expert.vocab_size for expert in experts)
        if max(request.prompt_token_ids) >= vocab:
            raise InvalidRequest(f"token ids must be in [0, {vocab}) with these experts")
        limit = self._max_tokens(experts)
        if len(request.prompt_token_ids) >= limit:
            raise InvalidRequest(
                f"prompt has {len(request.prompt_token_ids)} tokens; with "
                f"{len(experts)} expert(s) the small base's KV pool holds {limit} tokens per "
                f"sequence (raise expert_kv_cache_bytes)"
            )

    def _max_tokens(self, experts: tuple[Expert, ...]) -> int:
        """Prompt + output of one sequence: the context, and with experts what the small
        base's KV pool holds for its 1 + len(experts) rows."""
        if not experts:
            return self.limits.max_seq_tokens
        base = experts[0].small_base
        pool_tokens = base.num_blocks // (1 + len(experts)) * self.config.block_size
        return min(
            self.limits.max_seq_tokens, pool_tokens, base.model.config.max_position_embeddings
        )

    def add_request(
        self,
        request: Request,
        adapters: AdapterUse | None = None,
        constraint: CompiledConstraint | None = None,
    ) -> None:
        """`adapters`: the request's adapters as `hold_adapters` returned them (the engine
        releases them when the request ends, or here when it is refused). Without them they
        are held here, which reads the files of adapters on disk: fine for a caller that
        steps the engine itself, never on the step thread of a server. Likewise
        `constraint`: the request's constraint as `compile_constraint` returned it, else it
        is compiled here."""
        try:
            self.validate(request)
            if request.request_id in self._seqs:
                raise InvalidRequest(f"request id {request.request_id!r} is already running")
            if request.constraint is not None and constraint is None:
                constraint = self.compile_constraint(request.constraint)
        except BaseException:
            self.adapters.release(adapters or ())
            raise
        if adapters is None:
            adapters = self.adapters.hold(request.adapters) or ()
        try:
            fusion = self._fusion_state(request)
        except BaseException:
            self.adapters.release(adapters)
            raise
        if not request.arrival_time:
            request.arrival_time = time.monotonic()
        seq = Sequence(
            request=request,
            token_ids=list(request.prompt_token_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids),
            stop_matcher=StopStringMatcher(request.stopping.stop)
            if request.stopping.stop
            else None,
            generator=request_generator(request.sampling.seed),
            adapters=adapters,
            fusion=fusion,
            constraint=ConstraintState(constraint.matcher(), request.constraint.method)
            if constraint is not None and request.constraint is not None
            else None,
            max_tokens=self._max_tokens(fusion.experts if fusion else ()),
            prefix=self._block_digests(adapters),
        )
        if request.constraint is not None and request.constraint.method is ConstraintMethod.SMC:
            seq.group = self._particle_group(request, request.constraint)
            seq.group.particles.append(seq)
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def _block_digests(self, adapters: AdapterUse) -> BlockDigests | None:
        """A new sequence's block digests, or None where prefix caching is off. Fusion does not
        change the large model's keys and values: a fused sequence takes and offers blocks
        too, and its small models catch up on a cached prefix (FusionState.num_computed)."""
        if not self.config.prefix_caching:
            return None
        context = (self.model.kv_version, tuple((a.uid, scale) for a, scale in adapters))
        return BlockDigests(context)

    def _particle_group(self, request: Request, constraint: Constraint) -> ParticleGroup:
        seed = request.sampling.seed
        if seed is None:
            seed = int(torch.randint(1 << 62, (1,), generator=self._rng))
        return ParticleGroup(
            size=constraint.particles,
            ess_threshold=constraint.ess_threshold,
            generator=torch.Generator().manual_seed(seed),
        )

    def _fusion_state(self, request: Request) -> FusionState | None:
        if not request.experts:
            return None
        experts = self.experts.hold(request.experts)
        alphas = tuple(1.0 if weight is None else weight for _, weight in request.experts)
        return FusionState(experts, alphas, request.fusion_mode, request.fusion_routing)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        if seq.group is not None:
            for particle in seq.group.particles:
                self._drop_particle(particle)
            seq.pending_token_ids, seq.pending_text, seq.pending_logprobs = [], [], []
        self._release(seq)
        seq.finish_reason = FinishReason.ABORTED
        return self._take_output(seq)

    def abort_all(self) -> list[str]:
        """Abort every request (after a failed step); returns their ids. The prefix cache is
        emptied too: the failed step registered blocks it may not have written."""
        ids = list(self._seqs)
        for request_id in ids:
            self.abort(request_id)
        self.allocator.clear_cache()
        return ids

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.allocator.num_used,
            kv_blocks_total=self.allocator.num_blocks,
            prefix_cache_queries=self.scheduler.prefix_queries,
            prefix_cache_hits=self.scheduler.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
        )

    # ---- LoRA adapters ----------------------------------------------------------------------
    # The registry (engine.adapters) is thread-safe; these may be called from any thread. Those
    # that read files say so: a server runs them in an executor, never on the step thread.

    def load_adapter(self, adapter_id: str, path: str | Path, pin: bool = False) -> LoraAdapter:
        """Read and validate a PEFT LoRA directory and register it as `adapter_id` (blocking).
        `pin`: never evicted from host memory."""
        return self.adapters.register(adapter_id, path, pin)

    def add_adapter(self, adapter_id: str, adapter: LoraAdapter, pin: bool = False) -> None:
        """Register a loaded adapter; requests name it in `Request.adapters`."""
        self.adapters.add(adapter_id, adapter, pin)

    def remove_adapter(self, adapter_id: str) -> None:
        """Unregister an adapter: new requests naming it get NotFound, running ones finish."""
        self.adapters.remove(adapter_id)

    def adapter_ids(self) -> list[str]:
        return self.adapters.ids()

    def adapter_infos(self) -> list[AdapterInfo]:
        return self.adapters.infos()

    def hold_adapters(self, refs: AdapterRefs, may_load: bool = True) -> AdapterUse | None:
        """A request's adapters, kept in host memory until the request ends; pass them to
        add_request. Reads the files of adapters on disk (blocking) when `may_load`; without
        it, None when one is on disk. Errors: NotFound, InvalidRequest, AdapterError."""
        return self.adapters.hold(refs, may_load)

    def release_adapters(self, adapters: AdapterUse) -> None:
        """Give back held adapters that never reached add_request."""
        self.adapters.release(adapters)

    def merge_adapters(
        self, adapter_id: str, sources: AdapterRefs, out_dir: str | Path, spec: MergeSpec
    ) -> LoraAdapter:
        """Merge registered adapters (id, weight) into a new adapter, written as a PEFT directory
        at out_dir and registered as adapter_id (blocking: may read the sources' files)."""
        if adapter_id in self.adapter_ids():
            raise AlreadyExists(f"adapter {adapter_id!r} is already loaded")
        held = self.hold_adapters([(source, 1.0) for source, _ in sources])
        try:
            merged = merge_adapters(
                [adapter for adapter, _ in held],
                [weight for _, weight in sources],
                spec.method,
                density=spec.density,
                rank=spec.rank,
                seed=spec.seed,
            )
        finally:
            self.release_adapters(held)
        save_adapter(merged, out_dir)
        return self.load_adapter(adapter_id, out_dir, spec.pin)

    # ---- experts (dynamic logit fusion) -----------------------------------------------------
    # Thread-safe like the adapter methods; load_expert reads files (blocking).

    def load_expert(self, expert_id: str, path: str | Path, small_base: str | Path) -> ExpertInfo:
        """Load an expert (a full small model directory, or a PEFT LoRA adapter on
        `small_base`) and its small base (once per directory, shared) and register it.
        Errors: AlreadyExists; ExpertError (kind "not_found" for a missing directory or file,
        else "failed_precondition": tokenizer or vocabulary differs from this model's, an
        expert whose shape differs from its small base, an unsupported model)."""
        return self.experts.load(expert_id, path, small_base)

    def remove_expert(self, expert_id: str) -> None:
        """Unregister an expert (NotFound if unknown): new requests naming it get NotFound,
        running ones finish with it."""
        self.experts.remove(expert_id)

    def expert_infos(self) -> list[ExpertInfo]:
        return self.experts.infos()

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        # Every model's pass is made ready before the first runs: their Python then runs back
        # to back while warm, not each after a model's weights have streamed through the caches.
        forward = self.model.prepare(
            self._forward_batch(scheduled), self.kv, self._lora_batch(scheduled)
        )
        experts = self._prepare_experts(scheduled)
        logits = forward()
        sampling = [s.seq for s in scheduled if s.samples]
        if experts is not None:
            self._fuse(*experts, sampling, logits)
        for s in scheduled:
            s.seq.num_computed += s.num_new_tokens
        if not sampling:
            return []
        if any(seq.group is not None and not seq.group.spawned for seq in sampling):
            sampling, logits = self._spawn_particles(sampling, logits)
        with serial_ops(logits.numel()):
            self._sample_and_append(sampling, logits)
        outputs = [self._take_output(seq) for seq in sampling if seq.group is None]
        groups = {id(seq.group): seq.group for seq in sampling if seq.group is not None}
        for group in groups.values():
            outputs.extend(self._advance_group(group))
        return outputs

    # ---- SMC particles ----------------------------------------------------------------------

    def _spawn_particles(
        self, sampling: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], torch.Tensor]:
        """At an SMC request's first draw, fork its prefilled sequence into its particles,
        which all draw from the same logits row."""
        rows, extra = [], []
        for row, seq in enumerate(sampling):
            group = seq.group
            if group is None or group.spawned:
                continue
            group.spawned = True
            for _ in range(group.size - 1):
                try:
                    child = self._fork_particle(seq)
                except OutOfBlocks:
                    log.warning("SMC request %s: fewer particles, KV cache full", seq.request_id)
                    break
                group.particles.append(child)
                rows.append(row)
                extra.append(child)
        if not extra:
            return sampling, logits
        return sampling + extra, torch.cat([logits, logits[rows]])

    def _fork_particle(self, seq: Sequence) -> Sequence:
        group = seq.group
        assert group is not None
        seed = int(torch.randint(1 << 62, (1,), generator=group.generator))
        generator = None if seq.generator is None else request_generator(seed)
        child = fork_sequence(seq, self.allocator, self.kv, self.config.block_size, generator)
        if child.status is SequenceStatus.RUNNING:
            self.scheduler.running.append(child)
        elif child.status is SequenceStatus.WAITING:
            self.scheduler.waiting.appendleft(child)
        return child

    def _drop_particle(self, seq: Sequence) -> None:
        if not seq.is_finished:
            self.scheduler.finish(seq)

    def _advance_group(self, group: ParticleGroup) -> list[RequestOutput]:
        """Resample when the weights degenerate; the request's output once all finished."""
        if not group.finished() and group.needs_resampling():
            try:
                resample(group, self._fork_particle, self._drop_particle)
            except OutOfBlocks:
                log.warning("SMC resampling skipped: KV cache full")
        # Resampling may drop the last running particles: check after it.
        return [self._group_output(group)] if group.finished() else []

    def _group_output(self, group: ParticleGroup) -> RequestOutput:
        chosen = group.choose()
        lead = self._seqs.pop(chosen.request_id)
        self.adapters.release(lead.adapters)
        if lead.fusion is not None:
            self.experts.release(lead.fusion.experts)
        particles = [
            Particle(tuple(p.pending_token_ids), "".join(p.pending_text), weight)
            for p, weight in zip(group.particles, group.log_weights(), strict=True)
        ]
        out = self._take_output(chosen)
        out.constraint_checks, out.constraint_mask_steps = group.checks, group.mask_steps
        if chosen.request.output.particles:
            out.particles = particles
        return out

    def _prepare_experts(
        self, scheduled: list[ScheduledSequence]
    ) -> tuple[list[FusionRow], Callable[[], list[list[torch.Tensor]]]] | None:
        """The step's fused sequences, and their small models' passes made ready (None where
        no sequence is fused)."""
        rows = [
            FusionRow(
                s.seq.fusion,
                s.seq.token_ids[s.seq.fusion.num_computed : s.context_len],
                s.context_len,
                s.samples,
            )
            for s in scheduled
            if s.seq.fusion is not None
        ]
        return (rows, prepare_experts(rows, self.config.block_size)) if rows else None

    @torch.inference_mode()
    def _fuse(
        self,
        rows: list[FusionRow],
        run_experts: Callable[[], list[list[torch.Tensor]]],
        sampling: list[Sequence],
        logits: torch.Tensor,
    ) -> None:
        """Run the experts' small models on the step's fused rows and fuse the logits of those
        that sample (in place); their alphas go to the output when asked for."""
        small = run_experts()
        for row in rows:
            row.state.num_computed = row.context_len
        fused = [i for i, seq in enumerate(sampling) if seq.fusion is not None]
        if not fused:
            return
        alphas = fuse([sampling[i].fusion for i in fused], logits, fused, small)
        for i, row_alphas in zip(fused, alphas, strict=True):
            seq = sampling[i]
            if seq.request.output.fusion_weights:
                seq.pending_fusion_weights.append(row_alphas)

    def _forward_batch(self, scheduled: list[ScheduledSequence]) -> ForwardBatch:
        return ForwardBatch.build(
            token_ids=[s.new_token_ids for s in scheduled],
            context_lens=[s.context_len for s in scheduled],
            block_tables=[s.seq.block_table for s in scheduled],
            block_size=self.config.block_size,
            logits_rows=[s.samples for s in scheduled],
        )

    def _lora_batch(self, scheduled: list[ScheduledSequence]) -> LoraBatch | None:
        """The step's LoRA rows; None (no LoRA work at all) when no sequence has an adapter."""
        stacks = self._adapter_stacks
        lora = None
        if any(s.seq.adapters for s in scheduled):
            lora = stacks.batch(
                [s.seq.adapters for s in scheduled], [s.num_new_tokens for s in scheduled]
            )
        elif self._holds_unloaded_adapters() and not any(s.adapters for s in self._seqs.values()):
            # Unloaded adapters keep their slots while requests use them; after, free them.
            stacks.drop(keep=self.adapters.is_registered)
        if stacks.version != self._stacks_version:
            self._stacks_version = stacks.version
            self.adapters.set_device(stacks.slots)
        return lora

    def _holds_unloaded_adapters(self) -> bool:
        return not all(map(self.adapters.is_registered, self._adapter_stacks.slots))

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = self._sample(seqs, logits)
        top_n = [
            seq.request.output.top_logprobs if seq.request.output.logprobs else -1 for seq in seqs
        ]
        logprobs = None
        if max(top_n) >= 0:
            # A dead end (no allowed token) has no token to report: any id will do there.
            chosen = [0 if token is None else token for token in tokens]
            logprobs = compute_logprobs(logits, chosen, top_n)
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if not seq.first_token_time:
                seq.first_token_time = now
            if token is None:
                self._finish(seq, FinishReason.ABORTED)
                continue
            if seq.constraint is not None:
                seq.constraint.matcher.accept(token)
            self._append_token(seq, token, logprobs[i] if logprobs and top_n[i] >= 0 else None)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
        """One token per sequence; None where a constraint allows no token at all."""
        walked = [
            i
            for i, seq in enumerate(seqs)
            if seq.constraint is not None and seq.constraint.method is not ConstraintMethod.MASK
        ]
        drawn = sorted(set(range(len(seqs))) - set(walked))
        tokens: list[int | None] = [None] * len(seqs)
        if drawn:
            rows = logits if len(drawn) == len(seqs) else logits[drawn]
            masked = [j for j, i in enumerate(drawn) if seqs[i].constraint is not None]
            if masked:
                rows = rows.clone()
                rows[masked] = mask_logits(
                    rows[masked], [seqs[drawn[j]].constraint.matcher for j in masked]
                )
                for j in masked:
                    seqs[drawn[j]].constraint.mask_steps += 1
            picked = sample(
                rows,
                [seqs[i].request.sampling for i in drawn],
                [seqs[i].generator for i in drawn],
                [seqs[i].token_ids for i in drawn],
                engine_generator=self._rng,
            ).tolist()
            for i, token in zip(drawn, picked, strict=True):
                tokens[i] = token
        if walked:
            outcomes = self._walk([seqs[i] for i in walked], logits[walked])
            for i, outcome in zip(walked, outcomes, strict=True):
                seqs[i].constraint.record(outcome)
                if seqs[i].group is not None:
                    seqs[i].group.checks += outcome.checks
                    seqs[i].group.mask_steps += outcome.used_mask
                tokens[i] = outcome.token
        return tokens

    def _walk(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutcome]:
        """AWRS for constrained rows: filters (temperature, top-k/p, min-p) first, then the
        constraint. Where the filters leave no allowed token, the row retries without them."""
        params = [seq.request.sampling for seq in seqs]
        filtered = filter_logits(logits, params, [seq.token_ids for seq in seqs])
        matchers = [seq.constraint.matcher for seq in seqs]
        greedy = [p.greedy for p in params]
        want_weight = [seq.constraint.method is ConstraintMethod.SMC for seq in seqs]

        def uniform(rows: Sequence[int]) -> torch.Tensor:
            # The race's hashed uniforms, a key per row from its generator: seeded walks are
            # reproducible whatever the batch, without V draws from a generator.
            keys = race_keys([seqs[r].generator for r in rows], self._rng)
            return race_uniform(keys, logits.shape[-1]).to(logits.device)

        outcomes = sample_constrained(
            filtered.log_softmax(dim=-1), matchers, greedy, want_weight, uniform
        )
        stuck = [i for i, o in enumerate(outcomes) if o.token is None and not want_weight[i]]
        if stuck:
            raw = logits[stuck].log_softmax(dim=-1)
            retried = sample_constrained(
                raw,
                [matchers[i] for i in stuck],
                [greedy[i] for i in stuck],
                [False] * len(stuck),
                lambda rows: uniform([stuck[r] for r in rows]),
            )
            for i, outcome in zip(stuck, retried, strict=True):
                outcome.checks += outcomes[i].checks
                outcome.used_mask |= outcomes[i].used_mask
                outcomes[i] = outcome
        return outcomes

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        seq.token_ids.append(token)
        seq.pending_token_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        stopping = seq.request.stopping
        reason = None
        if token in stopping.stop_token_ids:
            reason = FinishReason.STOP_TOKEN
        elif token in self.eos_token_ids and not stopping.ignore_eos:
            reason = FinishReason.EOS
        else:
            reason = self._push_text(seq, seq.detokenizer.push([token]))
        if reason is None and (
            seq.num_output_tokens >= stopping.max_new_tokens or len(seq.token_ids) >= seq.max_tokens
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, reason)

    def _push_text(self, seq: Sequence, text: str) -> FinishReason | None:
        if seq.stop_matcher is None:
            seq.pending_text.append(text)
            return None
        safe, matched = seq.stop_matcher.push(text)
        seq.pending_text.append(safe)
        return FinishReason.STOP_STRING if matched else None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if reason is not FinishReason.STOP_STRING:
            self._push_text(seq, seq.detokenizer.flush())
            if seq.stop_matcher is not None:
                seq.pending_text.append(seq.stop_matcher.flush())
        seq.finish_reason = reason
        if seq.group is not None:  # the request ends when all its particles have
            self.scheduler.finish(seq)
            return
        self._seqs.pop(seq.request_id, None)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.adapters.release(seq.adapters)
        if seq.fusion is not None:
            self.experts.release(seq.fusion.experts)

    def _take_output(self, seq: Sequence) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            token_ids=seq.pending_token_ids,
            text="".join(seq.pending_text),
            logprobs=seq.pending_logprobs,
            fusion_weights=seq.pending_fusion_weights,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            cached_prompt_tokens=seq.cached_prompt_tokens,
            arrival_time=seq.request.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
        )
        if seq.constraint is not None and seq.finish_reason is not None:
            out.constraint_checks = seq.constraint.checks
            out.constraint_mask_steps = seq.constraint.mask_steps
            if seq.constraint.method is ConstraintMethod.SMC:
                out.log_weight = seq.constraint.log_weight
        seq.pending_token_ids, seq.pending_text, seq.pending_logprobs = [], [], []
        seq.pending_fusion_weights = []
        return out

    # ---- convenience for tests and benchmarks ----------------------------------------------

    def generate(self, requests: list[Request]) -> dict[str, RequestOutput]:
        """Run requests to completion; returns each request's whole output, merged."""
        merged: dict[str, RequestOutput] = {}
        for request in requests:
            self.add_request(request)
        while self.has_unfinished():
            for out in self.step():
                merged[out.request_id] = _merge(merged.get(out.request_id), out)
        return merged


def _merge(acc: RequestOutput | None, out: RequestOutput) -> RequestOutput:
    if acc is None:
        return out
    acc.token_ids = acc.token_ids + out.token_ids
    acc.text += out.text
    acc.logprobs = acc.logprobs + out.logprobs
    acc.fusion_weights = acc.fusion_weights + out.fusion_weights
    acc.finish_reason = out.finish_reason
    acc.completion_tokens = out.completion_tokens
    acc.cached_prompt_tokens = out.cached_prompt_tokens
    acc.first_token_time = out.first_token_time
    acc.constraint_checks = out.constraint_checks
    acc.constraint_mask_steps = out.constraint_mask_steps
    acc.log_weight = out.log_weight
    acc.particles = out.particles
    return acc
