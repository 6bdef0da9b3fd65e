"""Rotary position embedding, neox style (rotate_half), with "linear" and "llama3" frequency scaling.

Frequencies are computed in float32 with the same operations, in the same order, as the
reference Hugging Face implementation, so float32 results match it to rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def compute_inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """``[head_dim // 2]`` float32 inverse frequencies."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_scaling is None:
        return inv_freq
    rope_type = rope_scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates q ``[T, H, D]`` and k ``[T, Hkv, D]`` by their tokens' positions ``[T]``.

    cos/sin are cached per position for ``max_position`` positions (float32, half width).
    """

    def __init__(
        self, head_dim: int, max_position: int, theta: float, rope_scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        inv_freq = compute_inv_freq(head_dim, theta, rope_scaling)
        freqs = torch.arange(max_position, dtype=torch.int64).float()[:, None] * inv_freq.to(torch.float32)
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)
        self._cached_positions: torch.Tensor | None = None
        self._cached = (self.cos_cache[:0], self.sin_cache[:0])

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated ``(q, k)``. On CUDA one Triton kernel rotates them in place and returns them."""
        if q.is_cuda:
            from engine.kernels.rotary import rotary_embedding

            rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
            return q, k
        cos, signed_sin = self._cos_sin(positions, q.dtype)
        # rotate_half(x) * sin == roll(x, D / 2) * signed_sin, bit for bit, in one op fewer than three.
        half = q.shape[-1] // 2
        return q * cos + q.roll(half, -1) * signed_sin, k * cos + k.roll(half, -1) * signed_sin

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``cat(-sin, sin)`` at ``positions``, ``[T, 1, D]``: made by a forward's first
        layer, kept for the others (they share this module and the positions tensor)."""
        if self._cached_positions is not positions or self._cached[0].dtype != dtype:
            cos, sin = self.cos_cache[positions], self.sin_cache[positions]
            self._cached = (torch.cat((cos, cos), dim=-1).to(dtype)[:, None, :],
                            torch.cat((-sin, sin), dim=-1).to(dtype)[:, None, :])
            self._cached_positions = positions
        return self._cached
