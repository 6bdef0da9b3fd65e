"""The draft model's forward on the CPU for its drafting steps: every request feeds the same few
tokens (one per draft, one or two to catch up) and samples at its last.

On a small CPU a draft forward is a few megabytes of weights and over a hundred small ops, each
costing several microseconds of dispatch, so the generic forward (input buffers, attention plan,
module calls, per-op casts) spends more time in overhead than in arithmetic. This path runs the
same layers with about 20 ops each, in one TorchScript function per layer::

    x = embed[tokens]                                   once per forward: positions, slots, mask,
    per layer:                                          cos / signed sin at the positions
        qkv = qkv_proj'(unit(x + residual))             unit(x) = x / sqrt(|x|^2 + n eps); the
        q|k = rotate(qkv[:, :q+k])                      norm's weight and sqrt(n) are in qkv_proj'
        cache[slots] = k, v                             index_copy_
        o = sdpa(q, cache[key_slots] ...)               one index_select for K and V, GQA in sdpa
        residual += o_proj(o)
        x = down_proj(silu(gate) * up),  gate|up = gate_up_proj'(unit(residual))
    logits = lm_head'(unit(x + residual)[last token of each request])

The primed linears are copies with an RMSNorm's weight folded in, and every linear runs from a
copy packed for fbgemm's fp16 GEMM where it runs (the draft's weights again, in half the bytes).
It reads and writes the draft's paged KV cache exactly as the generic forward does (same slots,
same block tables), so the two mix freely from step to step (a prompt the draft has not seen
goes through the generic forward). With fp32 copies the results agree with the generic
forward's to float32 rounding; with fp16 copies to the weights' fp16 rounding: a draft only
guesses, and the target's verification decides every token, so outputs never depend on it.

Measured on the bundled models (2-core CPU, bench/bench_spec_decode.py, held-out code): a draft
forward 6.2 ms generic, 3.5-4.6 ms in Python, 2.9 ms in TorchScript; speculative decoding with the
draft 1.04x the baseline generic, 1.27x in Python, 1.49x in TorchScript, 1.57-1.58x with the
confidence threshold (``draft_confidence_threshold``).
"""

# TorchScript reads _layer_forward's annotations and knows Optional[...], not X | None.
# ruff: noqa: UP045
from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.torch_backend import visible_keys
from engine.layers import cpu_linear
from engine.quantization.awq import dequantize
from scheduler.outputs import ScheduledRequest

logger = logging.getLogger(__name__)
try:
    PackedParams = torch.classes.quantized.LinearPackedParamsBase  # fbgemm's packed fp16 weight
except RuntimeError:  # a torch without quantized ops: fp32 weights, and the layers run as Python
    PackedParams = torch.Tensor

# Longer feeds (a prompt the draft has not seen) go through the generic forward.
MAX_TOKENS_PER_REQUEST = 8


class LeanDraftForward:
    """Logits of a Llama-family draft at each request's last new token, for batches where every
    request feeds the same number (at most ``MAX_TOKENS_PER_REQUEST``) of tokens and samples."""

    def __init__(self, model: nn.Module, block_size: int) -> None:
        inner = model.model
        attn = inner.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = attn.scale
        self.sliding_window = attn.sliding_window
        self.block_size = block_size
        self.embed = inner.embed_tokens.weight
        dtype = self.embed.dtype
        cos, sin = attn.rotary.cos_cache, attn.rotary.sin_cache
        self.cos = torch.cat((cos, cos), dim=-1).to(dtype)
        self.signed_sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        self.layers = [_Layer(layer) for layer in inner.layers]
        norms = [inner.norm, *(m for layer in inner.layers for m in (layer.input_layernorm,
                                                                    layer.post_attention_layernorm))]
        assert len({m.eps for m in norms}) == 1, "the draft's RMSNorms differ in eps"
        self.norm_n_eps = self.embed.shape[1] * inner.norm.eps
        self.lm_head = _folded_linear(model.lm_head, inner.norm)

    @staticmethod
    def supports(batch: Sequence[ScheduledRequest]) -> bool:
        n = len(batch[0].token_ids) if batch else 0
        return 0 < n <= MAX_TOKENS_PER_REQUEST and all(len(r.token_ids) == n and r.sample for r in batch)

    @torch.inference_mode()
    def __call__(self, batch: Sequence[ScheduledRequest]) -> torch.Tensor:
        """``[len(batch), vocab]`` logits; ``supports(batch)`` must hold."""
        b, n = len(batch), len(batch[0].token_ids)
        tokens, positions, slots, key_slots, mask = self._inputs(batch, n)
        cos = self.cos.index_select(0, positions)[:, None, :]
        signed_sin = self.signed_sin.index_select(0, positions)[:, None, :]
        layer_forward = _scripted_layer()
        x = self.embed.index_select(0, tokens)
        residual = torch.zeros_like(x)  # the first layer's residual stream: its embedding
        for layer in self.layers:
            x, residual = layer_forward(
                x, residual, cos, signed_sin, slots, key_slots, mask, layer.kv_cache, *layer.weights,
                b, n, self.num_heads, self.num_kv_heads, self.head_dim, self.scale, self.norm_n_eps)
        h = _unit(x + residual, self.norm_n_eps)
        if n > 1:
            h = h.view(b, n, -1)[:, -1]
        return _linear(h, *self.lm_head)

    def _inputs(self, batch: Sequence[ScheduledRequest], n: int):
        """(token ids [T], positions [T], new slots [T], key slots [B * L], mask [B, 1, n, L] or
        None), the keys as the CPU attention backend lists them (``visible_keys``)."""
        bs = self.block_size
        tokens = np.fromiter((tok for r in batch for tok in r.token_ids), dtype=np.int64, count=len(batch) * n)
        starts = np.fromiter((r.start_position for r in batch), dtype=np.int64, count=len(batch))
        num_blocks = -(-(int(starts.max()) + n) // bs)
        tables = np.zeros((len(batch), num_blocks), dtype=np.int64)
        for row, r in zip(tables, batch, strict=True):
            table = r.block_table[:num_blocks]
            row[:len(table)] = table
        key_slots, allowed = visible_keys(tables, starts, n, bs, self.sliding_window)
        q_pos = starts[:, None] + np.arange(n)  # [B, n]
        slots = np.take_along_axis(tables, q_pos // bs, axis=1) * bs + q_pos % bs
        mask = None if allowed.all() else torch.from_numpy(allowed[:, None])
        return (torch.from_numpy(tokens), torch.from_numpy(q_pos.reshape(-1)), torch.from_numpy(slots.reshape(-1)),
                torch.from_numpy(key_slots.reshape(-1)), mask)


# The layer's ~20 ops run in TorchScript: from Python each op costs several microseconds of
# dispatch on a small CPU, in TorchScript's interpreter a fraction of that (a forward of the
# bundled draft: 4.2 -> 2.9 ms, the same bits; torch.compile was slower, 4.9 ms, breaking its graph
# at fbgemm's packed weights). Scripted on first use, not at import; where TorchScript is gone
# (it is deprecated), the same function runs as Python.
def _layer_forward(
    x: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
    slots: torch.Tensor, key_slots: torch.Tensor, mask: Optional[torch.Tensor], kv_cache: torch.Tensor,
    qkv_packed: Optional[PackedParams], qkv_weight: Optional[torch.Tensor], qkv_bias: Optional[torch.Tensor],
    o_packed: Optional[PackedParams], o_weight: Optional[torch.Tensor], o_bias: Optional[torch.Tensor],
    gate_up_packed: Optional[PackedParams], gate_up_weight: Optional[torch.Tensor],
    gate_up_bias: Optional[torch.Tensor],
    down_packed: Optional[PackedParams], down_weight: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
    q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor], qk_norm_eps: float,
    b: int, n: int, heads: int, kv_heads: int, d: int, scale: float, n_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer: ``(x, residual)`` in, this layer's pair out (see the module's docstring).
    ``kv_cache`` is the layer's ``[2, slots, kv heads, head dim]`` pair view; each linear comes as
    (fbgemm params or None, fp32 weight or None, bias or None)."""
    t = b * n
    q_size = heads * d
    qk_size = q_size + kv_heads * d
    residual = x + residual
    qkv = _linear(_unit(residual, n_eps), qkv_packed, qkv_weight, qkv_bias)
    if q_norm is not None and k_norm is not None:  # per-head norms first: q and k rotate apart
        q = F.rms_norm(qkv[:, :q_size].reshape(t, heads, d), [d], q_norm, qk_norm_eps)
        k = F.rms_norm(qkv[:, q_size:qk_size].reshape(t, kv_heads, d), [d], k_norm, qk_norm_eps)
        q = q * cos + q.roll(d // 2, -1) * signed_sin
        k = k * cos + k.roll(d // 2, -1) * signed_sin
    else:
        qk = qkv[:, :qk_size].view(t, heads + kv_heads, d)
        qk = qk * cos + qk.roll(d // 2, -1) * signed_sin
        q = qk[:, :heads]
        k = qk[:, heads:]
    kv_cache[0].index_copy_(0, slots, k)
    kv_cache[1].index_copy_(0, slots, qkv[:, qk_size:].view(t, kv_heads, d))
    kv = kv_cache.index_select(1, key_slots).view(2, b, -1, kv_heads, d).transpose(2, 3)
    out = F.scaled_dot_product_attention(q.reshape(b, n, heads, d).transpose(1, 2), kv[0], kv[1],
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    residual = _linear(out.transpose(1, 2).reshape(t, q_size), o_packed, o_weight, o_bias) + residual
    gate, up = _linear(_unit(residual, n_eps), gate_up_packed, gate_up_weight, gate_up_bias).chunk(2, dim=-1)
    return _linear(F.silu(gate).mul_(up), down_packed, down_weight, down_bias), residual


def _unit(x: torch.Tensor, n_eps: float) -> torch.Tensor:
    """``x / sqrt(|x|^2 + n * eps)`` per row of n features: RMSNorm ``x / sqrt(mean(x^2) + eps)``
    but for sqrt(n) and its weight, which the next linear holds."""
    return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(n_eps).rsqrt_()


def _linear(x: torch.Tensor, packed: Optional[PackedParams], weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    if packed is not None:
        return torch.ops.quantized.linear_dynamic_fp16(x, packed)
    assert weight is not None
    return F.linear(x, weight, bias)


@functools.cache
def _scripted_layer() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_layer_forward)
    except Exception as exc:  # noqa: BLE001 - any TorchScript failure leaves the Python function
        logger.warning("draft layers run as Python: TorchScript failed (%s)", exc)
        return _layer_forward


LinearWeights = tuple[Optional[PackedParams], Optional[torch.Tensor], Optional[torch.Tensor]]


class _Layer:
    """One decoder layer's weights and cache, looked up once, in ``_layer_forward``'s order."""

    def __init__(self, layer: nn.Module) -> None:
        attn = layer.self_attn
        norms: tuple[torch.Tensor | None, torch.Tensor | None, float] = (None, None, 0.0)
        if attn.qk_norm:
            assert attn.q_norm.eps == attn.k_norm.eps
            norms = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps)
        self.weights = (*_folded_linear(attn.qkv_proj, layer.input_layernorm), *_folded_linear(attn.o_proj),
                        *_folded_linear(layer.mlp.gate_up_proj, layer.post_attention_layernorm),
                        *_folded_linear(layer.mlp.down_proj), *norms)
        k_cache, v_cache = (c.view(-1, *c.shape[2:]) for c in attn.kv_cache)  # [slots, kv heads, head dim]
        self.kv_cache = _pair_view(k_cache, v_cache)


def _pair_view(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[2, slots, ...]`` over both caches without a copy (V lies at a fixed offset from K in the
    one allocation allocate_kv_cache makes), so that one index_select gathers keys and values."""
    gap, size = v.data_ptr() - k.data_ptr(), k.element_size()
    assert k.is_contiguous() and v.is_contiguous() and k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert gap > 0 and gap % size == 0, "the draft's V cache must follow its K cache in one allocation"
    return k.as_strided((2, *k.shape), (gap // size, *k.stride()))


def _folded_linear(linear: nn.Module, norm: nn.Module | None = None) -> LinearWeights:
    """The weights of ``x -> linear(norm(x))`` for unit rows ``x`` (``linear(x)`` without a norm):
    the norm's weight and sqrt(in_features) folded into a copy of the linear's weight, packed for
    fbgemm's fp16 GEMM where it runs (else fp32 for ``F.linear``)."""
    weight = _dense_weight(linear).float()
    if norm is not None:
        weight = weight * (norm.weight.float() * linear.in_features**0.5)
    bias = None if linear.bias is None else linear.bias.float()
    if cpu_linear.fp16_available():
        return torch.ops.quantized.linear_prepack_fp16(weight, bias), None, None
    return None, weight, bias


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    """``[out_features, in_features]``: the layer's CPU weight, or the copy its packed form holds,
    or (AWQ, nothing cached) its dequantized weight."""
    weight = linear.quant_method.cpu_weight(linear)
    if weight is not None:
        return weight
    packed = linear.packed_weight
    if isinstance(packed, torch.Tensor) and packed.dtype == torch.float16:  # sluice's fp16 kernel
        return packed.float()
    if packed is not None and not isinstance(packed, torch.Tensor):  # fbgemm's fp16 params
        return torch.ops.quantized.linear_unpack_fp16(packed)[0]
    return dequantize(linear.qweight, linear.qzeros, linear.scales).t()
