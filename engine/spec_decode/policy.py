"""When to speculate: not above a batch size, and not for a request whose drafts keep failing.

- Batch size: a verify step computes 1 + k tokens per request. While few requests run, decoding
  is bound by reading the weights and the extra tokens are nearly free; with many, the step is
  bound by compute and rejected drafts cost real time. Above ``disable_batch_size`` running
  requests nobody drafts (the default comes from bench/bench_spec_decode.py's batch sweep).
- Per request: when its acceptance rate over its last ``WINDOW`` verify steps is below
  ``MIN_ACCEPTANCE``, it drafts no more for the rest of its life (its text is not what the
  proposer can guess: with k = 4 it keeps less than one draft in 2.5 steps, so each verify step
  costs more than it saves).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

WINDOW = 8
MIN_ACCEPTANCE = 0.1


@dataclass(slots=True)
class _History:
    # (drafts verified, drafts accepted) of the request's last WINDOW verify steps.
    steps: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    switched_off: bool = False


class SpeculationPolicy:
    def __init__(self, disable_batch_size: int | None) -> None:
        self.disable_batch_size = disable_batch_size
        self._histories: dict[str, _History] = {}

    def allows_batch(self, num_running: int) -> bool:
        return self.disable_batch_size is None or num_running <= self.disable_batch_size

    def allows(self, request_id: str) -> bool:
        history = self._histories.get(request_id)
        return history is None or not history.switched_off

    def record(self, request_id: str, num_draft_tokens: int, num_accepted: int) -> None:
        """One verify step of the request."""
        history = self._histories.setdefault(request_id, _History())
        history.steps.append((num_draft_tokens, num_accepted))
        if len(history.steps) == WINDOW:
            drafted = sum(d for d, _ in history.steps)
            accepted = sum(a for _, a in history.steps)
            history.switched_off |= accepted < MIN_ACCEPTANCE * drafted

    def finish_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._histories.pop(request_id, None)
