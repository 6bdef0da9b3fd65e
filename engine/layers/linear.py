"""Linear layers whose weights and matmul come from a pluggable quantization method.

A ``LinearMethod`` owns how a layer stores its weights (dense, AWQ-packed, ...) and how it
computes ``y = x W^T + b``. Layers only know their shapes and how checkpoint tensors land in
their parameters: every parameter carries a ``weight_loader(param, loaded, shard_id=None)``.

A fused layer (q|k|v, gate|up) stacks several checkpoint projections along the output
features. Each parameter that is split along output features says on which axis
(``output_dim``) and how many output features one stored element packs (``packed_factor``,
e.g. 8 for 4-bit values in int32), so shards land in the right slice whatever the format::

    qkv_proj.weight (dense, output_dim=0):     [ q rows | k rows | v rows ] x in_features
    qkv_proj.qweight (packed, output_dim=1):   in_features x [ q/8 | k/8 | v/8 ]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.activation import SiluAndMul
from engine.layers.cpu_linear import pack, packed_linear
from engine.layers.norm import RMSNorm
from engine.layers.partials import SplitKPartials

if TYPE_CHECKING:
    from engine.kernels.decode_attention import DecodeSplits

# One token through a 16-bit weight up to this size goes through our GEMV kernel
# (engine/kernels/gemv.py): on an H200 it streamed every decoder linear of Qwen3-0.6B and
# Llama-3.1-8B faster than cuBLAS (e.g. 0.6B o_proj 3.5 vs 12.6 us; 8B gate_up 60.7 vs 63.9 us,
# bench/results/gemv_h200.json). Larger ones are LM heads, which cuBLAS streams at full bandwidth.
GEMV_MAX_WEIGHT_BYTES = 256 << 20

# quant_method name (as in a checkpoint's quantization_config) -> factory(config, prefix).
QuantMethodFactory = Callable[[dict[str, Any], str], "LinearMethod"]
_QUANT_METHODS: dict[str, QuantMethodFactory] = {}


class LinearMethod(ABC):
    """How a linear layer stores its weights and applies them.

    - ``create_weights`` registers the layer's parameters (uninitialised; the loader fills
      them), on the current default device and dtype. Parameters split along output features
      get ``output_dim`` and ``packed_factor`` with ``set_weight_attrs``.
    - ``apply`` returns ``x @ W^T + b`` for ``x [..., in_features]`` in the model dtype.
    - ``process_weights_after_loading`` runs once after every checkpoint tensor is in (repack,
      transpose, ...).
    """

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None: ...

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        return None

    def apply_gated(self, layer: nn.Module, gate_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
                    ) -> torch.Tensor:
        """``apply(layer, act(gate_up))``; a method may fuse the activation into its matmul."""
        return self.apply(layer, act(gate_up))

    def apply_partials(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | SplitKPartials:
        """``apply``, or where the method can, its output left as split-K partial sums for the
        kernel after it to add up (engine/layers/partials.py)."""
        return self.apply(layer, x)

    def apply_decode_splits(self, layer: nn.Module, splits: DecodeSplits) -> torch.Tensor | None:
        """``apply`` of decode attention's output ``[T, H * D]`` given as its splits' partials, where
        the method combines them as its matmul loads its input; else None (combined first)."""
        return None

    def apply_normed(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                     partials: bool = False) -> tuple[torch.Tensor | SplitKPartials, torch.Tensor]:
        """``LinearBase.forward_normed`` on the device; a method may fuse the norm into its matmul."""
        apply = self.apply_partials if partials else self.apply
        return normed_then(lambda h: apply(layer, h), x, residual, norm)

    def cpu_weight(self, layer: nn.Module) -> torch.Tensor | None:
        """The dense ``[out_features, in_features]`` weight on the CPU, if the layer holds one."""
        return None

    def release_cpu_weight(self, layer: nn.Module) -> None:
        """Drop what ``cpu_weight`` returned, if it is a copy nothing else needs."""
        return None


class DenseLinearMethod(LinearMethod):
    """Unquantized weights ``[out_features, in_features]`` in the model dtype."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        set_weight_attrs(weight, output_dim=0)
        layer.register_parameter("weight", weight)
        register_bias(layer, out_features, bias)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if _gemv_applies(x, layer.weight):
            return _gemv(layer, x)
        return F.linear(x, layer.weight, layer.bias)

    def apply_gated(self, layer: nn.Module, gate_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
                    ) -> torch.Tensor:
        # One token: SiLU-and-mul inside the GEMV's loads (the Llama family's only gated activation).
        if _gemv_applies(gate_up, layer.weight) and isinstance(act, SiluAndMul):
            return _gemv(layer, gate_up, silu_mul=True)
        return self.apply(layer, act(gate_up))

    def apply_normed(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                     partials: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        # One token through a one-slab GEMV: the residual add and the norm inside its loads.
        from engine.kernels.gemv import gemv_rms_norm, slab_fits

        if not (_gemv_applies(x, layer.weight) and slab_fits(*layer.weight.shape) and x.stride(1) == 1):
            return super().apply_normed(layer, x, residual, norm)
        out, residual = gemv_rms_norm(x, residual, norm.weight, norm.eps, layer.weight)
        return (out if layer.bias is None else out + layer.bias), residual

    def cpu_weight(self, layer: nn.Module) -> torch.Tensor | None:
        return None if layer.weight.is_cuda else layer.weight


def _gemv_takes(weight: torch.Tensor) -> bool:
    return weight.numel() * weight.element_size() <= GEMV_MAX_WEIGHT_BYTES


def _gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and _gemv_takes(weight))


def one_token_weights_ahead(model: nn.Module) -> bool:
    """Whether every linear of ``model`` that a one-token step runs through the GEMV requests
    its whole weight before its PDL wait (engine/kernels/gemv.py's slab), and every other is too
    large for the GEMV (cuBLAS, waited for in full): the condition under which that step's
    kernels may be placed ahead (engine/kernels/pdl.py's ``trigger_before_wait``)."""
    from engine.kernels.gemv import slab_fits

    for layer in model.modules():
        if not isinstance(layer, LinearBase):
            continue
        weight = getattr(layer, "weight", None)
        if not isinstance(layer.quant_method, DenseLinearMethod) or weight is None or \
                weight.dtype not in (torch.bfloat16, torch.float16):
            return False
        if _gemv_takes(weight) and not slab_fits(*weight.shape):
            return False
    return True


def normed_then(linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
                norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(norm(x + residual)), x + residual)``, or without a residual ``(linear(norm(x)), x)``."""
    if residual is None:
        return linear(norm(x)), x
    normed, residual = norm(x, residual)
    return linear(normed), residual


def _gemv(layer: nn.Module, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
    from engine.kernels.gemv import gemv

    out = gemv(x if x.stride(1) == 1 else x.contiguous(), layer.weight, silu_mul=silu_mul)
    return out if layer.bias is None else out + layer.bias


def register_bias(layer: nn.Module, out_features: int, bias: bool) -> None:
    """The layer's ``bias`` parameter (or None): unquantized in every linear method."""
    b = None
    if bias:
        b = nn.Parameter(torch.empty(out_features), requires_grad=False)
        set_weight_attrs(b, output_dim=0)
    layer.register_parameter("bias", b)


def register_quant_method(name: str) -> Callable[[QuantMethodFactory], QuantMethodFactory]:
    """Register a factory for checkpoints whose ``quantization_config.quant_method == name``."""

    def register(factory: QuantMethodFactory) -> QuantMethodFactory:
        _QUANT_METHODS[name] = factory
        return factory

    return register


def get_linear_method(quantization_config: dict[str, Any] | None, prefix: str) -> LinearMethod:
    """The method for the layer named ``prefix`` (a factory may keep some layers dense)."""
    if quantization_config is None:
        return DenseLinearMethod()
    name = quantization_config.get("quant_method")
    if name not in _QUANT_METHODS:
        supported = ", ".join(sorted(_QUANT_METHODS)) or "none"
        raise ValueError(f"unsupported quantization method {name!r}; supported: {supported}")
    return _QUANT_METHODS[name](quantization_config, prefix)


def set_weight_attrs(param: nn.Parameter, **attrs: Any) -> None:
    for key, value in attrs.items():
        setattr(param, key, value)


class LinearBase(nn.Module):
    """A linear layer loaded from one checkpoint tensor per parameter."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        quantization_config: dict[str, Any] | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.quant_method = get_linear_method(quantization_config, prefix)
        self.quant_method.create_weights(self, in_features, out_features, bias)
        for param in self.parameters(recurse=False):
            set_weight_attrs(param, weight_loader=self.weight_loader)
        self.packed_weight: torch.Tensor | None = None  # oneDNN's copy of the weight (CPU, fp32)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert shard_id is None, f"{type(self).__name__} has no shards, got {shard_id!r}"
        if param.shape != loaded.shape:
            raise ValueError(
                f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}"
            )
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None and x.dtype == torch.float32 and not x.is_cuda:
            return packed_linear(x, self.packed_weight, self.bias, self.out_features)
        return self.quant_method.apply(self, x)

    def forward_decode_splits(self, splits: DecodeSplits) -> torch.Tensor:
        """``forward`` of decode attention's output ``[T, H * D]`` left as its splits' partials
        (``AttentionBackend.forward(..., leave_splits=True)``)."""
        out = self.quant_method.apply_decode_splits(self, splits)
        if out is None:
            x = splits.combine()
            out = self.forward(x.reshape(x.shape[0], -1))
        return out

    def forward_gated(self, gate_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``forward(act(gate_up))``, with the activation fused into the matmul where the method can."""
        if not gate_up.is_cuda:
            return self.forward(act(gate_up))
        return self.quant_method.apply_gated(self, gate_up, act)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, partials: bool = False
                       ) -> tuple[torch.Tensor | SplitKPartials, torch.Tensor]:
        """``(forward(norm(x + residual)), x + residual)`` (without a residual, ``x`` is the
        input to normalize and comes back as the residual), with the add and the norm fused into
        the matmul where the method can: a decoder block's first linear and the norm before it.
        ``partials``: the first may come back as ``SplitKPartials``, for a caller whose next
        kernel adds them up (``LinearMethod.apply_partials``)."""
        if not x.is_cuda:
            return normed_then(self.forward, x, residual, norm)
        return self.quant_method.apply_normed(self, x, residual, norm, partials)

    def pack_for_cpu(self) -> None:
        """Run this layer through oneDNN with a packed fp32 weight (engine/layers/cpu_linear.py)."""
        weight = self.quant_method.cpu_weight(self)
        if weight is not None and weight.dtype == torch.float32:
            self.packed_weight = pack(weight)
            self.quant_method.release_cpu_weight(self)


class FusedLinear(LinearBase):
    """Several projections of the same input stacked along output features, loaded shard by
    shard: ``output_sizes`` maps each shard id ("q"/"k"/"v", or 0/1 for gate/up) to its size,
    in stacking order."""

    def __init__(
        self,
        in_features: int,
        output_sizes: dict[Any, int],
        bias: bool = False,
        quantization_config: dict[str, Any] | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(in_features, sum(output_sizes.values()), bias, quantization_config, prefix)
        self.output_sizes = dict(output_sizes)
        self.shard_offsets: dict[Any, int] = {}
        offset = 0
        for shard_id, size in self.output_sizes.items():
            self.shard_offsets[shard_id] = offset
            offset += size
        for param in self.parameters(recurse=False):
            set_weight_attrs(param, shard_ids=tuple(self.output_sizes))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id not in self.output_sizes:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self.output_sizes)}")
        dim = getattr(param, "output_dim", None)
        if dim is None:  # not split by output features: every shard carries the same tensor
            super().weight_loader(param, loaded)
            return
        packed = getattr(param, "packed_factor", 1)
        size = self.output_sizes[shard_id] // packed
        target = param.data.narrow(dim, self.shard_offsets[shard_id] // packed, size)
        if target.shape != loaded.shape:
            raise ValueError(
                f"shape mismatch in shard {shard_id!r}: expected {tuple(target.shape)}, "
                f"checkpoint {tuple(loaded.shape)}"
            )
        target.copy_(loaded)
