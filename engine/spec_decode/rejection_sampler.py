"""The rejection sampler: verifies each request's k draft tokens against the target model's
distributions at the k + 1 positions of its verify step, so that the emitted tokens follow
exactly the distribution of sampling without speculation.

::

    position j:        0     1     2    ...   k
    target dist.:      p0    p1    p2         pk      pj: what the sampler would draw the next
    drafts:            d0    d1    d2                     token from, given d0 .. d(j-1)
    emitted:           d0    d1    x                  the accepted drafts, then one token: the
                                                      correction x at the first rejection, or
                                                      the bonus drawn from pk when all pass

- Greedy rows accept dj iff it is the argmax of pj; the correction or bonus is that argmax.
- Sampled rows with a draft distribution q (a draft model) accept dj with probability
  min(1, pj(dj) / qj(dj)), and at a rejection draw from normalise(max(0, pj - qj)).
- Sampled rows without one (n-gram lookup: q is one-hot at dj) draw the token at j from pj
  just as the sampler does and accept dj iff it is that draw. That is the rule above for a
  one-hot q (dj passes with probability pj(dj); a rejection yields pj over the other tokens),
  and a seeded request's tokens are the very ones it gets without speculation.

Randomness is exponential noise, one vector per position, made by the non-speculative sampler
for the row's output index (so a seeded request's draws depend on its seed and the index alone).
The acceptance test's uniform is exp(-noise[dj]): the residual draw never looks at dj's noise,
since dj has no residual mass when rejected.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.host_copy import to_device
from engine.outputs import Logprob
from engine.sampler import Sampler, SamplingRow, compute_logprobs, process_logits, sampling_probs


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor,
                     draft_probs: torch.Tensor | None, greedy: torch.Tensor, noise: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a padded batch of drafts; every step a batched tensor op.

    Shapes: ``target_probs`` and ``noise`` (Exp(1) draws; ignored on greedy rows) [n, K + 1, V];
    ``draft_token_ids`` [n, K], row r's first ``num_draft_tokens[r]`` entries real; ``draft_probs``
    [n, K, V] (anything past a row's drafts) or None (one-hot q); ``greedy`` [n] bool. A greedy
    row needs only the argmax of its ``target_probs``, so its processed logits may stand in for them.

    Returns ``(token_ids [n, K + 1], num_accepted [n])``: row r emits ``token_ids[r, :num_accepted[r] + 1]``
    (its accepted drafts, then the correction or bonus); the rest of the row is -1.
    """
    n, k = draft_token_ids.shape
    device = draft_token_ids.device
    assert target_probs.shape[:2] == (n, k + 1) and noise.shape == target_probs.shape
    greedy = greedy[:, None]
    # The token the sampler would draw at each position: argmax, or the exponential race.
    drawn = torch.where(greedy, target_probs.argmax(dim=-1), (target_probs / noise).argmax(dim=-1))
    drafts = draft_token_ids.clamp_min(0)  # padding may be negative
    if draft_probs is None:
        accepted = drawn[:, :k] == drafts
        replacement = drawn
    else:
        assert draft_probs.shape == (n, k, target_probs.shape[-1])
        p_all, q_all = target_probs[:, :k].float(), draft_probs.float()
        at_draft = drafts[..., None]
        p = p_all.gather(-1, at_draft)[..., 0]
        q = q_all.gather(-1, at_draft)[..., 0]
        uniform = torch.exp(-noise[:, :k].gather(-1, at_draft)[..., 0])
        residual = (p_all - q_all).clamp_min_(0.0)
        resampled = (residual / noise[:, :k]).argmax(dim=-1)
        # Rounding can leave a rejected row no residual mass; p itself is the limit then.
        resampled = torch.where(residual.sum(dim=-1) > 0, resampled, drawn[:, :k])
        accepted = torch.where(greedy, drawn[:, :k] == drafts, uniform * q < p)
        # Past a row's last draft comes its bonus token, drawn from p alone whatever q's padding holds.
        past_drafts = torch.arange(k, device=device)[None, :] >= num_draft_tokens[:, None]
        corrections = torch.where(greedy | past_drafts, drawn[:, :k], resampled)
        replacement = torch.cat([corrections, drawn[:, k:]], dim=1)
    accepted &= torch.arange(k, device=device)[None, :] < num_draft_tokens[:, None]
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
    positions = torch.arange(k + 1, device=device)[None, :]
    token_ids = torch.cat([drafts, drafts.new_zeros((n, 1))], dim=1)
    token_ids = torch.where(positions < num_accepted[:, None], token_ids, -1)
    token_ids.scatter_(1, num_accepted[:, None], replacement.gather(1, num_accepted[:, None]))
    return token_ids, num_accepted


def verification_rows(rows: Sequence[SamplingRow], draft_token_ids: Sequence[Sequence[int]]) -> list[SamplingRow]:
    """One sampling row per verified position: row r's position j sees its output followed by
    its first j drafts, so penalties, ``min_tokens`` and the seeded draw's index are those of
    the token it would sample there without speculation."""
    out: list[SamplingRow] = []
    for row, drafts in zip(rows, draft_token_ids, strict=True):
        out.append(row)
        out.extend(SamplingRow(row.params, row.prompt_token_ids, row.output_token_ids + list(drafts[:j]))
                   for j in range(1, len(drafts) + 1))
    return out


@dataclass(slots=True)
class VerifyOutput:
    token_ids: list[list[int]]  # per row: the accepted drafts, then the correction or bonus token
    num_accepted: list[int]
    logprobs: list[list[dict[int, Logprob]] | None]  # per row, aligned with token_ids; None if not asked


class RejectionSampler:
    """Verifies a batch of requests' drafts from the target logits of their verify positions.

    It draws its noise from ``sampler`` (the engine-wide generator, and per-token generators
    for seeded requests) and masks EOS for ``min_tokens`` with its EOS ids, so a request with no
    drafts gets exactly the token the sampler would give it.
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 draft_token_ids: Sequence[Sequence[int]], draft_probs: torch.Tensor | None = None
                 ) -> VerifyOutput:
        """``logits``: [sum over rows of (k_r + 1), V], row r's k_r + 1 verify positions in
        order, rows one after another (the runner's flattened layout). ``draft_probs``: as
        ``rejection_sample`` takes it (K the most drafts of any row), or None for proposers
        without a distribution."""
        vrows = verification_rows(rows, draft_token_ids)
        assert logits.dim() == 2 and logits.shape[0] == len(vrows), (tuple(logits.shape), len(vrows))
        if all(row.params.is_greedy for row in rows):
            tokens, num_accepted = self._verify_greedy(logits, vrows, draft_token_ids)
        else:
            tokens, num_accepted = self._verify_sampled(logits, vrows, rows, draft_token_ids, draft_probs)
        logprobs: list[list[dict[int, Logprob]] | None] = [None] * len(rows)
        if any(row.params.logprobs is not None for row in rows):
            # Positions past a row's emitted tokens get any token: their entries are dropped.
            flat = [0] * len(vrows)
            starts = list(itertools.accumulate((len(d) + 1 for d in draft_token_ids), initial=0))[:-1]
            for start, row_tokens in zip(starts, tokens, strict=True):
                flat[start:start + len(row_tokens)] = row_tokens
            entries = compute_logprobs(logits, to_device(flat, logits.device, torch.long), vrows)
            for r, (start, row_tokens) in enumerate(zip(starts, tokens, strict=True)):
                if rows[r].params.logprobs is not None:
                    logprobs[r] = entries[start : start + len(row_tokens)]
        return VerifyOutput(tokens, num_accepted, logprobs)

    def _verify_greedy(self, logits: torch.Tensor, vrows: list[SamplingRow],
                       draft_token_ids: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
        """Every row greedy: ``rejection_sample``'s rule for greedy rows (a draft passes iff it is
        the argmax of its position's processed logits; the correction or bonus is that argmax),
        on the host from one argmax over all positions: no padded batch, no noise."""
        drawn = process_logits(logits, vrows, self.sampler.eos_token_ids).argmax(dim=-1).tolist()
        tokens, num_accepted, start = [], [], 0
        for drafts in draft_token_ids:
            n = 0
            while n < len(drafts) and drafts[n] == drawn[start + n]:
                n += 1
            tokens.append([*drafts[:n], drawn[start + n]])
            num_accepted.append(n)
            start += len(drafts) + 1
        return tokens, num_accepted

    def _verify_sampled(self, logits: torch.Tensor, vrows: list[SamplingRow], rows: Sequence[SamplingRow],
                        draft_token_ids: Sequence[Sequence[int]], draft_probs: torch.Tensor | None
                        ) -> tuple[list[list[int]], list[int]]:
        """``rejection_sample`` over the drafts padded to a batch."""
        device = logits.device
        probs, noise = self._target(logits, vrows)
        num_drafts = to_device([len(d) for d in draft_token_ids], device, torch.long)
        k = max((len(d) for d in draft_token_ids), default=0)
        # Row r's flat index of position j; padded positions repeat its last one, nothing reads them.
        positions = torch.arange(k + 1, device=device)[None, :]
        starts = torch.cumsum(num_drafts + 1, 0) - (num_drafts + 1)
        padded = starts[:, None] + torch.minimum(positions, num_drafts[:, None])
        drafts = to_device([list(d) + [-1] * (k - len(d)) for d in draft_token_ids], device,
                           torch.long).reshape(len(rows), k)
        greedy = to_device([row.params.is_greedy for row in rows], device, torch.bool)
        token_ids, num_accepted = rejection_sample(probs[padded], drafts, num_drafts, draft_probs, greedy,
                                                   noise[padded])
        num_accepted_list = num_accepted.tolist()
        tokens = [row[: m + 1] for row, m in zip(token_ids.tolist(), num_accepted_list, strict=True)]
        return tokens, num_accepted_list

    def _target(self, logits: torch.Tensor, vrows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per verified position, the distribution the sampler draws from (its processed logits
        when every row is greedy: argmax is all they need) and the sampler's noise for it."""
        params = [row.params for row in vrows]
        processed = process_logits(logits, vrows, self.sampler.eos_token_ids)
        probs = processed if all(p.is_greedy for p in params) else sampling_probs(processed, params)
        noise = torch.ones_like(probs)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            noise[to_device(random_rows, logits.device)] = self.sampler._exponential_noise(
                logits.shape[-1], [vrows[i] for i in random_rows], logits.device)
        return probs, noise
