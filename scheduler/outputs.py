"""The two plain dataclasses that cross the scheduler / engine boundary, and nothing else.

Per step the scheduler hands the runner a ``SchedulerOutput``; the runner hands back a
``RunnerOutput``. Block tables and token lists are passed by reference (no copies per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ScheduledRequest:
    """Compute ``num_new_tokens`` tokens of one request this step.

    ::

        positions:  0 ........ start_position ........ start_position + num_new_tokens
                    | KV cached |  computed this step (token_ids)  |
        token_ids = the request's tokens at those positions (prompt, then output tokens)

    ``sample`` is True when the chunk reaches the request's last token, so the step produces
    a new token for it; False for a non-final chunk of a chunked prefill.

    A verify step ends ``token_ids`` with the k ``draft_token_ids`` (``[last sampled token] +
    drafts`` for a decode); the runner then samples at the last k + 1 positions and returns the
    accepted drafts and one bonus or correction token.
    """

    request_id: str
    token_ids: list[int]
    start_position: int
    block_table: list[int]
    sample: bool
    sampling_params: Any
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    total_num_scheduled_tokens: int
    # Requests preempted this step (their KV is gone; they come back later as full prefills).
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the last step: the runner drops their state.
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RunnerOutput:
    """What the runner computed: for every scheduled request with ``sample=True``, the tokens
    it produced this step (one, or up to k+1 when verifying k draft tokens), and, when asked
    for, their logprobs (opaque to the scheduler, aligned with ``sampled_token_ids``)."""

    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, list[Any]] = field(default_factory=dict)
    num_accepted_draft_tokens: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class RequestUpdate:
    """The scheduler's per-request result of ``update``: the tokens actually appended this step
    (truncated at a stop) and, if the request finished, why."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
