"""When to speculate: not above a batch size, and not for a request whose drafts keep failing.

- Batch size: a verify step computes 1 + k tokens per request. While few requests run, decoding
  is bound by reading the weights and the extra tokens are nearly free; with many, the step is
  bound by compute and rejected drafts cost real time. Above ``disable_batch_size`` running
  requests nobody drafts (the default comes from bench/bench_spec_decode.py's batch sweep).
- Per request (a ``PauseRule``): when its drafts over its last ``window`` verify steps are
  accepted less often than ``min_acceptance``, it sits out its next ``first_pause`` decode steps,
  then drafts again; each further failed window doubles the pause. Text changes character (a
  data table, then code again), so a request is never written off for good, and a hopeless one
  spends at most ``window`` verify steps per pause.

What a failed window costs depends on the proposer, so each has its rule. A draft model's drafts
cost forward passes: below 10% over 8 steps (with k = 4, less than one draft kept in 2.5 steps)
each verify step costs more than it saves. N-gram drafts cost nothing to make, only the verify
step's extra positions (a 5-token verify ran 1.16x a decode step on CPU), and failures come in
spells: the output leaves the text it copies, then finds it again. Pausing then loses the copy
that follows: replayed on the bundled model's recorded outputs, a 10% / 8-step rule cut n-gram's
speedup on input-grounded prompts from 1.81x to 1.62x, and any rule that fired on windows with
an accepted draft lost too (bench/results/spec_decode_cpu_ngram_policy_replay.json; measured end to
end, 1.69-1.85x with this rule: spec_decode_cpu_ngram_policy*.json). So n-gram pauses a request only
after 16 verify steps without one accepted draft.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

WINDOW = 8
MIN_ACCEPTANCE = 0.1
FIRST_PAUSE = 32  # decode steps without drafts after the first failed window


@dataclass(frozen=True, slots=True)
class PauseRule:
    """Pause a request's drafting when fewer than ``min_acceptance`` of its drafts over its last
    ``window`` verify steps were accepted: for ``first_pause`` decode steps, doubling each time."""

    window: int = WINDOW
    min_acceptance: float = MIN_ACCEPTANCE
    first_pause: int = FIRST_PAUSE


# N-gram lookup: 16 verify steps without an accepted draft (1 of at most 64 drafts is > 1%).
NGRAM_PAUSE_RULE = PauseRule(window=16, min_acceptance=0.01)


@dataclass(slots=True)
class _History:
    # (drafts verified, drafts accepted) of the request's last ``window`` verify steps.
    steps: deque[tuple[int, int]]
    next_pause: int
    pause: int = 0  # decode steps left to sit out


class SpeculationPolicy:
    def __init__(self, disable_batch_size: int | None, rule: PauseRule | None = None) -> None:
        """``rule``: the proposer's (``Proposer.pause_rule``); None: the module's WINDOW,
        MIN_ACCEPTANCE and FIRST_PAUSE as they are now."""
        self.disable_batch_size = disable_batch_size
        self.rule = rule or PauseRule(WINDOW, MIN_ACCEPTANCE, FIRST_PAUSE)
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
        rule = self.rule
        history = self._histories.get(request_id)
        if history is None:
            history = self._histories[request_id] = _History(deque(maxlen=rule.window), rule.first_pause)
        history.steps.append((num_draft_tokens, num_accepted))
        if len(history.steps) == rule.window:
            drafted = sum(d for d, _ in history.steps)
            accepted = sum(a for _, a in history.steps)
            if accepted < rule.min_acceptance * drafted:
                history.pause, history.next_pause = history.next_pause, 2 * history.next_pause
                history.steps.clear()  # the next window starts after the pause

    def finish_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._histories.pop(request_id, None)
