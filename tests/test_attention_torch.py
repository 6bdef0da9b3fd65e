"""The reference ``torch`` paged attention backend against a dense float64 computation, and the
backend registry and forward context."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from engine.attention.backend import (
    AttentionBackend,
    attention_backend_names,
    get_attention_backend,
    select_attention_backend,
)
from engine.attention.metadata import AttentionMetadata, get_forward_context, set_forward_context
from engine.attention.torch_backend import TorchAttentionBackend


def dense_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, window: int | None, scale: float
) -> torch.Tensor:
    """float64 attention, written out: q ``[Lq, H, D]`` at positions start.., over the request's
    full contiguous keys/values ``[L, Hkv, D]``."""
    num_q, num_heads, _ = q.shape
    group = num_heads // keys.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(num_heads):
        k, v = keys[:, h // group].double(), values[:, h // group].double()
        for i in range(num_q):
            p = start + i
            lo = 0 if window is None else max(0, p - window + 1)
            scores = (k[lo : p + 1] @ q[i, h].double()) * scale
            weights = torch.exp(scores - scores.max())
            out[i, h] = (weights / weights.sum()) @ v[lo : p + 1]
    return out


# (cached prefix, new tokens): a prefill, a prefill after a prefix hit, a chunk, decodes.
MIXED = [(0, 13), (8, 9), (21, 6), (37, 1), (5, 1), (0, 1)]
# Steps whose requests all have the same number of new tokens: the lean path pads them into one batch.
UNIFORM = {
    "decode": [(37, 1), (5, 1), (0, 1), (70, 1)],
    "verify": [(37, 5), (3, 5), (70, 5)],
    "prefill": [(9, 40)],
}


def _random_batch(
    seed: int, num_heads: int, num_kv_heads: int, block_size: int, window: int | None,
    null_out_of_window: bool = False, shapes: list[tuple[int, int]] = MIXED,
):
    """Requests with cached prefixes and new tokens (``shapes``), random non-contiguous blocks.
    The prefix K/V are written into the cache directly; the new ones are left for the backend
    to write. Unwritten slots hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    head_dim, num_blocks = 16, 160
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    requests, tables, slots, qs, ks, vs = [], [], [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(math.ceil(total / block_size))]
        keys = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        values = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        for pos in range(total):
            slot = (table[pos // block_size], pos % block_size)
            if pos < cached:
                k_cache[slot], v_cache[slot] = keys[pos], values[pos]
            else:
                slots.append(slot[0] * block_size + slot[1])
        if null_out_of_window and window is not None:
            for b in range(max(0, cached - window + 1) // block_size):
                table[b] = 0
        requests.append((cached, keys, values))
        tables.append(table)
        qs.append(torch.randn(new, num_heads, head_dim, generator=gen))
        ks.append(keys[cached:])
        vs.append(values[cached:])
    width = max(len(t) for t in tables)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0, *itertools.accumulate(n for _, n in shapes)], dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n in shapes], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(n for _, n in shapes),
        max_seq_len=max(c + n for c, n in shapes),
    )
    return requests, torch.cat(qs), torch.cat(ks), torch.cat(vs), (k_cache, v_cache), metadata


@pytest.mark.parametrize("window", [None, 5, 16])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_dense_float64_reference(num_heads: int, num_kv_heads: int, block_size: int, window) -> None:
    requests, q, k, v, kv_cache, metadata = _random_batch(
        block_size * 7 + num_kv_heads, num_heads, num_kv_heads, block_size, window
    )
    scale = 16**-0.5
    out = TorchAttentionBackend().forward(None, q, k, v, kv_cache, metadata, scale, window)
    assert out.shape == q.shape and out.dtype == q.dtype
    starts = metadata.query_start_loc.tolist()
    for i, (cached, keys, values) in enumerate(requests):
        expected = dense_reference(q[starts[i] : starts[i + 1]], keys, values, cached, window, scale)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]].double(), expected, atol=1e-5, rtol=1e-5)


def test_new_tokens_are_written_at_their_slots() -> None:
    requests, q, k, v, (k_cache, v_cache), metadata = _random_batch(3, 8, 2, 4, None)
    TorchAttentionBackend().forward(None, q, k, v, (k_cache, v_cache), metadata, 0.25, None)
    assert torch.equal(k_cache.view(-1, 2, 16)[metadata.slot_mapping], k)
    assert torch.equal(v_cache.view(-1, 2, 16)[metadata.slot_mapping], v)
    # Read back through the block tables, each request's cache is its full K sequence.
    for i, (_, keys, _) in enumerate(requests):
        table = metadata.block_tables[i].tolist()
        gathered = k_cache[table].flatten(0, 1)[: keys.shape[0]]
        assert torch.equal(gathered, keys)


def test_sliding_window_skips_null_blocks_outside_the_window() -> None:
    """Table entries of blocks wholly before the window point at block 0, which holds NaN:
    the result is still exact, so they were never read."""
    window = 5
    requests, q, k, v, kv_cache, metadata = _random_batch(11, 8, 2, 4, window, null_out_of_window=True)
    assert (metadata.block_tables == 0).any()
    out = TorchAttentionBackend().forward(None, q, k, v, kv_cache, metadata, 0.25, window)
    assert not out.isnan().any()
    starts = metadata.query_start_loc.tolist()
    for i, (cached, keys, values) in enumerate(requests):
        expected = dense_reference(q[starts[i] : starts[i + 1]], keys, values, cached, window, 0.25)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5, 16])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("step", [*UNIFORM, "mixed"])
def test_lean_path_matches_the_reference_path(step: str, block_size: int, window: int | None) -> None:
    """The CPU's lean path (slots planned once per forward, padded batches, one gather per layer)
    gives the reference path's result to float32 rounding, reads no freed block, and writes the
    same cache."""
    shapes = MIXED if step == "mixed" else UNIFORM[step]
    requests, q, k, v, kv_cache, metadata = _random_batch(
        block_size + 3, 8, 2, block_size, window, null_out_of_window=True, shapes=shapes)
    reference_cache = (kv_cache[0].clone(), kv_cache[1].clone())
    lean = TorchAttentionBackend().forward(None, q, k, v, kv_cache, metadata, 0.25, window)
    reference = TorchAttentionBackend(reference=True).forward(None, q, k, v, reference_cache, metadata, 0.25, window)
    assert not lean.isnan().any()
    torch.testing.assert_close(lean, reference, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(kv_cache, reference_cache, strict=True):
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    starts = metadata.query_start_loc.tolist()
    for i, (cached, keys, values) in enumerate(requests):
        expected = dense_reference(q[starts[i] : starts[i + 1]], keys, values, cached, window, 0.25)
        torch.testing.assert_close(lean[starts[i] : starts[i + 1]].double(), expected, atol=1e-5, rtol=1e-5)


def test_one_backend_plans_each_forward_anew() -> None:
    """Decode steps of one request through two layers and one backend: every step's metadata
    gets its own plan (the new key is seen), which both layers share."""
    gen = torch.Generator().manual_seed(0)
    block_size, num_kv_heads, head_dim = 4, 2, 16
    caches = [(torch.full((8, block_size, num_kv_heads, head_dim), float("nan")),
               torch.full((8, block_size, num_kv_heads, head_dim), float("nan"))) for _ in range(2)]
    table = [5, 2, 7, 1, 3]
    keys = [torch.empty(0, num_kv_heads, head_dim) for _ in caches]
    values = [torch.empty(0, num_kv_heads, head_dim) for _ in caches]
    backend = TorchAttentionBackend()
    for position in range(17):
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor([table[position // block_size] * block_size + position % block_size]),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
            seq_lens=torch.tensor([position + 1], dtype=torch.int32),
            block_tables=torch.tensor([table], dtype=torch.int32),
            max_query_len=1,
            max_seq_len=position + 1,
        )
        for layer, cache in enumerate(caches):
            q = torch.randn(1, 4, head_dim, generator=gen)
            k, v = (torch.randn(1, num_kv_heads, head_dim, generator=gen) for _ in range(2))
            keys[layer], values[layer] = torch.cat([keys[layer], k]), torch.cat([values[layer], v])
            out = backend.forward(None, q, k, v, cache, metadata, 0.25, None)
            expected = dense_reference(q, keys[layer], values[layer], position, None, 0.25)
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_give_bfloat16_close_to_reference() -> None:
    requests, q, k, v, (k_cache, v_cache), metadata = _random_batch(5, 8, 2, 4, None)
    cache = (k_cache.bfloat16(), v_cache.bfloat16())
    q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = TorchAttentionBackend().forward(None, q16, k16, v16, cache, metadata, 0.25, None)
    assert out.dtype == torch.bfloat16
    starts = metadata.query_start_loc.tolist()
    for i, (cached, keys, values) in enumerate(requests):
        expected = dense_reference(q[starts[i] : starts[i + 1]], keys, values, cached, None, 0.25)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]].double(), expected, atol=5e-2, rtol=5e-2)


def test_registry_picks_torch_on_cpu() -> None:
    assert "torch" in attention_backend_names()
    assert isinstance(get_attention_backend("torch"), TorchAttentionBackend)
    assert isinstance(get_attention_backend("torch"), AttentionBackend)
    assert select_attention_backend(torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        get_attention_backend("nope")


def test_forward_context_is_scoped() -> None:
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.int64),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        max_query_len=1,
        max_seq_len=1,
    )
    backend = TorchAttentionBackend()
    with pytest.raises(AssertionError):
        get_forward_context()
    with set_forward_context(meta, backend):
        assert get_forward_context().metadata is meta and get_forward_context().backend is backend
        assert meta.num_reqs == 1 and meta.num_tokens == 1
    with pytest.raises(AssertionError):
        get_forward_context()
