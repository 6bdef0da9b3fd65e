"""The proposer interface: guess the next tokens of running requests, for the target model to
verify in one forward (``engine.spec_decode.rejection_sampler``)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from engine.spec_decode.policy import PauseRule


@dataclass(slots=True)
class DraftRequest:
    """One running request to draft for: its tokens so far and how many drafts are worth
    proposing (the engine's k, cut by ``Scheduler.max_num_draft_tokens``)."""

    request_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    num_draft_tokens: int
    sampling_params: Any = None  # the request's SamplingParams, for a proposer that samples
    # For a proposer with a KV cache of its own (a draft model): the request's live block table,
    # with lookahead slots for the positions it drafts, and how often it was preempted (its KV
    # is gone each time).
    block_table: Sequence[int] = ()
    num_preemptions: int = 0


@dataclass(slots=True)
class Proposal:
    """Per request, up to ``num_draft_tokens`` drafts (possibly none).

    ``draft_probs`` is the distribution each draft was drawn from, ``[n, k_max, V]`` with rows
    padded past a request's drafts; None when the proposer has none (the drafts are then
    verified as if drawn from a one-hot distribution). A draft model must draw its tokens with
    randomness of its own: the rejection sampler's noise is reserved for verification.
    """

    draft_token_ids: list[list[int]]
    draft_probs: torch.Tensor | None = None


class Proposer(abc.ABC):
    """Proposes draft tokens for a batch of running requests, once per step, after the
    scheduler's update. ``propose`` returns one list per request, in order, each at most
    ``num_draft_tokens`` long; an empty list means "no guess": that request decodes one token.
    ``pause_rule``: when a request whose drafts keep failing sits out (engine/spec_decode/policy.py);
    None: the default rule."""

    pause_rule: PauseRule | None = None

    @abc.abstractmethod
    def propose(self, requests: Sequence[DraftRequest]) -> Proposal:
        raise NotImplementedError

    def num_lookahead_slots(self, num_draft_tokens: int) -> int:
        """KV slots past a request's computed tokens that it needs before drafting
        ``num_draft_tokens`` (``Scheduler.allocate_lookahead``); 0 for proposers without a KV cache."""
        return 0

    @abc.abstractmethod
    def finish_requests(self, request_ids: Iterable[str]) -> None:
        """Forget the state kept for requests that finished."""
        raise NotImplementedError
