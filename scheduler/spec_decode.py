"""Speculative-token bookkeeping: how many of a request's drafts the runner accepted, and the
running counts behind the acceptance rate and mean accepted length.

::

    before the step:  | computed ........ | t | d0 d1 d2 |      t: last sampled token, d: drafts
    scheduled:                            | t  d0 d1 d2 |      1 + k positions, all given KV slots
    runner returns:                         [d0 d1 x]          d0, d1 accepted; x corrects d2
    after update:     | computed ............. | d0 d1 | x     num_computed stops before x; the KV
                                                               written for d2 is overwritten next step
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def num_accepted_drafts(draft_token_ids: Sequence[int], sampled_token_ids: Sequence[int]) -> int:
    """Leading drafts the sampled tokens repeat. The last sampled token is the bonus or the
    correction, never an accepted draft: its KV is not computed yet."""
    n = 0
    for draft, sampled in zip(draft_token_ids, sampled_token_ids[:-1]):
        if draft != sampled:
            break
        n += 1
    return n


@dataclass(slots=True)
class SpecDecodeStats:
    """Draft tokens verified and accepted. A verify step is one request's step with drafts."""

    num_verify_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def record(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.num_verify_steps += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / verified drafts (0 before any verify step)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step appends on average: its accepted drafts plus the bonus or
        correction token (0 before any verify step)."""
        if not self.num_verify_steps:
            return 0.0
        return 1.0 + self.num_accepted_tokens / self.num_verify_steps
