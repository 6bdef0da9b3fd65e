"""AWQ 4-bit weights in the AutoAWQ "GEMM" checkpoint format: the config block, packing,
round-to-nearest quantization and dequantization.

Per linear with K inputs, N outputs and group size G (w is stored transposed, [K, N])::

    qweight  int32 [K, N/8]    eight 4-bit q per word, packed along the output dim
    qzeros   int32 [K/G, N/8]  the 4-bit zero point z per (group, output), packed the same way
    scales   fp16  [K/G, N]    s per (group, output)
    w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]

Within a word, nibble i (bits 4i..4i+3) holds output column 8j + AWQ_PACK_ORDER[i].
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.layers.linear import (
    DenseLinearMethod,
    LinearMethod,
    register_bias,
    register_quant_method,
    set_weight_attrs,
)
from engine.layers.partials import SplitKPartials

if TYPE_CHECKING:
    from engine.kernels.decode_attention import DecodeSplits

logger = logging.getLogger(__name__)

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK_FACTOR = 8  # 4-bit values per int32
MAX_Q = 15
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)


@dataclass(frozen=True)
class AWQConfig:
    """The ``quantization_config`` block of an AWQ checkpoint. ``group_size == -1`` means one
    group over all of K. ``modules_to_not_convert`` holds substrings of module names whose
    linears stay dense."""

    group_size: int = 128
    bits: int = 4
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"AWQ: only 4-bit weights are supported, got bits={self.bits}")
        if not self.zero_point:
            raise ValueError("AWQ: only zero_point=true checkpoints are supported")
        if self.version != "gemm":
            raise ValueError(f"AWQ: only the 'gemm' format is supported, got version={self.version!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"AWQ: group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> AWQConfig:
        """Parse a checkpoint's ``quantization_config``, accepting AutoAWQ's legacy key names
        (``w_bit``, ``q_group_size``)."""
        method = str(cfg.get("quant_method", "awq")).lower()
        if method != "awq":
            raise ValueError(f"not an AWQ quantization_config (quant_method={method!r})")
        bits = cfg.get("bits", cfg.get("w_bit", 4))
        group_size = cfg.get("group_size", cfg.get("q_group_size", 128))
        return cls(
            group_size=int(group_size),
            bits=int(bits),
            zero_point=bool(cfg.get("zero_point", True)),
            version=str(cfg.get("version", "gemm")).lower(),
            modules_to_not_convert=tuple(cfg.get("modules_to_not_convert") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        """The block as AutoAWQ and Hugging Face write it into config.json."""
        return {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "version": self.version,
            "modules_to_not_convert": list(self.modules_to_not_convert) or None,
        }

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def is_quantized(self, module_name: str) -> bool:
        return not any(skip in module_name for skip in self.modules_to_not_convert)


def nibble_shifts(device: torch.device | str = "cpu") -> torch.Tensor:
    """Bit shift of output column ``8j + c`` inside its packed word, indexed by ``c``."""
    return torch.tensor([4 * AWQ_PACK_ORDER.index(c) for c in range(PACK_FACTOR)], device=device)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[R, N] integers in [0, 15] -> int32 [R, N/8] in the AWQ column order."""
    rows, cols = values.shape
    if cols % PACK_FACTOR:
        raise ValueError(f"cannot pack {cols} columns: not a multiple of {PACK_FACTOR}")
    v = values.to(torch.int64).view(rows, cols // PACK_FACTOR, PACK_FACTOR)
    assert int(v.min()) >= 0 and int(v.max()) <= MAX_Q, "values out of the 4-bit range"
    packed = (v << nibble_shifts(values.device)).sum(dim=-1)
    # Words with the top nibble >= 8 are negative as int32.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> uint8 [R, N], the inverse of ``pack_int4``."""
    rows, words = packed.shape
    nibbles = (packed[:, :, None] >> nibble_shifts(packed.device).to(torch.int32)) & MAX_Q
    return nibbles.view(rows, words * PACK_FACTOR).to(torch.uint8)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The dense [K, N] weight, ``(q - z) * s``, rounded once to ``scales.dtype``."""
    group_size = qweight.shape[0] // scales.shape[0]
    q = unpack_int4(qweight).to(torch.int16)
    z = unpack_int4(qzeros).to(torch.int16).repeat_interleave(group_size, dim=0)
    return (q - z).to(scales.dtype) * scales.repeat_interleave(group_size, dim=0)


def quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max round-to-nearest of a weight [N, K] per (output, group of G inputs;
    -1: all of K): ``q`` [N, K/G, G] in [0, 15], ``scales`` and ``zeros`` [N, K/G], in ``w.dtype``."""
    out_features, in_features = w.shape
    group_size = in_features if group_size == -1 else group_size
    g = w.reshape(out_features, in_features // group_size, group_size)
    max_val, min_val = g.amax(dim=-1), g.amin(dim=-1)
    scales = (max_val - min_val).clamp(min=1e-5) / MAX_Q
    zeros = (-torch.round(min_val / scales)).clamp(0, MAX_Q)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, MAX_Q)
    return q, scales, zeros


def fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round-to-nearest 4-bit quantize-dequantize of a weight [N, K], in ``w.dtype``."""
    q, scales, zeros = quantize_groups(w, group_size)
    return ((q - zeros[..., None]) * scales[..., None]).reshape(w.shape)


def quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of a weight [N, K] (as ``nn.Linear`` stores it) into
    AWQ ``(qweight, qzeros, scales)``; q and z come from float32 scales, stored as fp16."""
    q, scales, zeros = quantize_groups(w.detach().float(), group_size)
    return pack_int4(q.reshape(w.shape).t()), pack_int4(zeros.t()), scales.t().contiguous().half()


# A fused layer of ours -> the checkpoint projections it stacks (for modules_to_not_convert).
_FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@register_quant_method("awq")
def awq_linear_method(quantization_config: dict[str, Any], prefix: str) -> LinearMethod:
    """AWQ for the layer ``prefix`` unless ``modules_to_not_convert`` keeps it dense."""
    config = AWQConfig.from_dict(quantization_config)
    parent, _, leaf = prefix.rpartition(".")
    names = [f"{parent}.{shard}" for shard in _FUSED_SHARDS.get(leaf, ())] or [prefix]
    quantized = {config.is_quantized(name) for name in names}
    if len(quantized) > 1:
        raise ValueError(f"AWQ: {prefix} fuses quantized and unquantized projections {names}")
    return AWQLinearMethod(config) if quantized.pop() else DenseLinearMethod()


class AWQLinearMethod(LinearMethod):
    """Holds ``qweight``/``qzeros``/``scales`` as the checkpoint stores them (fused layers
    concatenate shards along dim 1). On CUDA it runs the Triton kernels; elsewhere it
    dequantizes, caching the dense weight when free memory allows."""

    def __init__(self, config: AWQConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        group_size = self.config.group_size_for(in_features)
        if in_features % group_size:
            raise ValueError(f"AWQ: in_features {in_features} is not a multiple of group_size {group_size}")
        if out_features % PACK_FACTOR:
            raise ValueError(f"AWQ: out_features {out_features} is not a multiple of {PACK_FACTOR}")
        groups, words = in_features // group_size, out_features // PACK_FACTOR
        params = {
            "qweight": torch.empty(in_features, words, dtype=torch.int32),
            "qzeros": torch.empty(groups, words, dtype=torch.int32),
            "scales": torch.empty(groups, out_features, dtype=torch.float16),
        }
        for name, data in params.items():
            param = nn.Parameter(data, requires_grad=False)
            set_weight_attrs(param, output_dim=1, packed_factor=1 if name == "scales" else PACK_FACTOR)
            layer.register_parameter(name, param)
        register_bias(layer, out_features, bias)
        layer.register_buffer("dense_weight", None, persistent=False)
        layer.awq_dtype = torch.get_default_dtype()  # the model dtype while layers are built

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.qweight.is_cuda:
            return
        nbytes = layer.qweight.shape[0] * layer.scales.shape[1] * layer.awq_dtype.itemsize
        if _cpu_memory_allows(nbytes):
            layer.dense_weight = dequantize(layer.qweight, layer.qzeros, layer.scales).to(layer.awq_dtype)

    def cpu_weight(self, layer: nn.Module) -> torch.Tensor | None:
        return None if layer.dense_weight is None else layer.dense_weight.t()

    def release_cpu_weight(self, layer: nn.Module) -> None:
        layer.dense_weight = None  # the packed copy replaces it

    def apply_partials(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | SplitKPartials:
        # 1-16 tokens through awq_mma without a bias: its split-K partials, its sum left to the
        # kernel after it.
        if x.is_cuda and layer.bias is None:
            from engine.kernels.awq_gemm import awq_linear_partials

            partials = awq_linear_partials(x, layer.qweight, layer.qzeros, layer.scales)
            if partials is not None:
                return SplitKPartials(partials, x.dtype)
        return self.apply(layer, x)

    def apply_decode_splits(self, layer: nn.Module, splits: DecodeSplits) -> torch.Tensor | None:
        # One request's token through awq_mma without a bias: its programs combine the splits of
        # the heads their K rows cover as they load their activations (one kernel fewer a layer).
        if layer.bias is not None:
            return None
        from engine.kernels.awq_gemm import awq_linear_decode_splits

        return awq_linear_decode_splits(splits, layer.qweight, layer.qzeros, layer.scales)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from engine.kernels.awq_gemm import awq_linear

            return awq_linear(x, layer.qweight, layer.qzeros, layer.scales, layer.bias)
        w = layer.dense_weight
        if w is None:
            w = dequantize(layer.qweight, layer.qzeros, layer.scales)
        out = torch.matmul(x, w.to(x.dtype))
        return out if layer.bias is None else out + layer.bias


@dataclass(slots=True)
class _CpuCacheLog:
    cached: bool = False
    refused: bool = False


_cpu_cache_log = _CpuCacheLog()
# Caching stops while less than this share of host memory would stay free.
_CPU_FREE_RESERVE = 0.25


def _cpu_memory_allows(nbytes: int) -> bool:
    """Whether ``nbytes`` more of dequantized weights fit while a quarter of host memory stays
    free; says so once each way."""
    total, available = _host_memory()
    allowed = available - nbytes >= _CPU_FREE_RESERVE * total
    if allowed and not _cpu_cache_log.cached:
        _cpu_cache_log.cached = True
        logger.info("AWQ on CPU: caching dequantized weights (%.1f GiB free)", available / 2**30)
    elif not allowed and not _cpu_cache_log.refused:
        _cpu_cache_log.refused = True
        logger.warning("AWQ on CPU: too little free memory to cache dequantized weights (%.1f GiB free); "
                       "dequantizing on every call for the remaining layers", available / 2**30)
    return allowed


def _host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return total, int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, os.sysconf("SC_AVPHYS_PAGES") * page
