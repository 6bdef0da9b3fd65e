"""The engine loop: validate and admit requests, then step schedule -> execute -> update -> output
(-> propose drafts, when speculating).

``LLMEngine`` is not thread-safe: one thread owns it and calls ``step``. ``prepare_request``
is the exception: it only reads immutable state, so the service calls it on its own threads
to reject bad input before anything is admitted.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from engine.config import EngineArgs
from engine.detokenizer import IncrementalDetokenizer
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, PendingOutput
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams
from engine.spec_decode.draft_model import DraftModelProposer, load_draft_config
from engine.spec_decode.ngram_proposer import NgramProposer
from engine.spec_decode.policy import SpeculationPolicy
from engine.spec_decode.proposer import DraftRequest, Proposer
from engine.tokenizer import Tokenizer
from scheduler.config import SchedulerConfig
from scheduler.outputs import RequestUpdate, RunnerOutput, SchedulerOutput
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import QueueFullError, Scheduler

logger = logging.getLogger(__name__)

_THROUGHPUT_WINDOW_S = 10.0


@dataclass(slots=True)
class PreparedRequest:
    """A validated, tokenized request, ready for ``add_prepared_request``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Choice:
    """One of the n sequences of a request (its own scheduler request)."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class _RequestState:
    prepared: PreparedRequest
    choices: list[_Choice]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


def _async_safe(params: SamplingParams) -> bool:
    """Whether a request's sampling ignores its latest token and needs no logprobs, so that a
    step can be scheduled before the previous one's token is known."""
    return (params.logprobs is None and params.seed is None and params.min_tokens == 0
            and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0)


@dataclass(slots=True)
class RequestPreparer:
    """Validates and tokenizes requests against the engine's limits without touching its state,
    so any thread (or the server's process, when the engine runs in its own) may call it."""

    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    sliding_window: int | None
    max_logprobs: int
    block_size: int
    num_usable_blocks: int

    def prepare(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> PreparedRequest:
        """Validate and tokenize; raise ``ValueError`` naming the bad field."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt)
            if not token_ids:
                raise ValueError("prompt encodes to zero tokens")
        else:
            text = None
            token_ids = list(prompt)
            if not token_ids:
                raise ValueError("prompt_token_ids must not be empty")
            for tid in token_ids:
                if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < self.vocab_size:
                    raise ValueError(
                        f"prompt_token_ids: token id {tid!r} is outside the vocabulary (size {self.vocab_size})"
                    )
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        params.verify(vocab_size=self.vocab_size, max_logprobs=self.max_logprobs)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        max_len = self.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens, which leaves no room to generate within "
                f"max_model_len ({max_len})"
            )
        if params.max_tokens is None:
            params = replace(params, max_tokens=max_len - len(token_ids))
        elif len(token_ids) + params.max_tokens > max_len:
            raise ValueError(
                f"max_tokens: prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds max_model_len ({max_len})"
            )
        blocks_needed = -(-(len(token_ids) + params.max_tokens) // self.block_size)
        if self.sliding_window is None and blocks_needed > self.num_usable_blocks:
            raise ValueError(
                f"max_tokens: prompt + max_tokens needs {blocks_needed} KV blocks but the cache has "
                f"only {self.num_usable_blocks}"
            )
        return PreparedRequest(request_id, text, token_ids, params, priority, cache_salt)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.model_config = ModelConfig.from_pretrained(
            args.model, dtype=args.dtype, max_model_len=args.max_model_len, device=args.device,
            quantization=args.quantization,
        )
        self.tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
        self.runner = ModelRunner(self.model_config, args)
        self.proposer = self._make_proposer()
        self.runner.load_model()
        draft_block_bytes = 0
        if isinstance(self.proposer, DraftModelProposer):
            self.proposer.load_model()  # before the KV cache is sized: its weights take memory too
            draft_block_bytes = self.proposer.kv_block_bytes()
        self.num_kv_blocks = self.runner.initialize_kv_cache(draft_block_bytes)
        if isinstance(self.proposer, DraftModelProposer):
            self.proposer.initialize_kv_cache(self.num_kv_blocks)
        self.speculation = SpeculationPolicy(args.speculative_disable_batch_size,
                                             self.proposer.pause_rule if self.proposer else None)
        if args.speculative:
            logger.info("speculative decoding: %s, k=%d, off above %s running requests", args.speculative_model or
                        "n-gram prompt lookup", args.num_speculative_tokens, args.speculative_disable_batch_size)
        # Per request with drafts in flight that were drawn at random: their distributions.
        self._draft_probs: dict[str, torch.Tensor] = {}
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=self.model_config.max_model_len,
                block_size=args.block_size,
                num_blocks=self.num_kv_blocks,
                enable_prefix_caching=args.enable_prefix_caching,
                prefix_caching_hash_algo=args.prefix_caching_hash_algo,
                sliding_window=self.model_config.sliding_window,
                # The bound is enforced in add_prepared_request, which knows about the n choices.
                max_waiting_requests=None,
            )
        )
        self.preparer = RequestPreparer(
            self.tokenizer, self.vocab_size, self.model_config.max_model_len, self.model_config.sliding_window,
            args.max_logprobs, args.block_size, self.scheduler.config.num_usable_blocks)
        eos = list(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self._eos_token_id = eos[0] if eos else None
        self._extra_eos_ids = frozenset(eos[1:])
        self._requests: dict[str, _RequestState] = {}
        self._choice_of: dict[str, tuple[_RequestState, _Choice]] = {}
        self._pending_aborted: list[RequestOutput] = []
        self._deferred_choices: dict[str, list[Request]] = {}
        self._recent_tokens: collections.deque[tuple[float, int]] = collections.deque()
        # Asynchronous scheduling: the step in flight, and how many unfinished requests need
        # synchronous steps (see EngineArgs.async_scheduling).
        self._in_flight: tuple[SchedulerOutput, PendingOutput] | None = None
        self._num_sync_only = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    def _make_proposer(self) -> Proposer | None:
        args = self.args
        if args.speculative_method == "ngram":
            return NgramProposer(args.ngram_prompt_lookup_min, args.ngram_prompt_lookup_max)
        if args.speculative_method == "draft":
            runner = self.runner
            return DraftModelProposer(
                load_draft_config(args, self.model_config), args, runner.attention_backend,
                self.model_config.eos_token_ids,
                graph_batch_size=runner.max_verify_batch_size if runner.uses_cuda_graphs else None)
        return None

    # ------------------------------------------------------------------ admission
    @property
    def vocab_size(self) -> int:
        # The embedding's size bounds valid ids (it may exceed the tokenizer's, never the reverse).
        return self.model_config.vocab_size

    def prepare_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> PreparedRequest:
        """Validate and tokenize; raise ``ValueError`` naming the bad field. Thread-safe."""
        return self.preparer.prepare(request_id, prompt, params, priority, cache_salt)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        self.add_prepared_request(self.prepare_request(request_id, prompt, params, priority, cache_salt))

    def add_prepared_request(self, prepared: PreparedRequest) -> None:
        """Admit a prepared request (all n choices, or none: raises ``QueueFullError``)."""
        if prepared.request_id in self._requests:
            raise ValueError(f"request_id {prepared.request_id!r} is already in use")
        params = prepared.params
        choices = []
        for i in range(params.n):
            child_params = params if params.n == 1 else replace(
                params, n=1, seed=None if params.seed is None else params.seed + i
            )
            child_id = prepared.request_id if params.n == 1 else f"{prepared.request_id}#{i}"
            request = Request(
                request_id=child_id,
                prompt_token_ids=list(prepared.prompt_token_ids),
                max_tokens=child_params.max_tokens,
                sampling_params=child_params,
                eos_token_id=self._eos_token_id,
                min_tokens=child_params.min_tokens,
                stop_token_ids=frozenset(child_params.stop_token_ids) | self._extra_eos_ids_for(child_params),
                ignore_eos=child_params.ignore_eos,
                priority=prepared.priority,
                cache_salt=prepared.cache_salt,
                arrival_time=prepared.arrival_time,
            )
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prepared.prompt_token_ids,
                skip_special_tokens=child_params.skip_special_tokens,
                stop=child_params.stop,
                include_stop_str_in_output=child_params.include_stop_str_in_output,
            )
            choices.append(_Choice(i, request, detok))
        limit = self.args.max_waiting_requests
        num_deferred = sum(len(d) for d in self._deferred_choices.values())
        if limit is not None and self.scheduler.num_waiting + num_deferred + len(choices) > limit:
            raise QueueFullError(f"the waiting queue is full ({limit} requests)")
        # With prefix caching, choices 1..n-1 wait until choice 0 has computed the prompt, then
        # start from its cached blocks: the prompt's KV is computed once and shared.
        share_prompt = len(choices) > 1 and self.args.enable_prefix_caching
        for c in choices[:1] if share_prompt else choices:
            self.scheduler.add_request(c.request)
        state = _RequestState(prepared, choices, RequestMetrics(arrival_time=prepared.arrival_time))
        if share_prompt:
            self._deferred_choices[choices[0].request.request_id] = [c.request for c in choices[1:]]
        self._requests[prepared.request_id] = state
        for c in choices:
            self._choice_of[c.request.request_id] = (state, c)
        if not _async_safe(params):
            self._num_sync_only += 1

    def _extra_eos_ids_for(self, params: SamplingParams) -> frozenset[int]:
        # Extra end-of-sequence ids (e.g. Llama 3's <|eot_id|>) behave like EOS, not like stop ids.
        return frozenset() if params.ignore_eos else self._extra_eos_ids

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests by id (unknown ids are ignored); their final outputs come from the
        next ``step``."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            state = self._requests.get(rid)
            if state is None:
                continue
            unfinished = [c for c in state.choices if c.finish_reason is None]
            self._deferred_choices.pop(state.choices[0].request.request_id, None)
            self.scheduler.finish_requests([c.request.request_id for c in unfinished], RequestStatus.FINISHED_ABORTED)
            for c in unfinished:
                c.finish_reason = "abort"
            self._pending_aborted.append(self._make_output(state, [
                CompletionOutput(c.index, "", [], finish_reason="abort", num_draft_tokens=c.request.num_draft_tokens,
                                 num_accepted_draft_tokens=c.request.num_accepted_draft_tokens)
                for c in unfinished
            ]))
            self._retire(state)

    # ------------------------------------------------------------------ the step
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending_aborted) or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return what is new for each request that made progress.

        With ``async_scheduling`` a step launches the next scheduler step on the device and then
        returns what the previous one produced, so the host's work on step N overlaps the
        device's on step N+1::

            sync:   schedule N | run N (device) | update N | schedule N+1 | run N+1 | ...
            async:  schedule N+1 | launch N+1 | wait N | update N | schedule N+2 | launch N+2 | wait N+1 ...
        """
        outputs, self._pending_aborted = self._pending_aborted, []
        if self.args.async_scheduling and self.proposer is None and not self._num_sync_only:
            scheduler_output = self.scheduler.schedule()
            pending = None if scheduler_output.is_empty else self.runner.execute_async(scheduler_output)
            if self._in_flight is not None:
                outputs.extend(self._apply(self._in_flight[0], self._in_flight[1].result()))
            self._in_flight = None if pending is None else (scheduler_output, pending)
            return outputs
        if self._in_flight is not None:  # a request that needs synchronous steps arrived
            outputs.extend(self._apply(self._in_flight[0], self._in_flight[1].result()))
            self._in_flight = None
        scheduler_output = self.scheduler.schedule()
        if self.proposer is not None:
            self.proposer.finish_requests(scheduler_output.finished_request_ids)
            self.speculation.finish_requests(scheduler_output.finished_request_ids)
        if scheduler_output.is_empty:
            return outputs
        runner_output = self.runner.execute(scheduler_output, self._draft_probs)
        if self.proposer is not None:
            self._record_verify_steps(scheduler_output, runner_output)
        outputs.extend(self._apply(scheduler_output, runner_output))
        return outputs

    def _apply(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[RequestOutput]:
        """The scheduler's update with a step's tokens, then its outputs (and the next drafts)."""
        updates = self.scheduler.update(scheduler_output, runner_output)
        for update in updates:
            for sibling in self._deferred_choices.pop(update.request_id, ()):
                self.scheduler.add_request(sibling)
        outputs = self._process_updates(updates, runner_output.logprobs)
        if self.proposer is not None:
            self._propose_drafts(updates)
        return outputs

    # ------------------------------------------------------------------ speculative decoding
    def _record_verify_steps(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> None:
        for scheduled in scheduler_output.scheduled:
            if scheduled.draft_token_ids:
                accepted = runner_output.num_accepted_draft_tokens.get(scheduled.request_id, 0)
                self.speculation.record(scheduled.request_id, len(scheduled.draft_token_ids), accepted)

    def _propose_drafts(self, updates: list[RequestUpdate]) -> None:
        """Draft for the running requests that just got tokens (see engine/spec_decode/policy.py
        for who may); their drafts ride along with their next decode."""
        assert self.proposer is not None
        get = self.scheduler.get_request
        # Drafts the scheduler consumed, or that preemption dropped, need their distributions no more.
        self._draft_probs = {rid: q for rid, q in self._draft_probs.items()
                             if (r := get(rid)) is not None and r.spec_token_ids}
        if not self.speculation.allows_batch(self.scheduler.num_running):
            return
        candidates: list[DraftRequest] = []
        for update in updates:
            request = get(update.request_id)
            if (request is None or request.status != RequestStatus.RUNNING
                    or request.num_computed_tokens != request.num_tokens - 1
                    or not request.sampling_params.speculative_decoding
                    or not self.speculation.allows(request.request_id)):
                continue
            k = min(self.args.num_speculative_tokens, self.scheduler.max_num_draft_tokens(request))
            lookahead = self.proposer.num_lookahead_slots(k)
            if k <= 0 or (lookahead and not self.scheduler.allocate_lookahead(request, lookahead)):
                continue  # no room to verify, or no free block for the draft's KV: decode plainly
            candidates.append(DraftRequest(
                request.request_id, request.prompt_token_ids, request.output_token_ids, k, request.sampling_params,
                self.scheduler.block_manager.get_block_table(request.request_id), request.num_preemptions))
        if not candidates:
            return
        proposal = self.proposer.propose(candidates)
        for i, (candidate, drafts) in enumerate(zip(candidates, proposal.draft_token_ids, strict=True)):
            request = get(candidate.request_id)
            assert request is not None
            request.spec_token_ids = drafts
            if drafts and proposal.draft_probs is not None and not request.sampling_params.is_greedy:
                self._draft_probs[request.request_id] = proposal.draft_probs[i, : len(drafts)]

    def _process_updates(self, updates: list[RequestUpdate], logprobs: dict[str, list]) -> list[RequestOutput]:
        now = time.monotonic()
        by_state: dict[str, tuple[_RequestState, list[CompletionOutput]]] = {}
        num_new = 0
        for update in updates:
            entry = self._choice_of.get(update.request_id)
            if entry is None:
                continue
            state, choice = entry
            num_new += len(update.new_token_ids)
            delta = self._advance_choice(choice, update, logprobs.get(update.request_id))
            if state.metrics.first_token_time is None and update.new_token_ids:
                state.metrics.first_token_time = now
                state.metrics.first_scheduled_time = choice.request.first_scheduled_time
            by_state.setdefault(state.prepared.request_id, (state, []))[1].append(delta)
        if num_new:
            self._recent_tokens.append((now, num_new))
        outputs = []
        for state, deltas in by_state.values():
            if state.finished:
                state.metrics.finished_time = now
                self._retire(state)
            outputs.append(self._make_output(state, deltas))
        return outputs

    def _advance_choice(self, choice: _Choice, update: RequestUpdate, logprobs: list | None) -> CompletionOutput:
        request = choice.request
        num_before = len(choice.detokenizer.output_token_ids)
        if request.sampling_params.detokenize:
            text = choice.detokenizer.update(update.new_token_ids)
        else:
            text = ""
            choice.detokenizer.output_token_ids.extend(update.new_token_ids)
        # A stop string ends the output at the token that completed it.
        new_ids = choice.detokenizer.output_token_ids[num_before:]
        finish_reason, stop_reason = update.finish_reason, update.stop_reason
        if choice.detokenizer.finished_by_stop is not None and finish_reason != "stop":
            finish_reason, stop_reason = "stop", choice.detokenizer.finished_by_stop
            if not request.is_finished:
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
        elif finish_reason is not None and request.sampling_params.detokenize:
            text += choice.detokenizer.flush()
        entries = None
        if request.sampling_params.logprobs is not None and logprobs is not None:
            entries = [self._decorate(e) for e in logprobs[: len(new_ids)]]
            for tid, entry in zip(new_ids, entries):
                choice.cumulative_logprob += entry[tid].logprob
        choice.finish_reason, choice.stop_reason = finish_reason, stop_reason
        return CompletionOutput(
            index=choice.index,
            text=text,
            token_ids=new_ids,
            cumulative_logprob=choice.cumulative_logprob if entries is not None else None,
            logprobs=entries,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            num_draft_tokens=request.num_draft_tokens,
            num_accepted_draft_tokens=request.num_accepted_draft_tokens,
        )

    def _decorate(self, entry: dict[int, Logprob]) -> dict[int, Logprob]:
        for tid, lp in entry.items():
            if lp.decoded_token is None:
                lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
        return entry

    def _make_output(self, state: _RequestState, deltas: list[CompletionOutput]) -> RequestOutput:
        first = state.choices[0].request
        return RequestOutput(
            request_id=state.prepared.request_id,
            prompt=state.prepared.prompt,
            prompt_token_ids=state.prepared.prompt_token_ids,
            outputs=deltas,
            finished=state.finished,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            metrics=state.metrics,
        )

    def _retire(self, state: _RequestState) -> None:
        if self._requests.pop(state.prepared.request_id, None) is not None and not _async_safe(state.prepared.params):
            self._num_sync_only -= 1
        for c in state.choices:
            self._choice_of.pop(c.request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block; safe while requests run (theirs stay in use)."""
        return self.scheduler.reset_prefix_cache()

    # ------------------------------------------------------------------ introspection
    def cache_info(self) -> dict[str, object]:
        return {
            "block_size": self.args.block_size,
            "num_kv_blocks": self.num_kv_blocks,
            "attention_backend": getattr(self.runner, "attention_backend_name", "torch"),
            "enable_prefix_caching": self.args.enable_prefix_caching,
            "speculative_method": self.args.speculative_method,
            "num_speculative_tokens": self.args.num_speculative_tokens if self.args.speculative else 0,
        }

    def get_load(self) -> dict[str, float | int]:
        stats = self.scheduler.stats()
        now = time.monotonic()
        while self._recent_tokens and now - self._recent_tokens[0][0] > _THROUGHPUT_WINDOW_S:
            self._recent_tokens.popleft()
        queries = stats.prefix_cache_queries
        return {
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "kv_blocks_used": stats.num_kv_blocks_used,
            "kv_blocks_total": stats.num_kv_blocks_total,
            "prefix_cache_hit_rate": stats.prefix_cache_hits / queries if queries else 0.0,
            "prefix_cache_queries": queries,
            "prefix_cache_hits": stats.prefix_cache_hits,
            "num_preemptions": stats.num_preemptions,
            "generation_tokens_per_s": sum(n for _, n in self._recent_tokens) / _THROUGHPUT_WINDOW_S,
            "spec_decode_num_draft_tokens": stats.spec_decode.num_draft_tokens,
            "spec_decode_num_accepted_tokens": stats.spec_decode.num_accepted_tokens,
            "spec_decode_acceptance_rate": stats.spec_decode.acceptance_rate,
            "spec_decode_mean_accepted_length": stats.spec_decode.mean_accepted_length,
        }
