"""The rejection sampler against direct computations.

Greedy rows: the emitted tokens are the argmax prefix, computed position by position. Sampled
rows: chi-square tests that the first emitted token follows the target distribution p, and that
the first three tokens of a Markov chain generated through repeated verify steps follow the
target chain, for draft distributions q and for one-hot q (n-gram drafts); binomial checks of the
acceptance rates min(p, q) and p(d). Seeded rows: the verify step reproduces, token for token,
what the non-speculative sampler draws step by step.

Power: each chi-square test runs at significance 1e-3 with 20 000 draws, and first asserts
(noncentral chi-square) that it would detect with power >= 0.99 an output distribution moved
by 0.03 in total variation from p towards the draft distribution q:
p + 0.03 (q - p) / TV(p, q). Typical bugs (resampling a rejection from p instead of the
residual, accepting with p(d) alone) move it much further.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chi2, chisquare, ncx2

from engine.sampler import Sampler, SamplingRow, compute_logprobs
from engine.sampling_params import SamplingParams
from engine.spec_decode.rejection_sampler import RejectionSampler, rejection_sample, verification_rows

NUM_DRAWS = 20_000
ALPHA = 1e-3
SHIFT = 0.03  # total variation towards the draft distribution the tests must detect


def dirichlet(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Random distributions over the last dim, with every entry large enough to be drawn often."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)))
    x = torch.from_numpy(rng.gamma(3.0, size=shape))
    return x / x.sum(dim=-1, keepdim=True)


def chi_square_power(expected: np.ndarray, alternative: np.ndarray, num_draws: int) -> float:
    """Power of the chi-square test at ALPHA against ``alternative`` (noncentral chi-square)."""
    df = len(expected) - 1
    noncentrality = num_draws * (((alternative - expected) ** 2) / expected).sum()
    return float(ncx2.sf(chi2.ppf(1 - ALPHA, df), df, noncentrality))


def assert_follows(samples: np.ndarray, expected: np.ndarray, draft: np.ndarray) -> None:
    """Chi-square goodness of fit of ``samples`` (class ids) to ``expected``, with the test's power
    against a shift towards ``draft`` checked first, so that it cannot pass for lack of draws."""
    total_variation = 0.5 * np.abs(draft - expected).sum()
    shifted = expected + SHIFT * (draft - expected) / total_variation
    assert chi_square_power(expected, shifted, len(samples)) >= 0.99
    counts = np.bincount(samples, minlength=len(expected))
    assert chisquare(counts, expected * len(samples)).pvalue > ALPHA


def exponential_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float64).exponential_(generator=generator).clamp_min_(1e-300)


def test_greedy_emits_the_argmax_prefix_then_the_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    n, k, vocab = 64, 4, 11
    logits = torch.randn(n, k + 1, vocab, generator=g)
    argmax = logits.argmax(dim=-1)
    num_drafts = torch.randint(0, k + 1, (n,), generator=g)
    num_agree = torch.randint(0, k + 1, (n,), generator=g)
    drafts = torch.full((n, k), -1)
    expected = []
    for r in range(n):
        kr, agree = int(num_drafts[r]), min(int(num_agree[r]), int(num_drafts[r]))
        for j in range(kr):
            drafts[r, j] = argmax[r, j] if j < agree else (argmax[r, j] + 1 + j) % vocab
        expected.append(argmax[r, : agree + 1].tolist())
    greedy = torch.ones(n, dtype=torch.bool)
    noise = torch.ones_like(logits)
    for draft_probs in (None, dirichlet(g, n, k, vocab).float()):
        token_ids, num_accepted = rejection_sample(logits, drafts, num_drafts, draft_probs, greedy, noise)
        assert [row[: m + 1] for row, m in zip(token_ids.tolist(), num_accepted.tolist())] == expected
        assert num_accepted.tolist() == [len(e) - 1 for e in expected]
        assert all(t == -1 for row, m in zip(token_ids.tolist(), num_accepted.tolist()) for t in row[m + 1 :])


def test_all_greedy_batch_verified_on_the_host_equals_the_batched_rule() -> None:
    """An all-greedy batch takes the host path (one argmax, no padding or noise): the tokens of
    the padded ``rejection_sample`` path, penalties and min_tokens included."""
    g = torch.Generator().manual_seed(3)
    vocab = 10
    verifier = RejectionSampler(Sampler(eos_token_ids=[1], seed=0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, min_tokens=3, logit_bias={2: 1.0})]
    for trial in range(30):
        rows = [SamplingRow(params[(trial + i) % 3], [2, 4], [5] * (i % 3)) for i in range(4)]
        lengths = [(trial + i) % 5 for i in range(4)]
        logits = torch.randn(sum(lengths) + len(rows), vocab, generator=g)
        argmax = logits.argmax(dim=-1).tolist()
        drafts, start = [], 0
        for n in lengths:  # mostly the raw argmax (often what the processed logits pick too)
            drafts.append([argmax[start + j] if torch.rand(1, generator=g) < 0.8 else 0 for j in range(n)])
            start += n + 1
        vrows = verification_rows(rows, drafts)
        out = verifier(logits, rows, drafts)
        assert (out.token_ids, out.num_accepted) == verifier._verify_sampled(logits, vrows, rows, drafts, None)


def sequential_oracle(sampler: Sampler, logits: torch.Tensor, row: SamplingRow, drafts: list[int]) -> list[int]:
    """What sampling without speculation emits over the verify positions: one token per step,
    each from the output so far, stopping after the first token that is not the draft."""
    emitted: list[int] = []
    for j in range(len(drafts) + 1):
        step_row = SamplingRow(row.params, row.prompt_token_ids, row.output_token_ids + emitted)
        token = sampler(logits[j : j + 1], [step_row]).token_ids[0]
        emitted.append(token)
        if j == len(drafts) or token != drafts[j]:
            return emitted
    raise AssertionError("unreachable")


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.5,
                   logit_bias={3: 2.5}),
    SamplingParams(temperature=0.0, min_tokens=5, stop_token_ids=[4]),
    SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=7),
    SamplingParams(temperature=1.2, frequency_penalty=1.0, min_tokens=4, seed=12345, logprobs=2),
], ids=["greedy-penalties", "greedy-min-tokens", "seeded-filters", "seeded-penalties-logprobs"])
def test_verify_step_emits_what_sequential_sampling_emits(params: SamplingParams) -> None:
    # Greedy and seeded rows without a draft distribution: token for token, penalties and
    # min_tokens seeing the drafts before each position, the seeded noise of each output index.
    g = torch.Generator().manual_seed(1)
    vocab, eos = 12, 1
    sampler = Sampler(eos_token_ids=[eos], seed=0)
    verifier = RejectionSampler(sampler)
    num_checked = num_accepted_total = 0
    for trial in range(40):
        row = SamplingRow(params, [2, 3, 5], [3, 6, 2][: trial % 4])
        k = trial % 5
        logits = torch.randn(k + 1, vocab, generator=g) * 2
        # Drafts that agree with the sequential draws at random positions.
        drafts: list[int] = []
        for j in range(k):
            agree = int(torch.randint(0, 4, (1,), generator=g)) > 0
            token = sequential_oracle(sampler, logits[j:], SamplingRow(params, row.prompt_token_ids,
                                                                       row.output_token_ids + drafts), [])[0]
            drafts.append(token if agree else (token + 1 + j) % vocab)
        expected = sequential_oracle(sampler, logits, row, drafts)
        out = verifier(logits, [row], [drafts])
        assert out.token_ids == [expected]
        assert out.num_accepted == [len(expected) - 1]
        num_checked += 1
        num_accepted_total += out.num_accepted[0]
        if params.logprobs is not None:
            (entries,) = out.logprobs
            assert len(entries) == len(expected)
            for j, (token, entry) in enumerate(zip(expected, entries)):
                want = torch.log_softmax(logits[j].double(), dim=-1)[token].item()
                assert entry[token].logprob == pytest.approx(want, abs=1e-5)
                assert len(entry) >= params.logprobs
        else:
            assert out.logprobs == [None]
    assert num_accepted_total > 0  # some drafts were accepted, so later positions were checked


def test_rows_without_drafts_get_the_samplers_token() -> None:
    g = torch.Generator().manual_seed(2)
    vocab = 16
    rows = [SamplingRow(SamplingParams(temperature=t, seed=s), [1, 2], [3] * i)
            for i, (t, s) in enumerate([(0.0, None), (1.0, 5), (0.8, 99), (0.0, None), (1.0, 5)])]
    logits = torch.randn(len(rows), vocab, generator=g)
    out = RejectionSampler(Sampler(seed=0))(logits, rows, [[] for _ in rows])
    assert out.token_ids == [[t] for t in Sampler(seed=0)(logits, rows).token_ids]
    assert out.num_accepted == [0] * len(rows)


def first_token_samples(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
    """The first emitted token of NUM_DRAWS independent verify steps of one draft each."""
    n, vocab = drafts.shape[0], p.shape[-1]
    target = p.expand(n, 2, vocab)
    draft_probs = None if q is None else q.expand(n, 1, vocab)
    token_ids, num_accepted = rejection_sample(
        target, drafts[:, None], torch.ones(n, dtype=torch.long), draft_probs, torch.zeros(n, dtype=torch.bool),
        exponential_noise((n, 2, vocab), generator))
    return token_ids[:, 0], num_accepted


def test_first_token_follows_the_target_with_a_draft_distribution() -> None:
    g = torch.Generator().manual_seed(3)
    vocab = 8
    p, q = dirichlet(g, 2, 1, vocab).unbind(0)
    drafts = torch.multinomial(q[0], NUM_DRAWS, replacement=True, generator=g)
    tokens, num_accepted = first_token_samples(p, q, drafts, g)
    assert_follows(tokens.numpy(), p[0].numpy(), q[0].numpy())
    # The acceptance rate of the rule: sum over tokens of min(p, q).
    rate = torch.minimum(p, q).sum().item()
    assert binomtest(int(num_accepted.sum()), NUM_DRAWS, rate).pvalue > ALPHA


def test_first_token_follows_the_target_with_one_hot_drafts() -> None:
    # n-gram drafts come from anywhere (here from r); verified as one-hot q, d passes with p(d).
    g = torch.Generator().manual_seed(4)
    vocab = 8
    p, r = dirichlet(g, 2, 1, vocab).unbind(0)
    drafts = torch.multinomial(r[0], NUM_DRAWS, replacement=True, generator=g)
    tokens, num_accepted = first_token_samples(p, None, drafts, g)
    assert_follows(tokens.numpy(), p[0].numpy(), r[0].numpy())
    rate = (r * p).sum().item()
    assert binomtest(int(num_accepted.sum()), NUM_DRAWS, rate).pvalue > ALPHA
    # Accepted drafts are drawn with probability p(d) each: the rejections are not uniform.
    accepted_tokens = drafts[num_accepted.bool()].numpy()
    expected = (r * p)[0].numpy() / rate
    assert chisquare(np.bincount(accepted_tokens, minlength=vocab), expected * len(accepted_tokens)).pvalue > ALPHA


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["draft-probs", "one-hot"])
def test_first_three_tokens_of_a_chain_follow_the_target_chain(with_draft_probs: bool) -> None:
    """A Markov "model" (next-token table P[prev]) verified in steps of k = 2 drafts from a draft
    chain Q: the joint law of the first three emitted tokens is P's, through accepted prefixes,
    corrections and bonus tokens alike."""
    g = torch.Generator().manual_seed(5 + with_draft_probs)
    vocab, k, start = 4, 2, 0
    target, draft = dirichlet(g, 2, vocab, vocab).unbind(0)
    sequences = [[] for _ in range(NUM_DRAWS)]
    last = torch.full((NUM_DRAWS,), start)
    while min(len(s) for s in sequences) < 3:
        contexts = [last]
        for _ in range(k):
            contexts.append(torch.multinomial(draft[contexts[-1]], 1, generator=g)[:, 0])
        drafts = torch.stack(contexts[1:], dim=1)
        context = torch.stack(contexts, dim=1)  # position j is conditioned on the token before it
        token_ids, num_accepted = rejection_sample(
            target[context], drafts, torch.full((NUM_DRAWS,), k),
            draft[context[:, :k]] if with_draft_probs else None, torch.zeros(NUM_DRAWS, dtype=torch.bool),
            exponential_noise((NUM_DRAWS, k + 1, vocab), g))
        for seq, row, m in zip(sequences, token_ids.tolist(), num_accepted.tolist()):
            seq.extend(row[: m + 1])
        last = torch.tensor([s[-1] for s in sequences])
    samples = np.array([(s[0] * vocab + s[1]) * vocab + s[2] for s in sequences])
    joint = (target[start][:, None, None] * target[:, :, None] * target[None, :, :]).reshape(-1)
    draft_joint = (draft[start][:, None, None] * draft[:, :, None] * draft[None, :, :]).reshape(-1)
    assert_follows(samples, joint.numpy(), draft_joint.numpy())


def test_seeded_rows_are_reproducible_whatever_the_batch() -> None:
    g = torch.Generator().manual_seed(6)
    vocab, k = 10, 3
    seeded = SamplingRow(SamplingParams(temperature=1.0, seed=2024), [1, 2, 3], [4, 5])
    logits = torch.randn(k + 1, vocab, generator=g)
    drafts = [int(t) for t in logits[:k].argmax(dim=-1)]  # likely drafts: several positions get verified
    draft_probs = dirichlet(g, 1, k, vocab).float()
    for probs in (None, draft_probs):
        alone = RejectionSampler(Sampler(seed=0))(logits, [seeded], [drafts], probs)
        others = [SamplingRow(SamplingParams(temperature=1.0), [7], [8] * i) for i in range(3)]
        batch_logits = torch.cat([torch.randn(2, vocab, generator=g), logits, torch.randn(3 + 1, vocab, generator=g)])
        batch_probs = None if probs is None else torch.cat([dirichlet(g, 1, k, vocab).float(), probs,
                                                             dirichlet(g, 1, k, vocab).float()])
        batch = RejectionSampler(Sampler(seed=1))(
            batch_logits, [others[0], seeded, others[1]], [[3], drafts, [1, 2, 3]], batch_probs)
        assert batch.token_ids[1] == alone.token_ids[0]
        # Another seed draws differently somewhere over a few trials (the seed is used).
        different = [
            RejectionSampler(Sampler(seed=0))(
                logits, [SamplingRow(SamplingParams(temperature=1.0, seed=s), [1, 2, 3], [4, 5])], [drafts], probs
            ).token_ids[0]
            for s in range(8)
        ]
        assert any(d != alone.token_ids[0] for d in different)


def test_verification_rows_append_the_drafts_before_each_position() -> None:
    params = SamplingParams()
    rows = [SamplingRow(params, [1], [2]), SamplingRow(params, [3], [])]
    vrows = verification_rows(rows, [[7, 8], []])
    assert [(r.prompt_token_ids, r.output_token_ids) for r in vrows] == [
        ([1], [2]), ([1], [2, 7]), ([1], [2, 7, 8]), ([3], [])]
    assert vrows[0] is rows[0] and vrows[3] is rows[1]  # no copies at position 0


def test_logprobs_are_those_of_the_raw_logits_at_each_emitted_position() -> None:
    g = torch.Generator().manual_seed(8)
    vocab = 9
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=3), [1], []),
            SamplingRow(SamplingParams(temperature=0.0), [1], []),
            SamplingRow(SamplingParams(temperature=0.0, logprobs=1), [2], [5]),
            SamplingRow(SamplingParams(temperature=0.0, logprobs=0), [3], [])]
    num_positions = [4, 3, 1, 3]
    logits = torch.randn(sum(num_positions), vocab, generator=g)
    chunks = logits.split(num_positions)
    argmax = [c.argmax(dim=-1).tolist() for c in chunks]
    drafts = [argmax[0][:3],  # all accepted: a bonus token at position 3
              argmax[1][:2], [],
              [(argmax[3][0] + 1) % vocab, argmax[3][1]]]  # the first rejected
    out = RejectionSampler(Sampler())(logits, rows, drafts)
    assert out.token_ids == [argmax[0], argmax[1], argmax[2], argmax[3][:1]]
    for row, chunk, tokens, entries in zip(rows, chunks, out.token_ids, out.logprobs):
        if row.params.logprobs is None:
            assert entries is None
            continue
        n = len(tokens)
        assert entries == compute_logprobs(chunk[:n], torch.tensor(tokens), [row] * n)


def test_bonus_token_ignores_draft_probs_past_a_rows_drafts() -> None:
    # Row of 1 draft in a batch padded to K = 2: whatever its draft_probs hold at position 1 (here
    # one-hot at the bonus distribution's likeliest token), the bonus token is drawn from p alone.
    g = torch.Generator().manual_seed(9)
    vocab = 6
    p = dirichlet(g, 1, 2, vocab)[0]
    q = torch.stack([p[0], torch.nn.functional.one_hot(p[1].argmax(), vocab).double()])
    n = NUM_DRAWS
    drafts = torch.multinomial(p[0], n, replacement=True, generator=g)  # drawn from q = p: all accepted
    token_ids, num_accepted = rejection_sample(
        p[[0, 1, 1]].expand(n, 3, vocab), torch.stack([drafts, torch.full((n,), -1)], dim=1),
        torch.ones(n, dtype=torch.long), q.expand(n, 2, vocab).float(), torch.zeros(n, dtype=torch.bool),
        exponential_noise((n, 3, vocab), g))
    assert bool((num_accepted == 1).all())
    assert_follows(token_ids[:, 1].numpy(), p[1].numpy(), q[1].numpy())
