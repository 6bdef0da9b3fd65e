"""The sampler against direct computations: chi-square tests of its draws, the allowed sets of
top-k / top-p / min-p, per-element penalty definitions, and log-softmax logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from engine.sampler import Sampler, SamplingRow, compute_logprobs, process_logits
from engine.sampling_params import SamplingParams

EOS = 1
NUM_DRAWS = 20_000
# A fixed 12-class logits vector with mass spread enough that every class is drawn often.
CLASS_LOGITS = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, 1.6, -1.0, 0.8, -0.2, 1.0, 0.5, -0.7])


def _row(params: SamplingParams, output: list[int] | None = None) -> SamplingRow:
    return SamplingRow(params, [0], list(output or []))


def _repeat(logits: torch.Tensor, num_rows: int) -> torch.Tensor:
    return logits.expand(num_rows, -1).contiguous()


def _counts(tokens: list[int], vocab_size: int) -> np.ndarray:
    return np.bincount(np.asarray(tokens), minlength=vocab_size)


def _assert_matches(tokens: list[int], expected_probs: np.ndarray) -> None:
    """Chi-square goodness of fit over the classes with mass; none outside them."""
    counts = _counts(tokens, len(expected_probs))
    support = expected_probs > 0
    assert counts[~support].sum() == 0, f"drew outside the support: {np.nonzero(counts[~support])}"
    expected = expected_probs[support] / expected_probs[support].sum() * counts.sum()
    assert chisquare(counts[support], expected).pvalue > 1e-3


def _softmax64(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    x = logits.double().numpy() / temperature
    e = np.exp(x - x.max())
    return e / e.sum()


def test_seeded_draws_at_temperature_one_follow_softmax() -> None:
    # 400 seeds x 50 steps: the (seed, step) mixing must give independent draws.
    rows = [_row(SamplingParams(temperature=1.0, seed=s), [5] * i) for s in range(400) for i in range(50)]
    logits = _repeat(CLASS_LOGITS, len(rows))
    _assert_matches(Sampler()(logits, rows).token_ids, _softmax64(CLASS_LOGITS))


def test_unseeded_draws_at_temperature_07_follow_tempered_softmax() -> None:
    rows = [_row(SamplingParams(temperature=0.7, top_k=0))] * NUM_DRAWS
    logits = _repeat(CLASS_LOGITS, NUM_DRAWS)
    _assert_matches(Sampler(seed=3)(logits, rows).token_ids, _softmax64(CLASS_LOGITS, 0.7))


def test_temperature_changes_the_distribution() -> None:
    # The tempered softmax is far from the untempered one; the chi-square above would notice.
    rows = [_row(SamplingParams(temperature=0.7))] * NUM_DRAWS
    counts = _counts(Sampler(seed=3)(_repeat(CLASS_LOGITS, NUM_DRAWS), rows).token_ids, 12)
    assert chisquare(counts, _softmax64(CLASS_LOGITS) * NUM_DRAWS).pvalue < 1e-6


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=4), [3, 5, 0, 9]),
        # Sorted probs .275 .184 .123 .101 .083 ...; cumulative .275 .459 .582 .683 .766 ...
        (SamplingParams(temperature=1.0, top_p=0.5), [3, 5, 0]),
        (SamplingParams(temperature=1.0, top_p=0.4), [3, 5]),
        (SamplingParams(temperature=1.0, top_p=0.65), [3, 5, 0, 9]),
        # Top-p runs on the top-k renormalised mass: cumulative .359 .599 .760 reaches 0.7 at 3
        # tokens (over the full distribution it would take 5).
        (SamplingParams(temperature=1.0, top_k=5, top_p=0.7), [3, 5, 0]),
        # min_p 0.3: keep p >= 0.3 * p_max, i.e. logit >= 2.0 + ln 0.3 = 0.796.
        (SamplingParams(temperature=1.0, min_p=0.3), [3, 5, 0, 9, 7]),
    ],
)
def test_filtered_draws_follow_the_renormalised_distribution(params: SamplingParams,
                                                             allowed: list[int]) -> None:
    expected = np.zeros(12)
    expected[allowed] = _softmax64(CLASS_LOGITS)[allowed]
    rows = [_row(params)] * NUM_DRAWS
    _assert_matches(Sampler(seed=11)(_repeat(CLASS_LOGITS, NUM_DRAWS), rows).token_ids, expected)


def _allowed_set(logits: torch.Tensor, p: SamplingParams) -> tuple[set[int], float]:
    """Tokens top-k, then top-p, then min-p allow, computed directly in float64; also the
    smallest distance of a cumulative sum from top_p (to skip rows on a rounding edge)."""
    probs = _softmax64(logits, p.temperature)
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    if p.top_k > 0:
        order = order[: p.top_k]
    kept = probs[order] / probs[order].sum()
    cumulative = np.cumsum(kept)
    size = int(np.searchsorted(cumulative, p.top_p)) + 1 if p.top_p < 1.0 else len(order)
    margin = float(np.abs(cumulative - p.top_p).min())
    nucleus = order[:size]
    top = probs[nucleus[0]]
    return {t for t in nucleus if probs[t] >= p.min_p * top}, margin


def test_top_k_top_p_min_p_never_emit_outside_the_allowed_set() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab_size, num_rows = 64, 48
    logits = torch.randn(num_rows, vocab_size, generator=gen) * 2.0
    params = []
    for i in range(num_rows):
        params.append(SamplingParams(
            temperature=[0.5, 1.0, 1.5][i % 3],
            top_k=[-1, 1, 5, 20][i % 4],
            top_p=[1.0, 0.3, 0.8, 0.95][(i // 4) % 4],
            min_p=[0.0, 0.05, 0.2][(i // 16) % 3],
        ))
    allowed = []
    for i, p in enumerate(params):
        tokens, margin = _allowed_set(logits[i], p)
        allowed.append(tokens if margin > 1e-5 or p.top_p == 1.0 else None)
    assert sum(a is None for a in allowed) < 3
    rounds = 200
    tokens = Sampler(seed=5)(logits.repeat(rounds, 1), [_row(p) for p in params] * rounds).token_ids
    drawn = [set(tokens[i::num_rows]) for i in range(num_rows)]
    for i, tokens in enumerate(allowed):
        if tokens is not None:
            assert drawn[i] <= tokens, (params[i], drawn[i] - tokens)
    # Not vacuous: rows really draw several tokens, and some allowed sets cut most of the vocabulary.
    assert any(len(d) > 1 for d in drawn)
    assert any(a is not None and len(a) < vocab_size // 2 for a in allowed)


def test_greedy_is_argmax_alone_and_beside_sampled_rows() -> None:
    logits = torch.randn(9, 100, generator=torch.Generator().manual_seed(1))
    greedy = _row(SamplingParams(temperature=0.0))
    assert Sampler()(logits, [greedy] * 9).token_ids == logits.argmax(-1).tolist()
    mixed = [greedy if i % 2 else _row(SamplingParams(temperature=1.5, top_p=0.9)) for i in range(9)]
    tokens = Sampler(seed=0)(logits, mixed).token_ids
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()
    # Into a given buffer (the runner's sampled ids, which the next step's placeholders read).
    buffer = torch.full((11,), -1, dtype=torch.int64)
    out = Sampler(seed=0).sample_tokens(logits, mixed, out=buffer[:9])
    assert out.data_ptr() == buffer.data_ptr() and buffer[:9].tolist() == tokens and buffer[9:].tolist() == [-1, -1]


def _reference_process(logits: list[float], row: SamplingRow, eos_ids: list[int]) -> list[float]:
    """The definitions, element by element, in float64."""
    p = row.params
    out = list(logits)
    for tid, bias in (p.logit_bias or {}).items():
        out[tid] += bias
    if len(row.output_token_ids) < p.min_tokens:
        for tid in [*eos_ids, *p.stop_token_ids]:
            out[tid] = float("-inf")
    seen = set(row.prompt_token_ids) | set(row.output_token_ids)
    for tid in seen:
        out[tid] = out[tid] / p.repetition_penalty if out[tid] > 0 else out[tid] * p.repetition_penalty
    for tid in set(row.output_token_ids):
        count = row.output_token_ids.count(tid)
        out[tid] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_process_logits_matches_per_element_definitions() -> None:
    gen = torch.Generator().manual_seed(2)
    vocab_size = 40
    rows = []
    for i in range(10):
        params = SamplingParams(
            repetition_penalty=[1.0, 1.3, 0.7][i % 3],
            frequency_penalty=[0.0, 0.5, -0.4, 1.5][i % 4],
            presence_penalty=[0.0, 1.0, -0.8][(i + 1) % 3],
            logit_bias={3: 2.5, 17: -4.0, i: 1.0} if i % 2 else None,
            min_tokens=[0, 4, 12][i % 3],
            stop_token_ids=[9, 30] if i % 4 == 1 else [],
        )
        prompt = torch.randint(0, vocab_size, (6 + i,), generator=gen).tolist()
        output = torch.randint(0, vocab_size // 2, (i,), generator=gen).tolist()
        rows.append(SamplingRow(params, prompt, output))
    logits = torch.randn(len(rows), vocab_size, generator=gen) * 3.0
    got = process_logits(logits, rows, eos_token_ids=[EOS, 2])
    want = torch.tensor([_reference_process(logits[i].double().tolist(), row, [EOS, 2])
                         for i, row in enumerate(rows)], dtype=torch.float64)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-5)  # equal infinities count as close
    assert not torch.equal(got, logits)
    assert torch.equal(logits, logits.clone())  # the caller's logits are left alone


def test_penalties_move_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 0.0, 3.0, 2.9, 1.0]])
    # Token 2 leads; having been output once, frequency 0.2 pushes it below token 3.
    row = SamplingRow(SamplingParams(temperature=0.0, frequency_penalty=0.2), [4], [2])
    assert Sampler()(logits, [row]).token_ids == [3]
    # Repetition penalty over the prompt [2, 3]: at 1.5 token 2 keeps the lead (2.0 > 1.93 > 1.0);
    # at 4.0 both fall below untouched token 4 (0.75, 0.725 < 1.0).
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=1.5), [2, 3], [])
    assert Sampler()(logits, [row]).token_ids == [2]
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=4.0), [2, 3], [])
    assert Sampler()(logits, [row]).token_ids == [4]


def test_logit_bias_shifts_exactly_and_moves_the_choice() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(4))
    low = int(logits[0].argmin())
    rows = [_row(SamplingParams(temperature=0.0, logit_bias={low: 100.0, 5: -3.0}))] * 3
    shifted = process_logits(logits, rows)
    delta = shifted - logits
    assert torch.all(delta[:, low] == 100.0) and torch.allclose(delta[:, 5], torch.full((3,), -3.0))
    delta[:, [low, 5]] = 0.0
    assert torch.all(delta == 0.0)
    assert Sampler()(logits, rows).token_ids == [low] * 3


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, 10)
    logits[0, EOS], logits[0, 7], logits[0, 4] = 9.0, 8.0, 7.0
    sampler = Sampler(eos_token_ids=[EOS])
    greedy = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7])
    tokens = [sampler(logits, [SamplingRow(greedy, [0], [4] * i)]).token_ids[0] for i in range(5)]
    assert tokens == [4, 4, 4, EOS, EOS]
    # Sampled rows never draw a masked id either, while the rest keeps its relative mass.
    sampled = SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[7])
    drawn = sampler(logits.expand(2000, -1), [SamplingRow(sampled, [0], [4])] * 2000).token_ids
    assert EOS not in drawn and 7 not in drawn and 4 in drawn
    # ignore_eos alone masks nothing: EOS is still the greedy choice.
    assert sampler(logits, [_row(SamplingParams(temperature=0.0, ignore_eos=True))]).token_ids == [EOS]


def test_logprobs_are_the_raw_log_softmax_with_ranks_and_top_n() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 50, generator=gen) * 2.0
    params = [
        SamplingParams(temperature=0.8, logprobs=5, repetition_penalty=1.4, logit_bias={0: 5.0}),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.2, top_k=10, logprobs=3, frequency_penalty=1.0),
        SamplingParams(temperature=0.0, logprobs=20, presence_penalty=2.0),
        SamplingParams(temperature=1.0, seed=3, logprobs=1),
    ]
    rows = [SamplingRow(p, [0, 1, 2], [3, 3, 4]) for p in params]
    out = Sampler(seed=1)(logits, rows)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[2] is None
    assert list(out.logprobs[1]) == [out.token_ids[1]]
    for i, p in enumerate(params):
        entry = out.logprobs[i]
        if p.logprobs is None:
            continue
        assert entry is not None and out.token_ids[i] in entry
        assert list(entry)[0] == out.token_ids[i]
        expected_top = reference[i].argsort(descending=True)[: p.logprobs].tolist()
        assert set(entry) == {out.token_ids[i], *expected_top}
        for token, lp in entry.items():
            assert abs(lp.logprob - reference[i, token].item()) < 1e-6
            assert lp.rank == 1 + int((reference[i] > reference[i, token]).sum())


def test_rank_counts_only_strictly_more_likely_tokens() -> None:
    logits = torch.tensor([[2.0, 5.0, 5.0, 1.0, 5.0]])
    row = _row(SamplingParams(temperature=0.0, logprobs=4))
    entry = compute_logprobs(logits, torch.tensor([3]), [row])[0]
    assert entry is not None
    assert {t: lp.rank for t, lp in entry.items()} == {3: 5, 1: 1, 2: 1, 4: 1, 0: 4}


def test_seeded_row_gives_the_same_tokens_alone_and_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(8)
    vocab_size, steps = 32, 12
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    step_logits = torch.randn(steps, vocab_size, generator=gen)
    others = [SamplingParams(temperature=t, top_k=k) for t, k in [(1.0, -1), (0.5, 4), (0.0, -1), (1.3, 8)]]

    def run(position: int, sampler: Sampler, batch_size: int) -> list[int]:
        tokens: list[int] = []
        for i in range(steps):
            rows = [_row(others[j % len(others)], [2] * (i + j)) for j in range(batch_size)]
            rows[position] = SamplingRow(seeded, [0, 1], list(tokens))
            logits = torch.randn(batch_size, vocab_size, generator=gen)
            logits[position] = step_logits[i]
            tokens.append(sampler(logits, rows).token_ids[position])
        return tokens

    alone = run(0, Sampler(seed=0), 1)
    assert len(set(alone)) > 3  # the draws really are random
    for position, global_seed in [(0, 1), (3, 2), (7, 3)]:
        assert run(position, Sampler(seed=global_seed), 8) == alone
    # A recompute after preemption redraws step i from (seed, i) alone.
    assert Sampler(seed=9)(step_logits[5:6], [SamplingRow(seeded, [0, 1], alone[:5])]).token_ids == [alone[5]]
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=1235)
    assert [Sampler()(step_logits[i : i + 1], [SamplingRow(other_seed, [0, 1], alone[:i])]).token_ids[0]
            for i in range(steps)] != alone


def test_half_precision_logits_sample_as_their_float32_widening() -> None:
    """The model hands the sampler logits in its own dtype: a bf16 batch (greedy, plain random,
    top-k/top-p, penalised, seeded, with logprobs) gives exactly the tokens and logprobs of the
    same logits widened to float32 first."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, 50, generator=gen) * 3).to(torch.bfloat16)
    rows = [
        _row(SamplingParams(temperature=0.0)),
        _row(SamplingParams(temperature=0.8)),
        _row(SamplingParams(temperature=0.9, top_k=5, top_p=0.8)),
        _row(SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5), [3, 4, 3]),
        _row(SamplingParams(temperature=1.0, seed=11), [2]),
        _row(SamplingParams(temperature=0.0, logprobs=3)),
    ]
    half = Sampler(seed=2)(logits, rows)
    wide = Sampler(seed=2)(logits.float(), rows)
    assert half.token_ids == wide.token_ids
    assert half.logprobs == wide.logprobs and half.logprobs[5] is not None
    greedy_only = [rows[0], rows[5]]
    assert Sampler()(logits[[0, 5]], greedy_only).token_ids == logits[[0, 5]].float().argmax(dim=-1).tolist()
