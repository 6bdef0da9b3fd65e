"""When to speculate: not above a batch size, and not for a request whose drafts keep failing.

- Batch size: a verify step computes 1 + k tokens per request. While few requests run, decoding
  is bound by reading the weights and the extra tokens are nearly free; with many, the step is
  bound by compute and rejected drafts cost real time. Above ``disable_batch_size`` running
  requests nobody drafts (the default comes from bench/bench_spec_decode.py's batch sweep).
- Per request: when its acceptance rate over its last ``WINDOW`` verify steps is below
  ``MIN_ACCEPTANCE`` (its text is not what the proposer can guess: with k = 4 it keeps less than
  one draft in 2.5 steps, so each verify step costs more than it saves), it sits out its next
  ``FIRST_PAUSE`` decode steps, then drafts again; each further failed window doubles the pause.
  Text changes character (a data table, then code again), so a request is never written off for
  good, and a hopeless one spends at most ``WINDOW`` verify steps per pause.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

WINDOW = 8
MIN_ACCEPTANCE = 0.1
FIRST_PAUSE = 32  # decode steps without drafts after the first failed window


@dataclass(slots=True)
class _History:
    # (drafts verified, drafts accepted) of the request's last WINDOW verify steps.
    steps: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    pause: int = 0  # decode steps left to sit out
    next_pause: int = FIRST_PAUSE


class SpeculationPolicy:
    def __init__(self, disable_batch_size: int | None) -> None:
        self.disable_batch_size = disable_batch_size
        self._histories: dict[str, _History] = {}

    def allows_batch(self, num_running: int) -> bool:
        return self.disable_batch_size is None or num_running <= self.disable_batch_size

    def allows(self, request_id: str) -> bool:
        """Whether the request may draft for its next step (asked once per decode step)."""
        history = self._histories.get(request_id)
        if history is None or not history.pause:
            return True
        history.pause -= 1
        return False

    def record(self, request_id: str, num_draft_tokens: int, num_accepted: int) -> None:
        """One verify step of the request."""
        history = self._histories.setdefault(request_id, _History())
        history.steps.append((num_draft_tokens, num_accepted))
        if len(history.steps) == WINDOW:
            drafted = sum(d for d, _ in history.steps)
            accepted = sum(a for _, a in history.steps)
            if accepted < MIN_ACCEPTANCE * drafted:
                history.pause, history.next_pause = history.next_pause, 2 * history.next_pause
                history.steps.clear()  # the next window starts after the pause

    def finish_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._histories.pop(request_id, None)
