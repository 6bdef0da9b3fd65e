"""The attention backend interface and the registry that picks one by name."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from engine.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from engine.kernels.decode_attention import DecodeSplits

# name -> "module:Class"; imported on first use so that optional packages load only when chosen.
_BACKENDS: dict[str, str] = {
    "torch": "engine.attention.torch_backend:TorchAttentionBackend",
    "triton": "engine.attention.triton_backend:TritonAttentionBackend",
    "flash_attn": "engine.attention.flash_attn_backend:FlashAttentionBackend",
}
# Tried in this order when no backend is named.
_PREFERENCE = ("flash_attn", "triton", "torch")


class AttentionBackend(ABC):
    """Paged causal attention over a flattened batch.

    ``forward`` must, for one layer and one step:

    1. write the new tokens' ``k``, ``v`` into ``kv_cache`` at ``metadata.slot_mapping``;
    2. return, for each new token of request ``i`` at position ``p``, softmax attention of its
       query over that request's keys at positions ``<= p`` (and ``> p - sliding_window`` when a
       window is given), read from the cache through ``metadata.block_tables[i]``.

    Shapes: ``q [T, H, D]``, ``k`` and ``v [T, Hkv, D]`` with ``H`` a multiple of ``Hkv``
    (query head ``h`` reads kv head ``h // (H // Hkv)``); each cache ``[num_blocks, block_size,
    Hkv, D]``; the result ``[T, H, D]`` in q's dtype. Block-table entries of blocks wholly
    outside the window may be 0 (freed) and must not be read.

    A backend with ``accepts_cached_kv`` reads the new tokens' keys and values from the cache
    only; the model may then write them itself (fused with rotary) and pass ``k = v = None``.

    ``leave_splits``: a backend whose decode step splits the keys (engine/kernels/decode_attention.py)
    may return the splits' partials (``DecodeSplits``) instead of the output, for the caller to
    combine (``combine()``) or to hand to a kernel that combines them as it loads its input.

    Constructors take no arguments and must not touch the device: the registry instantiates a
    backend before asking ``is_available``.
    """

    name: ClassVar[str]
    # Whether a decode step can be captured in a CUDA graph: no host syncs, and one captured
    # launch stays right when lengths and block tables change between replays.
    graph_safe: ClassVar[bool] = False
    accepts_cached_kv: ClassVar[bool] = False

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        """Whether this backend can run on ``device`` (hardware and packages present)."""
        return True

    @abstractmethod
    def forward(
        self,
        layer: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        leave_splits: bool = False,
    ) -> torch.Tensor | DecodeSplits: ...


def attention_backend_names() -> list[str]:
    return list(_BACKENDS)


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(_BACKENDS)}")
    module_name, _, class_name = _BACKENDS[name].partition(":")
    backend_cls: type[AttentionBackend] = getattr(importlib.import_module(module_name), class_name)
    return backend_cls()


def select_attention_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """The named backend, or else the first of ``_PREFERENCE`` that can run on ``device``."""
    if name is not None:
        backend = get_attention_backend(name)
        if not backend.is_available(device):
            raise ValueError(f"attention backend {name!r} cannot run on {device}")
        return backend
    for candidate in _PREFERENCE:
        if candidate in _BACKENDS:
            try:
                backend = get_attention_backend(candidate)
            except ImportError:
                continue
            if backend.is_available(device):
                return backend
    raise ValueError(f"no attention backend can run on {device}")
