"""The token-budget scheduler: which requests compute how many tokens this step.

One budget per step, no prefill or decode phases. Each request's ``num_computed_tokens`` catches
up with its ``num_tokens``::

    request:  | computed (KV cached) | new this step | left for later steps |
              0            num_computed_tokens                     num_tokens

Running requests go first (a decode needs 1 token, a chunked prefill the rest of its prompt),
then waiting ones in queue order while the budget, ``max_num_seqs`` and free blocks allow. When
a running request cannot get blocks, the lowest-priority, newest running request is preempted:
its blocks are freed and it later recomputes prompt + output as one prefill.

A decoding request that carries draft tokens is scheduled as a verify step of 1 + k tokens
(see ``scheduler.spec_decode``). Drafts only spend budget that every running request's own next
token leaves over, and only blocks that are free: they are cut rather than delay or preempt
anyone. ``update`` keeps the accepted drafts and the bonus or correction token. A draft model
writes its own KV for the positions it drafts into slots ``allocate_lookahead`` hands out first.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from scheduler.block_manager import BlockManager
from scheduler.config import SchedulerConfig
from scheduler.outputs import RequestUpdate, RunnerOutput, ScheduledRequest, SchedulerOutput
from scheduler.prefix_cache import PrefixCacheStats
from scheduler.request import Request, RequestStatus
from scheduler.spec_decode import SpecDecodeStats, num_accepted_drafts


class QueueFullError(Exception):
    """The waiting queue is at ``max_waiting_requests``; the request was not added."""


@dataclass(slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    spec_decode: SpecDecodeStats = field(default_factory=SpecDecodeStats)


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """The request's tokens at positions [start, end) (prompt, then output, then a placeholder
    for each token still in flight)."""
    prompt, output = request.prompt_token_ids, request.output_token_ids
    num_known = len(prompt) + len(output)
    if end > num_known:
        return _token_slice(request, start, num_known) + [PLACEHOLDER_TOKEN_ID] * (end - max(start, num_known))
    n = len(prompt)
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return output[start - n : end - n]
    return prompt[start:] + output[: end - n]


# The input id of a position whose token a step still in flight samples.
PLACEHOLDER_TOKEN_ID = -1


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager.from_config(config)
        # Both queues stay sorted by queue key: priority (lower first), then arrival.
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.prefix_cache_stats = PrefixCacheStats()
        self.num_preemptions = 0
        self.spec_decode_stats = SpecDecodeStats()
        self._requests: dict[str, Request] = {}
        self._keys: dict[str, tuple[int, float, int]] = {}
        self._arrival_order = itertools.count()
        self._finished_ids: list[str] = []

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queue a request; raises (adding nothing) if it is invalid or the queue is full."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not request.prompt_token_ids:
            raise ValueError("the prompt must have at least one token")
        if request.num_tokens > self.config.max_model_len:
            raise ValueError(
                f"the request has {request.num_tokens} tokens, more than max_model_len="
                f"{self.config.max_model_len}")
        limit = self.config.max_waiting_requests
        if limit is not None and len(self.waiting) >= limit:
            raise QueueFullError(f"the waiting queue is full ({limit} requests)")
        request.status = RequestStatus.WAITING
        self._keys[request.request_id] = (request.priority, request.arrival_time, next(self._arrival_order))
        self._requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=self._queue_key)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        num_after = len(self.running)
        for request in list(self.running):
            num_after -= 1
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted above to make room
            num_tokens = request.num_tokens + request.num_output_placeholders
            if request.num_output_placeholders and (
                    request.num_output_tokens + request.num_output_placeholders >= request.max_tokens
                    or num_tokens >= self.config.max_model_len):
                continue  # the token in flight is its last
            num_new = min(num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            num_drafts = self._num_drafts_that_fit(request, num_new, budget - num_new - num_after)
            if num_drafts and not self.block_manager.allocate_slots(request, num_new + num_drafts):
                # Short of blocks: drafts get only the slots the request already holds.
                num_drafts = min(num_drafts, self._num_spare_slots(request, num_new))
            while not self.block_manager.allocate_slots(request, num_new + num_drafts):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break  # it was the last running request left to preempt
            scheduled.append(self._schedule(request, num_new, num_drafts))
            budget -= num_new + num_drafts

        # Blocks are short: admitting now would only preempt again next step.
        while not preempted and self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_hit = self.block_manager.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            if not self.block_manager.allocate_slots(request, num_new, computed_blocks):
                break  # first come first served: nobody overtakes the head of the queue
            self.waiting.pop(0)
            self._admit(request, num_hit)
            scheduled.append(self._schedule(request, num_new, 0))
            budget -= num_new

        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            scheduled=scheduled,
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            preempted_request_ids=preempted,
            finished_request_ids=finished,
        )

    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[RequestUpdate]:
        """Append the sampled tokens, finish requests that stopped, cache newly full blocks.

        A verify step appends its accepted drafts and the bonus or correction token; its
        ``num_computed_tokens`` falls back to the tokens whose KV was computed from the right
        token (the request's tokens before the step and the accepted drafts)."""
        updates: list[RequestUpdate] = []
        for scheduled in scheduler_output.scheduled:
            request = self._requests.get(scheduled.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished (aborted) since it was scheduled
            if scheduled.sample:
                request.num_output_placeholders = max(0, request.num_output_placeholders - 1)
            new_token_ids = runner_output.sampled_token_ids.get(scheduled.request_id, [])
            assert scheduled.sample or not new_token_ids, f"{request.request_id}: sampled mid-prompt"
            drafts = scheduled.draft_token_ids
            num_verified = request.num_tokens
            if drafts:
                assert request.num_computed_tokens == num_verified + len(drafts), "drafts were not in flight"
                num_accepted = num_accepted_drafts(drafts, new_token_ids)
                reported = runner_output.num_accepted_draft_tokens.get(request.request_id, num_accepted)
                assert reported == num_accepted, (
                    f"{request.request_id}: the runner accepted {reported} drafts but returned {new_token_ids} "
                    f"for drafts {drafts}")
                num_verified += num_accepted
                request.num_draft_tokens += len(drafts)
                request.num_accepted_draft_tokens += num_accepted
                self.spec_decode_stats.record(len(drafts), num_accepted)
            request.spec_token_ids = []  # consumed; the engine proposes anew from the new tokens
            appended: list[int] = []
            status = None
            for token_id in new_token_ids:
                request.output_token_ids.append(token_id)
                appended.append(token_id)
                status = self._check_stop(request, token_id)
                if status is not None:
                    break  # tokens after a stop are dropped
            if drafts:
                # Rejected drafts' KV is simply overwritten by the next step.
                request.num_computed_tokens = min(num_verified, request.num_tokens)
            self.block_manager.cache_full_blocks(request)
            if status is not None:
                self._retire(request, status)
            if appended or status is not None:
                updates.append(RequestUpdate(
                    request_id=request.request_id,
                    new_token_ids=appended,
                    finish_reason=status.finish_reason if status is not None else None,
                    stop_reason=request.stop_reason,
                ))
        return updates

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests in any state (abort, stop string); unknown ids are ignored."""
        assert status.is_finished, f"{status!r} is not a finished status"
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                self._retire(request, status)

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_kv_blocks_used=bm.num_total_blocks - bm.num_free_blocks,
            num_kv_blocks_total=bm.num_total_blocks,
            prefix_cache_queries=self.prefix_cache_stats.queries,
            prefix_cache_hits=self.prefix_cache_stats.hits,
            num_preemptions=self.num_preemptions,
            spec_decode=replace(self.spec_decode_stats),
        )

    def max_num_draft_tokens(self, request: Request) -> int:
        """The most drafts worth verifying for ``request`` now: a verify step appends up to
        k + 1 tokens, and more than ``max_tokens`` or ``max_model_len`` allow would be cut."""
        room = min(request.max_tokens - request.num_output_tokens,
                   self.config.max_model_len - request.num_tokens)
        return max(0, room - 1)

    def allocate_lookahead(self, request: Request, num_tokens: int) -> bool:
        """Give a running request KV slots for its next ``num_tokens`` positions (from
        ``num_computed_tokens``) before it is scheduled: a draft model writes its own KV there
        while it drafts. Only free blocks are taken (nobody is preempted for a guess); False,
        and nothing taken, when they do not suffice. The verify step reuses these slots.

        ::

            | computed ............ | t  d0 d1 d2 | d3     t: last sampled token (no KV yet)
                                    |<- num_tokens ->|        the draft of k = 4 writes the KV of
                                                              t, d0, d1, d2 there (d3: none)
        """
        assert request.status == RequestStatus.RUNNING, f"{request.request_id} is not running"
        return self.block_manager.allocate_slots(request, num_tokens)

    def check_integrity(self) -> None:
        self.block_manager.check_integrity()
        for queue in (self.waiting, self.running):
            keys = [self._queue_key(r) for r in queue]
            assert keys == sorted(keys), "queue out of priority / arrival order"
        assert len(self.running) <= self.config.max_num_seqs
        running_ids = {r.request_id for r in self.running}
        waiting_ids = {r.request_id for r in self.waiting}
        assert not running_ids & waiting_ids, "a request is both waiting and running"
        assert running_ids | waiting_ids == set(self._requests), "a request is lost or finished but kept"
        assert self.block_manager.holders() <= running_ids, "a request not running holds blocks"
        for request in self.running:
            assert request.status == RequestStatus.RUNNING
            assert request.num_computed_tokens <= (
                request.num_tokens + request.num_output_placeholders + len(request.spec_token_ids))
            self.block_manager.check_request(request)
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert request.num_computed_tokens == 0
            assert not request.spec_token_ids or request.status == RequestStatus.WAITING, (
                "a preempted request kept its drafts")

    def _queue_key(self, request: Request) -> tuple[int, float, int]:
        return self._keys[request.request_id]

    def _admit(self, request: Request, num_hit_tokens: int) -> None:
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_hit_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        if self.config.enable_prefix_caching:
            self.prefix_cache_stats.record(request.num_tokens, num_hit_tokens)
        bisect.insort(self.running, request, key=self._queue_key)

    def _num_drafts_that_fit(self, request: Request, num_new_tokens: int, spare_budget: int) -> int:
        """Drafts verified along with a chunk that reaches the request's last token."""
        if not request.spec_token_ids or request.num_computed_tokens + num_new_tokens < request.num_tokens:
            return 0
        return max(0, min(len(request.spec_token_ids), spare_budget, self.max_num_draft_tokens(request)))

    def _num_spare_slots(self, request: Request, num_new_tokens: int) -> int:
        """Slots of the request's table past its next ``num_new_tokens`` (those need no block)."""
        table = self.block_manager.get_block_table(request.request_id)
        return max(0, len(table) * self.config.block_size - request.num_computed_tokens - num_new_tokens)

    def _schedule(self, request: Request, num_new_tokens: int, num_drafts: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new_tokens
        # In flight until update; drafts that did not fit are dropped (the next ones follow the
        # tokens this step appends).
        drafts = request.spec_token_ids[:num_drafts]
        request.spec_token_ids = drafts
        # Optimistic: the runner computes these positions' KV in this very step.
        request.num_computed_tokens = end + num_drafts
        sample = end == request.num_tokens + request.num_output_placeholders
        if sample:
            request.num_output_placeholders += 1  # until update() brings the sampled token
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=_token_slice(request, start, end) + drafts,
            start_position=start,
            block_table=self.block_manager.get_block_table(request.request_id),
            sample=sample,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            draft_token_ids=list(drafts),
        )

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop its KV; it keeps its tokens and its place in the queue."""
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # its token in flight is dropped: it recomputes
        request.spec_token_ids = []  # they followed KV that is gone; the engine proposes anew
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=self._queue_key)

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        if request.num_output_tokens >= request.min_tokens:
            if token_id == request.eos_token_id and not request.ignore_eos:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token_id in request.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _retire(self, request: Request, status: RequestStatus) -> None:
        queue = self.running if request.status == RequestStatus.RUNNING else self.waiting
        queue.remove(request)
        self.block_manager.free(request)
        request.status = status
        del self._requests[request.request_id]
        del self._keys[request.request_id]
        self._finished_ids.append(request.request_id)
