"""The sampler: one row of logits per request in, one token (and its logprobs) per row out.

Each row goes through, in this order::

    raw logits ─▶ logprobs: log-softmax of the raw logits (what the user is shown)
               ─▶ logit_bias ─▶ min_tokens (mask EOS and stop ids) ─▶ repetition penalty
               ─▶ frequency / presence penalties ─▶ greedy rows stop here: argmax
               ─▶ temperature ─▶ top-k ─▶ top-p ─▶ min-p ─▶ draw (exponential race)

A seeded row's draw for its i-th output token uses noise from a generator seeded by
``draw_seed(seed, i)`` alone, so its tokens do not depend on the batch, on earlier draws or on
preemption. Every step is a batched tensor op on ``logits.device``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.host_copy import to_device
from engine.outputs import Logprob
from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class SamplingRow:
    """One row of logits to sample from."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated before this one


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per row; None where params.logprobs is None


class Sampler:
    """Samples one token per row. Unseeded rows draw from one engine-wide generator per device
    (seeded with ``seed``; torch's default generator when ``seed`` is None)."""

    def __init__(self, eos_token_ids: Sequence[int] = (), seed: int | None = None) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._host_rng = random.Random(seed)  # seeds of the fused kernel's noise, one per step

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        token_ids = self.sample_tokens(logits, rows)
        if all(row.params.logprobs is None for row in rows):
            return SamplerOutput(token_ids.tolist(), [None] * len(rows))
        return SamplerOutput(token_ids.tolist(), compute_logprobs(logits, token_ids, rows))

    def sample_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow], out: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The sampled token of each row, ``[len(rows)]`` int64 on ``logits.device`` (written into
        ``out`` if given), with no host sync: the caller decides when to read it."""
        token_ids = self._sample_tokens(logits, rows, out)
        if out is None or token_ids is out:
            return token_ids
        return out.copy_(token_ids)

    def _sample_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow], out: torch.Tensor | None
                       ) -> torch.Tensor:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        if all(_is_plain_greedy(row) for row in rows):
            if logits.is_cuda and logits.numel() < 2**31:
                from engine.kernels.sampling import greedy_sample

                return greedy_sample(logits, out=out)
            return logits.argmax(dim=-1)
        if logits.is_cuda and logits.numel() < 2**31 and all(_is_plain_random(row) for row in rows):
            # One pass over the logits instead of the dozen below (engine/kernels/sampling.py).
            from engine.kernels.sampling import gumbel_sample

            inv_temperature = to_device([1.0 / row.params.temperature for row in rows], logits.device,
                                        torch.float32)
            return gumbel_sample(logits, inv_temperature, self._host_rng.getrandbits(31), out=out)
        if any(map(needs_processing, rows)):
            processed = process_logits(logits, rows, self.eos_token_ids)
        else:
            processed = logits.float()
        probs = sampling_probs(processed, [row.params for row in rows])
        # Greedy rows hold a one-hot distribution, so argmax is their token.
        random_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if len(random_rows) == len(rows):
            noise = self._exponential_noise(probs.shape[-1], rows, logits.device)
            return (probs / noise).argmax(dim=-1)
        token_ids = probs.argmax(dim=-1)
        if random_rows:
            index = to_device(random_rows, logits.device)
            noise = self._exponential_noise(probs.shape[-1], [rows[i] for i in random_rows], logits.device)
            token_ids[index] = (probs[index] / noise).argmax(dim=-1)
        return token_ids

    def _exponential_noise(self, vocab_size: int, rows: Sequence[SamplingRow], device: torch.device
                           ) -> torch.Tensor:
        """Exp(1) noise, one row per sampled row: argmax(probs / noise) draws from probs."""
        unseeded = [i for i, row in enumerate(rows) if row.params.seed is None]
        if len(unseeded) == len(rows):
            noise = torch.empty((len(rows), vocab_size), device=device).exponential_(generator=self._generator(device))
            return noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        noise = torch.empty((len(rows), vocab_size), device=device)
        if unseeded:
            fresh = torch.empty((len(unseeded), vocab_size), device=device)
            fresh.exponential_(generator=self._generator(device))
            noise[to_device(unseeded, device)] = fresh
        for i, row in enumerate(rows):
            if row.params.seed is not None:
                generator = torch.Generator(device=device)
                generator.manual_seed(draw_seed(row.params.seed, len(row.output_token_ids)))
                noise[i].exponential_(generator=generator)
        # A zero draw would turn a masked token's 0 / 0 into NaN.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
            self._generators[device].manual_seed(self.seed)
        return self._generators[device]


def draw_seed(seed: int, step: int) -> int:
    """Generator seed for a seeded request's ``step``-th output token: a function of the two
    alone, well mixed so that nearby seeds and steps give unrelated streams."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 1  # 63 bits: any torch accepts it


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _is_plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return (p.is_greedy and p.logprobs is None and not p.logit_bias and p.repetition_penalty == 1.0
            and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
            and len(row.output_token_ids) >= p.min_tokens)


def _is_plain_random(row: SamplingRow) -> bool:
    """Sampled at a temperature from the whole softmax, unseeded, nothing to process."""
    p = row.params
    return (not p.is_greedy and p.seed is None and p.top_k <= 0 and p.top_p >= 1.0 and p.min_p == 0.0
            and not needs_processing(row))


def needs_processing(row: SamplingRow) -> bool:
    p = row.params
    return bool(p.logit_bias or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
                or len(row.output_token_ids) < p.min_tokens)


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow],
                   eos_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """A copy of ``logits`` with, per row and in this order, the logit bias added, EOS and stop
    ids masked while fewer than ``min_tokens`` tokens are out, the repetition penalty (over
    prompt and output tokens) and the frequency and presence penalties (over output tokens)."""
    out = logits.to(torch.float32, copy=True)
    device = out.device
    biased = [row.params.logit_bias or {} for row in rows]
    if any(biased):
        at = _token_index([list(bias) for bias in biased], device)
        values = [value for bias in biased for value in bias.values()]
        out.index_put_(at, to_device(values, device, torch.float32), accumulate=True)

    stop_ids = set(eos_token_ids)
    masked = [sorted(stop_ids.union(row.params.stop_token_ids))
              if len(row.output_token_ids) < row.params.min_tokens else [] for row in rows]
    if any(masked):
        out[_token_index(masked, device)] = float("-inf")

    repetition = [row.params.repetition_penalty for row in rows]
    if any(p != 1.0 for p in repetition):
        seen = torch.zeros_like(out, dtype=torch.bool)
        seen[_token_index([row.prompt_token_ids + row.output_token_ids if p != 1.0 else []
                           for row, p in zip(rows, repetition, strict=True)], device)] = True
        penalty = to_device(repetition, device, torch.float32)[:, None]
        out = torch.where(seen, torch.where(out > 0, out / penalty, out * penalty), out)

    frequency = [row.params.frequency_penalty for row in rows]
    presence = [row.params.presence_penalty for row in rows]
    if any(frequency) or any(presence):
        counts = torch.zeros_like(out)
        at = _token_index([row.output_token_ids if f or p else []
                           for row, f, p in zip(rows, frequency, presence, strict=True)], device)
        counts.index_put_(at, torch.ones(len(at[0]), device=device), accumulate=True)
        frequency_t = to_device(frequency, device, torch.float32)[:, None]
        presence_t = to_device(presence, device, torch.float32)[:, None]
        out -= frequency_t * counts + presence_t * (counts > 0)
    return out


def _token_index(tokens_per_row: Sequence[Sequence[int]], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) index tensors over the given tokens of each row."""
    row_index = [i for i, tokens in enumerate(tokens_per_row) for _ in tokens]
    token_index = [t for tokens in tokens_per_row for t in tokens]
    return (to_device(row_index, device, torch.long),
            to_device(token_index, device, torch.long))


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution each row draws from: softmax(logits / temperature) cut to the top-k
    tokens, then to the top-p nucleus (the smallest most-likely set holding at least top_p of
    the mass), then to tokens with prob >= min_p * max prob, renormalised. A greedy row
    (temperature 0) puts all its mass on its argmax."""
    device = logits.device
    vocab_size = logits.shape[-1]
    temperatures = [p.temperature or 1.0 for p in params]
    if all(t == temperatures[0] for t in temperatures):
        scaled = logits / temperatures[0]
    else:
        scaled = logits / to_device(temperatures, device)[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    # top_p = 1 must keep every token, however the cumulative sum rounds.
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
    if any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        position = torch.arange(vocab_size, device=device)
        cut = position[None, :] >= to_device(top_k, device)[:, None]
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut |= mass_before >= to_device(top_p, device)[:, None]
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(cut, float("-inf")))
    probs = scaled.softmax(dim=-1)
    # Decided on the host from the parameters: no device syncs.
    if any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], device)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if any(p.is_greedy for p in params):
        greedy = to_device([p.is_greedy for p in params], device)
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
                     ) -> list[dict[int, Logprob] | None]:
    """Per row asking for logprobs: the sampled token's entry, then the top-n entries, from the
    log-softmax of the raw ``logits``. Rank is 1 + the number of strictly more likely tokens."""
    result: list[dict[int, Logprob] | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    index = to_device(wanted, logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)
    sampled = token_ids[index][:, None]
    sampled_logprob = logprobs.gather(-1, sampled)
    sampled_rank = (logprobs > sampled_logprob).sum(dim=-1) + 1
    num_top = min(max(rows[i].params.logprobs for i in wanted), logprobs.shape[-1])
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    # Any token more likely than the j-th of the top-n is itself among the first j.
    top_ranks = (top_logprobs[:, None, :] > top_logprobs[:, :, None]).sum(dim=-1) + 1
    per_row = zip(wanted, sampled[:, 0].tolist(), sampled_logprob[:, 0].tolist(), sampled_rank.tolist(),
                  top_ids.tolist(), top_logprobs.tolist(), top_ranks.tolist(), strict=True)
    for i, token, logprob, rank, ids, logprobs_n, ranks_n in per_row:
        n = rows[i].params.logprobs
        entry = {token: Logprob(logprob, rank)}
        for top_token, top_logprob, top_rank in zip(ids[:n], logprobs_n[:n], ranks_n[:n], strict=True):
            entry.setdefault(top_token, Logprob(top_logprob, top_rank))
        result[i] = entry
    return result
