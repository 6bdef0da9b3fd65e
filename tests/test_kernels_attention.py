"""Triton paged attention kernels against a float64 paged-attention reference.

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before triton is imported), so shapes stay small. Every run draws fresh random inputs; the seed
is printed in the failure message.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
import torch

from engine.kernels import DecodeSplits, decode_attention, decode_num_splits, prefill_attention, reshape_and_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4


@dataclass(slots=True)
class PagedBatch:
    """A batch of requests whose KV lives in a randomly paged cache. Blocks no request owns, and
    block-table entries past a request's end or wholly outside its sliding window, point at a
    poison block full of NaN: reading it makes the output NaN."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_dim], the new tokens' keys
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    slot_mapping: torch.Tensor
    poison_block: int


def make_batch(
    rng: random.Random,
    context_lens: list[int],
    query_lens: list[int],
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
    fill_new_tokens: bool = True,
) -> PagedBatch:
    gen = torch.Generator().manual_seed(rng.getrandbits(32))
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks_per_req = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_req) + 1
    num_blocks = sum(blocks_per_req) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    poison_block = ids.pop()

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen, dtype=torch.float64)
    value_cache = torch.randn(shape, generator=gen, dtype=torch.float64)
    key_cache[poison_block] = float("nan")
    value_cache[poison_block] = float("nan")

    block_tables = torch.full((len(seq_lens), max_blocks), poison_block, dtype=torch.int32)
    slots = []
    for r, (ctx, n) in enumerate(zip(context_lens, seq_lens, strict=True)):
        owned = [ids.pop() for _ in range(blocks_per_req[r])]
        block_tables[r, : len(owned)] = torch.tensor(owned, dtype=torch.int32)
        if sliding_window:
            # Blocks whose every position is older than the oldest query's window were freed.
            oldest_visible = ctx - sliding_window + 1
            for b in range(len(owned)):
                if (b + 1) * block_size <= oldest_visible:
                    block_tables[r, b] = poison_block
        slots += [owned[p // block_size] * block_size + p % block_size for p in range(ctx, n)]

    num_tokens = sum(query_lens)
    key = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen, dtype=torch.float64)
    value = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen, dtype=torch.float64)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    if fill_new_tokens:
        flat_k = key_cache.view(-1, num_kv_heads, head_dim)
        flat_v = value_cache.view(-1, num_kv_heads, head_dim)
        flat_k[slot_mapping] = key
        flat_v[slot_mapping] = value
    # The query is a strided view into a wider projection output, as a fused qkv would give.
    qkv = torch.randn((num_tokens, group * num_kv_heads + 2, head_dim), generator=gen, dtype=torch.float64)
    query = qkv[:, : group * num_kv_heads]
    cu = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return PagedBatch(
        query=query.to(DEVICE, dtype),
        key=key.to(DEVICE, dtype),
        value=value.to(DEVICE, dtype),
        key_cache=key_cache.to(DEVICE, dtype),
        value_cache=value_cache.to(DEVICE, dtype),
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=cu.to(DEVICE),
        slot_mapping=slot_mapping.to(DEVICE),
        poison_block=poison_block,
    )


def reference_attention(b: PagedBatch, scale: float, sliding_window: int | None) -> torch.Tensor:
    """Float64 attention, gathering each request's keys position by position through its block
    table: query at position p sees keys j with p - window < j <= p."""
    num_heads = b.query.shape[1]
    block_size = b.key_cache.shape[1]
    group = num_heads // b.key_cache.shape[2]
    out = torch.zeros(b.query.shape, dtype=torch.float64)
    qsl = b.query_start_loc.tolist()
    for r, seq_len in enumerate(b.seq_lens.tolist()):
        q = b.query[qsl[r] : qsl[r + 1]].double().cpu()
        q_len = q.shape[0]
        pos = torch.arange(seq_len)
        blocks = b.block_tables[r].cpu().long()[pos // block_size]
        k = b.key_cache.double().cpu()[blocks, pos % block_size].repeat_interleave(group, dim=1)
        v = b.value_cache.double().cpu()[blocks, pos % block_size].repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - q_len, seq_len)
        visible = pos[None, :] <= q_pos[:, None]
        if sliding_window:
            visible &= pos[None, :] > q_pos[:, None] - sliding_window
        # Keys nobody sees may sit in a freed (poisoned) block: zero them, they get weight 0.
        seen = visible.any(0)
        k, v = torch.where(seen[:, None, None], k, 0.0), torch.where(seen[:, None, None], v, 0.0)
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        out[qsl[r] : qsl[r + 1]] = torch.einsum("hqk,khd->qhd", p, v)
    return out


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, seed: int) -> None:
    out = out.double().cpu()
    assert not out.isnan().any(), f"seed {seed}: NaN in output (unwritten element or poison read)"
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < tol, f"seed {seed}: relative error {rel:.2e}"


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)


@pytest.mark.parametrize(
    ("block_size", "group", "sliding_window", "block_m", "block_n"),
    [
        (16, 1, None, 16, 16),
        (16, 2, None, 32, 32),
        (64, 4, None, 32, 16),
        (16, 4, 20, 32, 16),
        (64, 2, 40, 16, 32),
    ],
)
def test_prefill_with_prefix_matches_reference(
    block_size: int, group: int, sliding_window: int | None, block_m: int, block_n: int
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # Mixed prefixes: none, shorter than a block, not a block multiple, long enough that a
    # window frees its first blocks; one decode-like row.
    context_lens = [0, rng.randint(1, 15), rng.randint(17, 90), 2 * block_size + rng.randint(0, 30), 40]
    query_lens = [rng.randint(1, 40), rng.randint(1, 20), rng.randint(2, 30), rng.randint(1, 8), 1]
    b = make_batch(rng, context_lens, query_lens, num_kv_heads=2, group=group, head_dim=32,
                   block_size=block_size, sliding_window=sliding_window)
    scale = 32**-0.5
    out = prefill_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens,
                            b.query_start_loc, scale, sliding_window, out=nan_like(b.query),
                            block_m=block_m, block_n=block_n)
    assert_close(out, reference_attention(b, scale, sliding_window), TOL, seed)


@pytest.mark.parametrize(
    ("block_size", "group", "sliding_window", "num_splits", "block_n"),
    [
        (16, 1, None, 1, 16),
        (16, 2, None, 3, 16),
        (64, 4, None, 4, 32),
        (16, 4, 24, 2, 16),
        (64, 1, 50, 3, 32),
    ],
)
@pytest.mark.parametrize("early_tile", [True, False])  # the first tile read before the PDL wait, or after
def test_split_kv_decode_matches_reference(
    block_size: int, group: int, sliding_window: int | None, num_splits: int, block_n: int, early_tile: bool
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    long = 3 * block_size + rng.randint(1, 20)  # a window frees its first blocks
    seq_lens = [1, rng.randint(2, 15), rng.randint(17, 130), block_size * 2, long]
    b = make_batch(rng, [n - 1 for n in seq_lens], [1] * len(seq_lens), num_kv_heads=2, group=group,
                   head_dim=32, block_size=block_size, sliding_window=sliding_window)
    scale = 32**-0.5
    out = decode_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, scale,
                           sliding_window, out=nan_like(b.query), num_splits=num_splits, block_n=block_n,
                           early_tile=early_tile)
    assert_close(out, reference_attention(b, scale, sliding_window), TOL, seed)


@pytest.mark.parametrize(("num_splits", "early_tile"), [(1, True), (1, False), (4, True)])
def test_decode_reads_the_new_tokens_key_and_value_the_kernel_ahead_wrote(num_splits: int, early_tile: bool) -> None:
    """With ``early_tile`` the split kernel reads its first tile of cached keys and values before
    its PDL wait, while the kernel ahead may still be writing the new token's key and value: it
    must take those two rows after the wait. Their slots hold NaN until ``reshape_and_cache``,
    launched just ahead, writes them (on a GPU both kernels run under PDL; interpreted, one after
    the other)."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # New tokens at a tile's first, middle and last column, and alone in a request.
    seq_lens = [1, 17, 32, 33, rng.randint(34, 140)]
    b = make_batch(rng, [n - 1 for n in seq_lens], [1] * len(seq_lens), num_kv_heads=2, group=2, head_dim=32,
                   block_size=16, fill_new_tokens=False)
    for cache in (b.key_cache, b.value_cache):
        cache.view(-1, *cache.shape[2:])[b.slot_mapping] = float("nan")
    reshape_and_cache(b.key, b.value, b.key_cache, b.value_cache, b.slot_mapping)
    out = decode_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, 0.2,
                           out=nan_like(b.query), num_splits=num_splits, block_n=16, early_tile=early_tile)
    assert_close(out, reference_attention(b, 0.2, None), TOL, seed)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_in_any_request_order_gives_the_same_rows(num_splits: int) -> None:
    """``order`` only changes which program takes which request: longest first, or any
    permutation, writes each request's row exactly as the natural order does."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    seq_lens = [rng.randint(1, 90) for _ in range(6)]
    b = make_batch(rng, [n - 1 for n in seq_lens], [1] * len(seq_lens), num_kv_heads=2, group=2, head_dim=32,
                   block_size=16)
    natural = decode_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, 0.2,
                               out=nan_like(b.query), num_splits=num_splits, block_n=16)
    assert_close(natural, reference_attention(b, 0.2, None), TOL, seed)
    shuffled = list(range(len(seq_lens)))
    rng.shuffle(shuffled)
    longest_first = sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i])
    for order in (longest_first, shuffled):
        out = decode_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, 0.2,
                               out=nan_like(b.query), num_splits=num_splits, block_n=16,
                               order=torch.tensor(order, dtype=torch.int32, device=b.query.device))
        assert torch.equal(out, natural), f"seed {seed}, order {order}"


def test_decode_left_as_splits_combines_to_the_same_rows() -> None:
    """``combine=False``: split decode returns its partials (``DecodeSplits``) without reducing
    them, ``combine()`` writes the rows the default call writes; one split, which writes the rows
    itself, returns them."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    seq_lens = [rng.randint(1, 90) for _ in range(3)]
    b = make_batch(rng, [n - 1 for n in seq_lens], [1] * 3, num_kv_heads=2, group=2, head_dim=32, block_size=16,
                   sliding_window=30)
    args = (b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, 0.2, 30)
    whole = decode_attention(*args, out=nan_like(b.query), num_splits=3, block_n=16)
    splits = decode_attention(*args, out=nan_like(b.query), num_splits=3, block_n=16, combine=False)
    assert isinstance(splits, DecodeSplits) and splits.part_out.shape == (3, 4, 3, 32)
    assert splits.out.isnan().all(), "written before combine()"
    assert torch.equal(splits.combine(), whole), f"seed {seed}"
    one = decode_attention(*args, out=nan_like(b.query), num_splits=1, block_n=16, combine=False)
    assert_close(one, reference_attention(b, 0.2, 30), TOL, seed)


@pytest.mark.parametrize("sliding_window", [None, 20])
def test_decode_splits_outnumbering_keys_leave_empty_splits_harmless(
    sliding_window: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Splits without keys (the graph's 16 splits of a short context) exit without writing, the
    reduction reads only the splits that have keys, and a row without keys (a graph's padding)
    comes out as zeros. The partials' workspace starts as NaN here, so a partial the reduction
    read unwritten would show."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    seq_lens = [0, 1, 3, 40, 70]  # 0: a padded row of a graph, all of whose splits are empty
    b = make_batch(rng, [max(n - 1, 0) for n in seq_lens], [1] * 5, num_kv_heads=1, group=2, head_dim=16,
                   block_size=16, sliding_window=sliding_window)
    b.seq_lens[0] = 0
    real_new_empty = torch.Tensor.new_empty

    def nan_workspace(t: torch.Tensor, size, dtype=None, **kw) -> torch.Tensor:
        empty = real_new_empty(t, size, dtype=dtype, **kw)
        return empty.fill_(float("nan")) if empty.is_floating_point() else empty

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_workspace)
    out = decode_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, 0.3,
                           sliding_window, out=nan_like(b.query), num_splits=8, block_n=16)
    ref = reference_attention(b, 0.3, sliding_window)
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu())), f"seed {seed}: a padded row is not zeros"
    assert_close(out[1:], ref[1:], TOL, seed)


def test_decode_agrees_with_prefill_kernel() -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    seq_lens = [rng.randint(1, 150) for _ in range(4)]
    b = make_batch(rng, [n - 1 for n in seq_lens], [1] * 4, num_kv_heads=2, group=2, head_dim=64,
                   block_size=16)
    args = (b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens)
    decode = decode_attention(*args, 0.125, max_seq_len=max(seq_lens), block_n=32)
    prefill = prefill_attention(*args, b.query_start_loc, 0.125, block_m=16, block_n=32)
    assert (decode - prefill).norm() / prefill.norm() < TOL, f"seed {seed}"


@pytest.mark.parametrize("num_splits", [1, 3])  # one split: no early tile (the default there)
def test_mixed_batch_splits_rows_between_prefill_and_decode_kernels(num_splits: int) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    query_lens = [1, rng.randint(2, 20), 1, rng.randint(2, 9), 1]
    context_lens = [rng.randint(0, 80) for _ in query_lens]
    b = make_batch(rng, context_lens, query_lens, num_kv_heads=2, group=4, head_dim=16, block_size=16,
                   sliding_window=30)
    args = (b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens)
    out = prefill_attention(*args, b.query_start_loc, 0.3, 30, nan_like(b.query), skip_decode=True,
                            max_query_len=max(query_lens), block_n=16)
    is_decode_row = torch.tensor([n == 1 for n in query_lens for _ in range(n)], device=out.device)
    assert out[is_decode_row].isnan().all() and not out[~is_decode_row].isnan().any(), f"seed {seed}"
    decode_attention(*args, 0.3, 30, out, query_start_loc=b.query_start_loc, num_splits=num_splits, block_n=16)
    assert_close(out, reference_attention(b, 0.3, 30), TOL, seed)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        # Triton's interpreter multiplies bf16 bit patterns in tl.dot, so bf16 is checked on GPU only.
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")),
    ],
)
def test_half_precision_inputs_accumulate_in_fp32(dtype: torch.dtype) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    b = make_batch(rng, [5, 30], [12, 1], num_kv_heads=1, group=2, head_dim=32, block_size=16, dtype=dtype)
    args = (b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens)
    prefill = prefill_attention(*args, b.query_start_loc, 0.2, out=nan_like(b.query), block_m=16, block_n=16)
    decode_rows = b.query_start_loc[1:] - 1
    decode = decode_attention(b.query[decode_rows], *args[1:], 0.2, num_splits=2, block_n=16)
    assert prefill.dtype == decode.dtype == dtype
    ref = reference_attention(b, 0.2, None)
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    assert_close(prefill, ref, tol, seed)
    assert_close(decode, ref[decode_rows.cpu()], tol, seed)


def test_reshape_and_cache_writes_slots_and_skips_padding() -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 16, 3, 24
    num_tokens = 20
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE)
    value_cache = torch.randn_like(key_cache)
    slots = rng.sample(range(num_blocks * block_size), num_tokens)
    for i in rng.sample(range(num_tokens), 5):
        slots[i] = -1
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    # Keys as a strided view, as they come out of a fused qkv projection.
    kv = torch.randn(num_tokens, 2 * num_kv_heads + 1, head_dim, device=DEVICE)
    key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads : 2 * num_kv_heads]

    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    real = slot_mapping >= 0
    expected_k.view(-1, num_kv_heads, head_dim)[slot_mapping[real]] = key[real]
    expected_v.view(-1, num_kv_heads, head_dim)[slot_mapping[real]] = value[real]
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    assert torch.equal(key_cache, expected_k), f"seed {seed}"
    assert torch.equal(value_cache, expected_v), f"seed {seed}"


def test_cache_then_prefill_equals_reference() -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    b = make_batch(rng, [0, 21, 7], [9, 14, 1], num_kv_heads=2, group=2, head_dim=16, block_size=16,
                   fill_new_tokens=False)
    reshape_and_cache(b.key, b.value, b.key_cache, b.value_cache, b.slot_mapping)
    out = prefill_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens,
                            b.query_start_loc, 0.25, block_m=16, block_n=16)
    # The reference reads the new keys from the layer's inputs, not from the cache.
    ref_batch = make_batch(random.Random(seed), [0, 21, 7], [9, 14, 1], num_kv_heads=2, group=2,
                           head_dim=16, block_size=16)
    assert_close(out, reference_attention(ref_batch, 0.25, None), TOL, seed)


def test_num_splits_spread_small_batches_only() -> None:
    # Batch 1 on an H200 (bench/results/decode_attention_single_h200.json): 16 splits match 33 at
    # 4,096 keys and beat them at 1,024, so the wave rule stops at 16; graphs (no length) too.
    assert decode_num_splits(1, 8, 4096, sms=132) == decode_num_splits(1, 8, None, sms=132) == 16
    assert decode_num_splits(1, 8, 100, sms=132) == 1  # no split shorter than 128 keys
    assert decode_num_splits(4, 8, None, sms=132) == 9  # about two waves of programs
    assert decode_num_splits(256, 8, 4096, sms=132) == 1


@pytest.mark.parametrize(
    ("query_lens", "sliding_window"),
    [
        ([7, 1, 23, 1, 2], None),  # mixed: prefill-with-prefix rows and decode rows in one step
        ([1, 1, 1, 1], None),  # pure decode
        ([1, 12, 1, 30], 18),
        ([1, 1, 1], 21),
    ],
)
def test_triton_backend_matches_torch_backend(query_lens: list[int], sliding_window: int | None) -> None:
    from engine.attention.metadata import AttentionMetadata
    from engine.attention.torch_backend import TorchAttentionBackend
    from engine.attention.triton_backend import TritonAttentionBackend

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    context_lens = [rng.choice([0, rng.randint(1, 100)]) for _ in query_lens]
    context_lens[-1] = 70  # long enough for the window to free a block
    b = make_batch(rng, context_lens, query_lens, num_kv_heads=2, group=2, head_dim=32, block_size=16,
                   sliding_window=sliding_window, fill_new_tokens=False)
    metadata = AttentionMetadata(
        slot_mapping=b.slot_mapping, query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
        block_tables=b.block_tables, max_query_len=max(query_lens), max_seq_len=int(b.seq_lens.max()),
    )
    outs, caches = [], []
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        kv_cache = (b.key_cache.clone(), b.value_cache.clone())
        outs.append(backend.forward(None, b.query, b.key, b.value, kv_cache, metadata, 0.2, sliding_window))
        caches.append(kv_cache)
    triton_out, torch_out = outs
    assert torch.equal(caches[0][0].nan_to_num(), caches[1][0].nan_to_num()), f"seed {seed}"
    assert torch.equal(caches[0][1].nan_to_num(), caches[1][1].nan_to_num()), f"seed {seed}"
    assert_close(triton_out, torch_out.double().cpu(), TOL, seed)
    written = dataclasses.replace(b, key_cache=caches[1][0], value_cache=caches[1][1])
    assert_close(triton_out, reference_attention(written, 0.2, sliding_window), TOL, seed)


def test_triton_backend_is_registered_and_not_chosen_on_cpu() -> None:
    from engine.attention.backend import get_attention_backend
    from engine.attention.triton_backend import TritonAttentionBackend

    assert isinstance(get_attention_backend("triton"), TritonAttentionBackend)
    assert not TritonAttentionBackend.is_available(torch.device("cpu"))


def test_triton_backend_generates_transformers_greedy_tokens(tiny_models) -> None:
    """A tiny Mistral (sliding window 16, GQA) through the runner with the triton backend:
    chunked prefills, mixed steps and decodes give Hugging Face's greedy tokens."""
    from engine.attention.triton_backend import TritonAttentionBackend
    from tests.test_model_runner import Driver, _hf, _hf_greedy, _runner

    path = tiny_models["mistral"]
    runner = _runner(path, num_kv_blocks=64)
    runner.attention_backend = TritonAttentionBackend()
    prompts = {"a": [(7 * i) % 500 + 2 for i in range(27)], "b": list(range(2, 9))}
    num_new = 5
    driver = Driver(runner, budget=16)
    for rid, prompt in prompts.items():
        driver.add(rid, prompt)
    while any(len(out) < num_new for out in driver.outputs.values()):
        driver.step()
    hf = _hf(path)
    for rid, prompt in prompts.items():
        assert driver.outputs[rid][:num_new] == _hf_greedy(hf, prompt, num_new), rid
