"""Quantized weight formats. Importing this package registers their linear methods."""

from engine.quantization.awq import AWQConfig, AWQLinearMethod, dequantize, pack_int4, quantize, unpack_int4

__all__ = ["AWQConfig", "AWQLinearMethod", "dequantize", "pack_int4", "quantize", "unpack_int4"]
