"""The fused elementwise Triton kernels (RMSNorm, residual add + RMSNorm, neox rotary, SiLU-and-mul)
against the layers' torch code and a float64 computation.

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), so
shapes stay small. Every run draws fresh random inputs; the seed is in the failure message.
Tolerances: float32 within 1e-5 relative (1e-6 absolute where a rotation cancels to ~0); 16-bit
dtypes within one unit in the last place (eps relative) per rounding the kernel makes. A GPU
rounds to nearest, the interpreter truncates float32 -> bfloat16; both stay within one unit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.kernels.activation import silu_and_mul, silu_and_mul_partials
from engine.kernels.rms_norm import fused_add_rms_norm, rms_norm
from engine.kernels.rotary import rotary_embedding
from engine.layers.activation import SiluAndMul
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rotate_half
from tests.test_models import PagedModel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"  # the kernels run on CPU tensors only when interpreted
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6
MAX_POSITION = 4096


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _assert_within(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, roundings: int, msg: str) -> None:
    """``actual`` within ``roundings`` roundings to ``dtype`` of the float64 ``exact``."""
    if dtype == torch.float32:
        rtol, atol = 1e-5, 1e-6
    else:
        rtol, atol = roundings * torch.finfo(dtype).eps, 1e-5
    assert actual.dtype == dtype and actual.shape == exact.shape
    torch.testing.assert_close(actual.cpu().double(), exact.cpu().double(), rtol=rtol, atol=atol, msg=msg)


def _assert_rounds_like(actual: torch.Tensor, reference: torch.Tensor, msg: str) -> None:
    """Same 16-bit values as ``reference`` but for elements whose float32 intermediate sits within
    float32 error of a rounding boundary: those differ and are rare (a kernel that rounded at a
    different step differs in about a quarter of the elements). Such an element differs by one
    unit after the first rounding; times a weight below 2 and rounded again, by at most two."""
    assert actual.dtype == reference.dtype and actual.shape == reference.shape
    # Same-sign values: bit patterns count units in the last place.
    units = (actual.cpu().view(torch.int16).int() - reference.cpu().view(torch.int16).int()).abs()
    assert units.max().item() <= 2, msg
    assert units.float().mean().item() <= 0.01, f"{msg}: {units.float().mean().item():.2%} differ"


def _rms_norm_64(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x64 = x.cpu().double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * weight.cpu().double()


def _norm_layer(weight: torch.Tensor) -> RMSNorm:
    layer = RMSNorm(weight.shape[0], EPS).to(weight.dtype)
    layer.weight.copy_(weight.cpu())
    return layer


def _fused_qkv(gen: torch.Generator, num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """A fused qkv projection output and its q ``[T, H, D]``, k ``[T, Hkv, D]`` views, whose token
    stride is the whole qkv width."""
    qkv = _randn(gen, num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return qkv, q.view(num_tokens, heads, head_dim), k.view(num_tokens, kv_heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden", "row_pad"), [(1, 64, 0), (37, 200, 24)])
def test_rms_norm_matches_layer_and_float64(num_tokens: int, hidden: int, row_pad: int, dtype: torch.dtype) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    # row_pad > 0: rows are a slice of a wider tensor (row stride != hidden).
    x = _randn(gen, num_tokens, hidden + row_pad, dtype=dtype)[:, :hidden]
    weight = _randn(gen, hidden, dtype=dtype)
    out = rms_norm(x, weight, EPS)
    msg = f"seed {seed}"
    _assert_within(out, _rms_norm_64(x, weight), dtype, 2, msg)
    with torch.no_grad():
        _assert_within(out, _norm_layer(weight)(x.cpu()).double(), dtype, 3, msg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "head_dim"), [(1, 64), (37, 128)])
def test_per_head_rms_norm_on_qkv_views(num_tokens: int, head_dim: int, dtype: torch.dtype) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    qkv, q, k = _fused_qkv(gen, num_tokens, 4, 2, head_dim, dtype)
    before = qkv.clone()
    msg = f"seed {seed}"
    for x in (q, k):
        weight = _randn(gen, head_dim, dtype=dtype)
        out = rms_norm(x, weight, EPS)
        assert out.shape == x.shape
        _assert_within(out, _rms_norm_64(x, weight), dtype, 2, msg)
        with torch.no_grad():
            _assert_within(out, _norm_layer(weight)(x.cpu()).double(), dtype, 3, msg)
    assert torch.equal(qkv, before), "the norm must not write into its input"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 64), (37, 200)])
def test_fused_add_rms_norm_updates_residual_in_place(num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, num_tokens, 2 * hidden, dtype=dtype)[:, hidden:]
    residual = _randn(gen, num_tokens, hidden, dtype=dtype)
    weight = _randn(gen, hidden, dtype=dtype)
    with torch.no_grad():
        ref_normed, ref_residual = _norm_layer(weight)(x.cpu(), residual.cpu())
    normed, residual_out = fused_add_rms_norm(x, residual, weight, EPS)
    msg = f"seed {seed}"
    assert residual_out.data_ptr() == residual.data_ptr(), "the sum must be written over residual"
    if dtype == torch.bfloat16 and INTERPRETED:
        _assert_within(residual_out, ref_residual.double(), dtype, 1, msg)
    else:
        # One rounding of the sum to the model dtype, as torch's ``x + residual``.
        assert torch.equal(residual_out.cpu(), ref_residual), msg
    _assert_within(normed, _rms_norm_64(residual_out, weight), dtype, 2, msg)
    _assert_within(normed, ref_normed.double(), dtype, 3, msg)


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(INTERPRETED, reason="the interpreter "
                                                                          "truncates float32 -> bfloat16"))],
)
def test_rms_norm_rounds_like_the_layer(dtype: torch.dtype) -> None:
    """Normalized x rounded to the model dtype, then times the weight and rounded again."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    num_tokens, hidden = 37, 256
    x = _randn(gen, num_tokens, hidden, dtype=dtype)
    residual = _randn(gen, num_tokens, hidden, dtype=dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(DEVICE, dtype)
    layer = _norm_layer(weight)
    msg = f"seed {seed}"
    with torch.no_grad():
        _assert_rounds_like(rms_norm(x, weight, EPS), layer(x.cpu()), msg)
        ref_normed, _ = layer(x.cpu(), residual.cpu())
    normed, _ = fused_add_rms_norm(x, residual, weight, EPS)
    _assert_rounds_like(normed, ref_normed, msg)


def _rotary_64(positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    cos = rotary.cos_cache.double()[positions.cpu()]
    sin = rotary.sin_cache.double()[positions.cpu()]
    cos, sin = torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((sin, sin), dim=-1)[:, None, :]
    x64 = x.cpu().double()
    return x64 * cos + rotate_half(x64) * sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_rotary_rotates_qkv_views_in_place(num_tokens: int, head_dim: int, dtype: torch.dtype) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads = 4, 2
    qkv, q, k = _fused_qkv(gen, num_tokens, heads, kv_heads, head_dim, dtype)
    before = qkv.clone()
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(DEVICE)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
    rotary = RotaryEmbedding(head_dim, MAX_POSITION, 500000.0, scaling)
    with torch.no_grad():
        ref_q, ref_k = rotary(positions.cpu(), q.cpu(), k.cpu())
    exact_q, exact_k = _rotary_64(positions, q, rotary), _rotary_64(positions, k, rotary)
    rotary_embedding(positions, q, k, rotary.cos_cache.to(DEVICE), rotary.sin_cache.to(DEVICE))
    msg = f"seed {seed}"
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], before[:, (heads + kv_heads) * head_dim:]), "v changed"
    for out, exact, ref, x in ((q, exact_q, ref_q, before[:, : heads * head_dim]),
                               (k, exact_k, ref_k, before[:, heads * head_dim: (heads + kv_heads) * head_dim])):
        _assert_within(out, exact, dtype, 1, msg)
        if dtype == torch.float32:
            _assert_within(out, ref.double(), dtype, 1, msg)
        else:
            # The layer rounds cos, sin, both products and the sum: each term to within a unit.
            x = x.view(ref.shape).cpu().double()
            bound = 2 * torch.finfo(dtype).eps * (x.abs() + rotate_half(x).abs())
            assert ((out.cpu().double() - ref.double()).abs() <= bound).all(), msg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "row_pad"), [((1, 128), 0), ((37, 3000), 40), ((2, 3, 192), 0)])
def test_silu_and_mul_matches_layer_and_float64(shape: tuple[int, ...], row_pad: int, dtype: torch.dtype) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    # row_pad > 0: rows are a slice of a wider tensor (row stride != 2 * d).
    x = _randn(gen, *shape[:-1], shape[-1] + row_pad, dtype=dtype)[..., : shape[-1]]
    out = silu_and_mul(x)
    gate, up = x.cpu().double().chunk(2, dim=-1)
    msg = f"seed {seed}"
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    _assert_within(out, gate * torch.sigmoid(gate) * up, dtype, 1, msg)
    _assert_within(out, SiluAndMul()(x.cpu()).double(), dtype, 3, msg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("split_k", "tokens", "d"), [(1, 1, 128), (2, 3, 96), (11, 2, 1000)])
def test_silu_and_mul_partials_equals_sum_then_silu_and_mul(split_k: int, tokens: int, d: int,
                                                            dtype: torch.dtype) -> None:
    """Summing a projection's split-K partials while loading them gives the bits of summing them
    in split order (what the projection itself does), rounding, then ``silu_and_mul`` (Triton's
    interpreter rounds fp32 to bf16 toward zero, so there the sum is rounded that way)."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    partials = _randn(gen, split_k, tokens, 2 * d, dtype=torch.float32)
    total = torch.zeros(tokens, 2 * d, dtype=torch.float32, device=DEVICE)
    for p in partials:
        total = total + p
    out = silu_and_mul_partials(partials, dtype)
    assert out.shape == (tokens, d) and out.dtype == dtype
    if INTERPRETED and dtype == torch.bfloat16:
        total = (total.view(torch.int32) & -65536).view(torch.float32)  # toward zero: exact in bf16
    assert torch.equal(out, silu_and_mul(total.to(dtype))), f"seed {seed}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the layers use the kernels on CUDA only")
def test_layers_on_cuda_match_their_cpu_code() -> None:
    gen = torch.Generator().manual_seed(_seed())
    dtype, hidden, num_tokens = torch.float32, 256, 37
    x, residual = torch.randn(2, num_tokens, hidden, generator=gen)
    norm = _norm_layer(torch.randn(hidden, generator=gen))
    with torch.no_grad():
        ref_plain = norm(x)
        ref_normed, ref_residual = norm(x, residual)
        norm.to("cuda")
        _assert_within(norm(x.cuda()), ref_plain.double(), dtype, 1, "RMSNorm")
        normed, residual_out = norm(x.cuda(), residual.cuda())
        _assert_within(normed, ref_normed.double(), dtype, 1, "RMSNorm with residual")
        assert torch.equal(residual_out.cpu(), ref_residual)

        _, q, k = _fused_qkv(gen, num_tokens, 4, 2, 128, dtype)
        positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen)
        rotary = RotaryEmbedding(128, MAX_POSITION, 10000.0, None)
        ref_q, ref_k = rotary(positions, q.cpu(), k.cpu())
        out_q, out_k = rotary.to("cuda")(positions.cuda(), q, k)
        _assert_within(out_q, ref_q.double(), dtype, 1, "rotary q")
        _assert_within(out_k, ref_k.double(), dtype, 1, "rotary k")

        gate_up = torch.randn(num_tokens, 512, generator=gen)
        _assert_within(SiluAndMul()(gate_up.cuda()), SiluAndMul()(gate_up).double(), dtype, 1, "SiluAndMul")


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the layers take the kernels anyway")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_model_through_the_kernels_matches_its_cpu_path(
    family: str, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layers' CUDA branch (the kernels through the interpreter, the residual stream summed in
    place layer after layer) gives the float32 logits of their torch branch: prefill, then decode."""
    prompt = torch.randint(2, 500, (23,)).tolist()
    steps = [{"r": (0, prompt)}, {"r": (len(prompt), [7])}]
    reference = PagedModel(tiny_models[family], block_size=4)
    expected = [reference.step(chunks)["r"] for chunks in steps]
    fused = PagedModel(tiny_models[family], block_size=4)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda _: True), raising=False)
    got = [fused.step(chunks)["r"] for chunks in steps]
    monkeypatch.undo()
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _assert_normed_heads_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, msg: str) -> None:
    """Heads normalized (a per-head RMSNorm) and rotated by two kernels whose norms sum their
    squares in different orders: rstd agrees to fp32 rounding, the normed halves within a unit of
    the dtype, and a rotated element, a sum of two of them that may cancel, within a unit of the
    larger term: bounded per head ``[..., D]`` by its largest value."""
    ref = ref.cpu().double()
    scale = ref.abs().amax(dim=-1, keepdim=True)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert ((got.cpu().double() - ref).abs() <= tol * scale).all(), msg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(("num_tokens", "heads", "kv_heads", "head_dim"), [(1, 4, 2, 64), (19, 6, 3, 128)])
def test_rope_and_cache_equals_the_kernels_it_fuses(num_tokens, heads, kv_heads, head_dim, qk_norm, dtype) -> None:
    """The fused q/k norm + rotary + cache write against rms_norm, rotary_embedding and
    reshape_and_cache run in turn (each tested above against float64 and the layers): bit for bit
    without the norm, within the dtype's rounding with it."""
    from engine.kernels.reshape_and_cache import reshape_and_cache
    from engine.kernels.rotary import rope_and_cache

    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    qkv, q, k = _fused_qkv(gen, num_tokens, heads, kv_heads, head_dim, dtype)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(DEVICE)
    block_size, num_blocks = 16, 8
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[0] = -1  # a padded token: rotated, never cached
    slots = slots.to(DEVICE)
    rotary = RotaryEmbedding(head_dim, MAX_POSITION, 10000.0, None)
    cos, sin = rotary.cos_cache.to(DEVICE), rotary.sin_cache.to(DEVICE)
    weights = [(torch.rand(head_dim, generator=gen) + 0.5).to(DEVICE) for _ in range(2)] if qk_norm else [None] * 2

    ref_qkv = qkv.clone()
    ref_q = ref_qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    ref_k = ref_qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    if qk_norm:
        ref_q, ref_k = rms_norm(ref_q, weights[0], EPS), rms_norm(ref_k, weights[1], EPS)
    rotary_embedding(positions, ref_q, ref_k, cos, sin)
    caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(4)]
    reshape_and_cache(ref_k, v, caches[0], caches[1], slots)

    rope_and_cache(positions, q, k, v, cos, sin, caches[2], caches[3], slots, *weights, EPS)
    msg = f"seed {seed}"
    assert torch.equal(caches[3], caches[1]), msg  # v: copied
    if not qk_norm:
        assert torch.equal(q, ref_q) and torch.equal(k, ref_k) and torch.equal(caches[2], caches[0]), msg
    else:
        # The norm sums the squares of the two halves separately: rstd agrees to fp32 rounding.
        for got, ref in ((q, ref_q), (k, ref_k), (caches[2], caches[0])):
            _assert_normed_heads_close(got, ref, dtype, msg)
    assert (caches[2].abs().sum() > 0) == (num_tokens > 1), "cached a padded token, or nothing"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(("split_k", "num_tokens", "heads", "kv_heads", "head_dim"),
                         [(1, 1, 4, 2, 64), (11, 3, 6, 3, 128)])
def test_rope_and_cache_partials_equals_sum_then_rope_and_cache(split_k, num_tokens, heads, kv_heads, head_dim,
                                                                qk_norm, dtype) -> None:
    """A q/k/v projection's split-K partials summed while loaded, then rope_and_cache's work, give
    the bits of summing them in split order (the projection's own sum), rounding, then
    rope_and_cache (Triton's interpreter rounds fp32 to bf16 toward zero, so there the sum is
    rounded that way); with the q/k norm, within its rounding (its squares summed per head)."""
    from engine.kernels.rotary import rope_and_cache, rope_and_cache_partials

    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    partials = _randn(gen, split_k, num_tokens, width, dtype=torch.float32)
    total = torch.zeros(num_tokens, width, dtype=torch.float32, device=DEVICE)
    for p in partials:
        total = total + p
    if INTERPRETED and dtype == torch.bfloat16:
        total = (total.view(torch.int32) & -65536).view(torch.float32)  # toward zero: exact in bf16
    q, k, v = total.to(dtype).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in (q, k, v))
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(8 * 16, generator=gen)[:num_tokens]
    slots[-1] = -1  # a padded token: rotated, never cached
    slots = slots.to(DEVICE)
    rotary = RotaryEmbedding(head_dim, MAX_POSITION, 10000.0, None)
    cos, sin = rotary.cos_cache.to(DEVICE), rotary.sin_cache.to(DEVICE)
    weights = [(torch.rand(head_dim, generator=gen) + 0.5).to(DEVICE) for _ in range(2)] if qk_norm else [None] * 2
    caches = [torch.zeros(8, 16, kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(4)]

    rope_and_cache(positions, q, k, v, cos, sin, caches[0], caches[1], slots, *weights, EPS)
    got_q = rope_and_cache_partials(positions, partials, dtype, heads, kv_heads, cos, sin, caches[2], caches[3], slots,
                                    *weights, EPS)
    msg = f"seed {seed}"
    assert got_q.shape == q.shape and got_q.dtype == dtype
    assert torch.equal(caches[3], caches[1]), msg  # v
    if qk_norm:
        _assert_normed_heads_close(got_q, q, dtype, msg)
        _assert_normed_heads_close(caches[2], caches[0], dtype, msg)
    else:
        assert torch.equal(got_q, q) and torch.equal(caches[2], caches[0]), msg
    assert (caches[2].abs().sum() > 0) == (num_tokens > 1), "cached a padded token, or nothing"
