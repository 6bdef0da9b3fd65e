"""Triton kernels. On a machine without CUDA they run through Triton's interpreter
(``TRITON_INTERPRET=1``, set before the first import)."""

from engine.kernels.decode_attention import DecodeSplits, decode_attention, decode_num_splits
from engine.kernels.prefill_attention import prefill_attention
from engine.kernels.reshape_and_cache import reshape_and_cache

__all__ = ["DecodeSplits", "decode_attention", "decode_num_splits", "prefill_attention", "reshape_and_cache"]
