"""The draft model's forward on the CPU for its drafting steps: every request feeds the same few
tokens (one per draft, one or two to catch up) and samples at its last.

On a small CPU a draft forward is a few megabytes of weights and over a hundred small ops, each
costing several microseconds of dispatch, so the generic forward (input buffers, attention plan,
module calls, per-op casts) spends more time in overhead than in arithmetic. This path runs the
same layers with about 20 ops each::

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

Measured on the bundled models (2-core CPU, bench/bench_spec_decode.py): a draft forward 6.2 ->
2.9-3.8 ms, speculative decoding with the draft 1.04x -> 1.27x the baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import cpu_linear
from engine.quantization.awq import dequantize
from scheduler.outputs import ScheduledRequest

# Longer feeds (a prompt the draft has not seen) go through the generic forward.
MAX_TOKENS_PER_REQUEST = 8


class LeanDraftForward:
    """Logits of a Llama-family draft at each request's last new token, for batches where every
    request feeds the same number (at most ``MAX_TOKENS_PER_REQUEST``) of tokens and samples."""

    def __init__(self, model: nn.Module, block_size: int) -> None:
        inner = model.model
        attn = inner.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scale = attn.scale
        self.sliding_window = attn.sliding_window
        self.block_size = block_size
        self.embed = inner.embed_tokens.weight
        dtype = self.embed.dtype
        cos, sin = attn.rotary.cos_cache, attn.rotary.sin_cache
        self.cos = torch.cat((cos, cos), dim=-1).to(dtype)
        self.signed_sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        self.layers = [_Layer(layer, block_size) for layer in inner.layers]
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
        t = b * n
        tokens, positions, slots, key_slots, mask = self._inputs(batch, n)
        cos = self.cos.index_select(0, positions)[:, None, :]
        signed_sin = self.signed_sin.index_select(0, positions)[:, None, :]
        half = self.head_dim // 2
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_size, qk_size = self.q_size, self.q_size + self.kv_size
        n_eps = self.norm_n_eps

        x = self.embed.index_select(0, tokens)
        residual = None
        for layer in self.layers:
            residual = x if residual is None else x + residual
            qkv = layer.qkv(_unit(residual, n_eps))
            if layer.q_norm is not None:  # per-head norms first: q and k rotate apart
                q = F.rms_norm(qkv[:, :q_size].reshape(t, heads, d), (d,), *layer.q_norm)
                k = F.rms_norm(qkv[:, q_size:qk_size].reshape(t, kv_heads, d), (d,), *layer.k_norm)
                q = q * cos + q.roll(half, -1) * signed_sin
                k = k * cos + k.roll(half, -1) * signed_sin
            else:
                qk = qkv[:, :qk_size].view(t, heads + kv_heads, d)
                qk = qk * cos + qk.roll(half, -1) * signed_sin
                q, k = qk[:, :heads], qk[:, heads:]
            layer.k_cache.index_copy_(0, slots, k)
            layer.v_cache.index_copy_(0, slots, qkv[:, qk_size:].view(t, kv_heads, d))
            kv = layer.kv_cache.index_select(1, key_slots).view(2, b, -1, kv_heads, d).transpose(2, 3)
            out = F.scaled_dot_product_attention(q.reshape(b, n, heads, d).transpose(1, 2), kv[0], kv[1],
                                                 attn_mask=mask, scale=self.scale, enable_gqa=True)
            residual = layer.o_proj(out.transpose(1, 2).reshape(t, q_size)) + residual
            gate, up = layer.gate_up(_unit(residual, n_eps)).chunk(2, dim=-1)
            x = layer.down_proj(F.silu(gate).mul_(up))
        h = _unit(x + residual, n_eps)
        if n > 1:
            h = h.view(b, n, -1)[:, -1]
        return self.lm_head(h)

    def _inputs(self, batch: Sequence[ScheduledRequest], n: int):
        """(token ids [T], positions [T], new slots [T], key slots [B * L], mask [B, 1, n, L] or
        None): request b sees its keys from ``lo_b`` (0, or the window's start) to its last new
        token, padded to the longest with its last slot (masked)."""
        bs = self.block_size
        tokens = np.fromiter((tok for r in batch for tok in r.token_ids), dtype=np.int64, count=len(batch) * n)
        starts = np.fromiter((r.start_position for r in batch), dtype=np.int64, count=len(batch))
        q_pos = starts[:, None] + np.arange(n)  # [B, n]
        seq_lens = starts + n
        lo = np.zeros_like(starts) if self.sliding_window is None else np.maximum(0, starts - self.sliding_window + 1)
        key_pos = lo[:, None] + np.arange(int((seq_lens - lo).max()))  # [B, L]
        read_pos = np.minimum(key_pos, seq_lens[:, None] - 1)
        slots = np.empty_like(q_pos)
        key_slots = np.empty_like(read_pos)
        for i, r in enumerate(batch):
            table = np.asarray(r.block_table[: -(-int(seq_lens[i]) // bs)], dtype=np.int64)
            slots[i] = table[q_pos[i] // bs] * bs + q_pos[i] % bs
            key_slots[i] = table[read_pos[i] // bs] * bs + read_pos[i] % bs
        allowed = key_pos[:, None, :] <= q_pos[:, :, None]
        if self.sliding_window is not None:
            allowed &= key_pos[:, None, :] > q_pos[:, :, None] - self.sliding_window
        mask = None if allowed.all() else torch.from_numpy(allowed[:, None])
        return (torch.from_numpy(tokens), torch.from_numpy(q_pos.reshape(-1)), torch.from_numpy(slots.reshape(-1)),
                torch.from_numpy(key_slots.reshape(-1)), mask)


def _unit(x: torch.Tensor, n_eps: float) -> torch.Tensor:
    """``x / sqrt(|x|^2 + n * eps)`` per row of n features: RMSNorm ``x / sqrt(mean(x^2) + eps)``
    but for sqrt(n) and its weight, which the next linear holds."""
    return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(n_eps).rsqrt_()


Linear = Callable[[torch.Tensor], torch.Tensor]


class _Layer:
    """One decoder layer's weights and cache views, looked up once."""

    def __init__(self, layer: nn.Module, block_size: int) -> None:
        attn = layer.self_attn
        self.qkv = _folded_linear(attn.qkv_proj, layer.input_layernorm)
        self.o_proj = _folded_linear(attn.o_proj)
        self.gate_up = _folded_linear(layer.mlp.gate_up_proj, layer.post_attention_layernorm)
        self.down_proj = _folded_linear(layer.mlp.down_proj)
        self.q_norm = (attn.q_norm.weight, attn.q_norm.eps) if attn.qk_norm else None
        self.k_norm = (attn.k_norm.weight, attn.k_norm.eps) if attn.qk_norm else None
        k_cache, v_cache = attn.kv_cache
        self.k_cache = k_cache.view(-1, *k_cache.shape[2:])  # [slots, kv heads, head dim]
        self.v_cache = v_cache.view(-1, *v_cache.shape[2:])
        self.kv_cache = _pair_view(self.k_cache, self.v_cache)


def _pair_view(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[2, slots, ...]`` over both caches without a copy (V lies at a fixed offset from K in the
    one allocation allocate_kv_cache makes), so that one index_select gathers keys and values."""
    gap, size = v.data_ptr() - k.data_ptr(), k.element_size()
    assert k.is_contiguous() and v.is_contiguous() and k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert gap > 0 and gap % size == 0, "the draft's V cache must follow its K cache in one allocation"
    return k.as_strided((2, *k.shape), (gap // size, *k.stride()))


def _folded_linear(linear: nn.Module, norm: nn.Module | None = None) -> Linear:
    """``x -> linear(norm(x))`` for unit rows ``x`` (``linear(x)`` without a norm): the norm's
    weight and sqrt(in_features) folded into a copy of the linear's weight, packed for fbgemm's
    fp16 GEMM where it runs (fp32 ``F.linear`` elsewhere)."""
    weight = _dense_weight(linear).float()
    if norm is not None:
        weight = weight * (norm.weight.float() * linear.in_features**0.5)
    bias = None if linear.bias is None else linear.bias.float()
    if cpu_linear.fp16_available():
        packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)
    return lambda x: F.linear(x, weight, bias)


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    """``[out_features, in_features]``: the layer's CPU weight, or the copy its packed form holds,
    or (AWQ, nothing cached) its dequantized weight."""
    weight = linear.quant_method.cpu_weight(linear)
    if weight is not None:
        return weight
    packed = linear.packed_weight
    if packed is not None and not isinstance(packed, torch.Tensor):  # fbgemm's fp16 params
        return torch.ops.quantized.linear_unpack_fp16(packed)[0]
    return dequantize(linear.qweight, linear.qzeros, linear.scales).t()
