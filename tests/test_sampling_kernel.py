"""The one-pass Gumbel-max sampling kernel (through Triton's interpreter on CPU): chi-square
tests of its draws against the tempered softmax, computed in float64."""

from __future__ import annotations

import os

import pytest
import torch
from scipy.stats import chisquare

from engine.kernels.sampling import gumbel_sample

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2, -0.5, 0.8]


@pytest.mark.parametrize("rand4x", [True, False])
def test_draws_follow_the_tempered_softmax(rand4x: bool) -> None:
    """1,000 rows of the same logits, one draw each: chi-square against softmax(logits / 0.7).
    Power at this size (simulated, p < 1e-3): a 0.10 shift of the top token's probability (0.45)
    is found 97% of the time, 0.08 75%; the untempered softmax is always rejected, as asserted."""
    seed = int.from_bytes(os.urandom(3), "little")
    rows, temperature = 1000, 0.7
    logits = torch.tensor(LOGITS).repeat(rows, 1).to(DEVICE)
    inv_t = torch.full((rows,), 1 / temperature).to(DEVICE)
    tokens = gumbel_sample(logits, inv_t, seed, num_chunks=1, block=16, rand4x=rand4x).cpu()
    assert tokens.dtype == torch.int64 and tokens.shape == (rows,)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    probs = torch.softmax(torch.tensor(LOGITS, dtype=torch.float64) / temperature, dim=0)
    assert chisquare(counts, probs * rows).pvalue > 1e-3, f"seed {seed}: {counts.tolist()}"
    untempered = torch.softmax(torch.tensor(LOGITS, dtype=torch.float64), dim=0)
    assert chisquare(counts, untempered * rows).pvalue < 1e-3, f"seed {seed}"


@pytest.mark.parametrize("rand4x", [True, False])
def test_draws_depend_on_seed_row_and_column_only(rand4x: bool) -> None:
    """The noise is a function of (seed, row, column): splitting the vocabulary into chunks gives
    the same tokens, and so does a row's place in the batch; another seed other tokens; a -inf
    logit is never drawn."""
    rows = 32
    logits = torch.randn(rows, 40, generator=torch.Generator().manual_seed(1))
    logits[:, 7] = float("-inf")
    logits, inv_t = logits.to(DEVICE), torch.ones(rows).to(DEVICE)
    first = gumbel_sample(logits, inv_t, 1234, num_chunks=1, block=16, rand4x=rand4x)
    assert torch.equal(first, gumbel_sample(logits, inv_t, 1234, num_chunks=3, block=16, rand4x=rand4x))
    assert torch.equal(first[:5], gumbel_sample(logits[:5], inv_t[:5], 1234, num_chunks=2, block=16, rand4x=rand4x))
    assert not torch.equal(first, gumbel_sample(logits, inv_t, 1235, num_chunks=1, block=16, rand4x=rand4x))
    assert (first != 7).all() and ((first >= 0) & (first < 40)).all()


def test_bfloat16_logits_draw_as_their_float32_copy() -> None:
    """The kernel reads the logits in their own dtype: bf16 logits give the tokens their exact
    float32 widening gives (the step no longer makes that copy)."""
    rows = 24
    logits = (torch.randn(rows, 300, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16)
    inv_t = torch.full((rows,), 1 / 0.6)
    logits, inv_t = logits.to(DEVICE), inv_t.to(DEVICE)
    tokens = gumbel_sample(logits, inv_t, 99, num_chunks=2, block=64)
    assert torch.equal(tokens, gumbel_sample(logits.float(), inv_t, 99, num_chunks=2, block=64))
    assert len(set(tokens.tolist())) > 1  # not all rows on one token: the noise does its work


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the sampler takes the kernel on CUDA only")
def test_sampler_on_cuda_draws_plain_rows_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.kernels.sampling as sampling
    from engine.sampler import Sampler, SamplingRow
    from engine.sampling_params import SamplingParams

    calls = []
    monkeypatch.setattr(sampling, "gumbel_sample", lambda *a, **k: calls.append(1) or gumbel_sample(*a, **k))
    rows = 20000
    batch = [SamplingRow(SamplingParams(temperature=0.7), [1], []) for _ in range(rows)]
    tokens = Sampler(seed=0).sample_tokens(torch.tensor(LOGITS).repeat(rows, 1).cuda(), batch).cpu()
    assert calls == [1]
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    probs = torch.softmax(torch.tensor(LOGITS, dtype=torch.float64) / 0.7, dim=0)
    assert chisquare(counts, probs * rows).pvalue > 1e-3, counts.tolist()
