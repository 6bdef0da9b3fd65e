"""N-gram prompt lookup: propose the tokens that followed the last earlier occurrence of the
context's longest suffix n-gram. No model, no distribution; it pays off when the output repeats
its input (editing code, summarising, quoting).

::

    context:   a b c d e f ... x a b c            suffix n-gram "a b c" (n = 3)
    earlier:   a b c . . .                        its last earlier occurrence, at 0..2
    proposal:        d e f                        the tokens that followed it

When the occurrence ends closer to the end than k tokens (a repeating run), the copy goes on
through the tokens it proposes: in ``... p q p q p q`` the suffix ``p q`` last occurred two
tokens earlier, and the proposal is ``p q p q ...``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.spec_decode.policy import NGRAM_PAUSE_RULE
from engine.spec_decode.proposer import DraftRequest, Proposal, Proposer


def ngram_lookup(token_ids: np.ndarray, min_n: int, max_n: int, num_draft_tokens: int) -> list[int]:
    """Up to ``num_draft_tokens`` tokens following the last occurrence, before the end, of the
    longest suffix n-gram of ``token_ids`` with ``min_n <= n <= max_n``; [] when none occurs."""
    if num_draft_tokens <= 0 or len(token_ids) <= min_n:
        return []
    # Ends of the earlier occurrences of the last n tokens, grown one n at a time: the longer
    # suffix's occurrences are among the shorter one's, so each round filters the last.
    ends = np.flatnonzero(token_ids[:-1] == token_ids[-1])
    n = 1
    while n < max_n and len(ends):
        longer = ends[ends >= n]
        longer = longer[token_ids[longer - n] == token_ids[-1 - n]]
        if not len(longer):
            break
        ends, n = longer, n + 1
    if n < min_n or not len(ends):
        return []
    # np.resize repeats the followers cyclically: the copy continues through its own proposal.
    return np.resize(token_ids[int(ends[-1]) + 1 :], num_draft_tokens).tolist()


@dataclass(slots=True)
class _Context:
    """A request's prompt + output as one array, grown in place between steps."""

    prompt_token_ids: Sequence[int]  # the request's own list: another list means another request
    buffer: np.ndarray
    num_tokens: int

    @property
    def token_ids(self) -> np.ndarray:
        return self.buffer[: self.num_tokens]


class NgramProposer(Proposer):
    """Prompt lookup over prompt + output, the suffix n-gram from ``prompt_lookup_max`` tokens
    down to ``prompt_lookup_min``.

    Each request's tokens are kept as an array between calls and only its new output tokens are
    appended; requests missing from a call are forgotten (rebuilt if they come back). A request
    pauses only after 16 verify steps without an accepted draft (``NGRAM_PAUSE_RULE``).
    """

    pause_rule = NGRAM_PAUSE_RULE

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {prompt_lookup_min} and "
                f"{prompt_lookup_max}")
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self._contexts: dict[str, _Context] = {}

    def propose(self, requests: Sequence[DraftRequest]) -> Proposal:
        contexts = {r.request_id: self._context(r) for r in requests}
        self._contexts = contexts
        return Proposal([
            ngram_lookup(contexts[r.request_id].token_ids, self.min_n, self.max_n, r.num_draft_tokens)
            for r in requests
        ])

    def finish_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._contexts.pop(request_id, None)

    def _context(self, request: DraftRequest) -> _Context:
        prompt, output = request.prompt_token_ids, request.output_token_ids
        num_tokens = len(prompt) + len(output)
        context = self._contexts.get(request.request_id)
        if context is None or context.prompt_token_ids is not prompt or context.num_tokens > num_tokens:
            buffer = np.empty(max(2 * num_tokens, 64), dtype=np.int64)
            context = _Context(prompt, buffer, 0)
            buffer[: len(prompt)] = prompt
            context.num_tokens = len(prompt)
        new = output[context.num_tokens - len(prompt) :]
        if num_tokens > len(context.buffer):
            context.buffer = np.resize(context.buffer, 2 * num_tokens)
        context.buffer[context.num_tokens : num_tokens] = new
        context.num_tokens = num_tokens
        return context
