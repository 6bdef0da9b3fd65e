"""fp32 linears on x86 CPUs with each weight packed once at load time.

A decode step of a small model on a CPU streams every weight once per token, so bytes decide::

    weight fp16-storable (see fp16_storable)  ->  fp16: sluice's own kernel (cpu_gemm.cpp, fp32
                                                 inputs and sums), else fbgemm's fp16 GEMM
    otherwise                                 ->  fp32, oneDNN's blocked layout

fp16-storable covers AWQ layers (their dequantized weights are fp16 values) and bf16 checkpoints
loaded as fp32. Measured on this repository's 2-core AVX2 CPU, one thread, fbgemm against
``F.linear`` (MKL): the bundled AWQ target's decode step 15.7 -> 10.1 ms, its 5-token verify step
21.4 -> 13.5 ms, a forward of its draft 6.5 -> 4.8 ms. sluice's kernel against fbgemm, two
threads, in the engine (bench/profile_cpu_linears.py, docs/benchmarks.md): the decode step the
same, the 5-token verify step 0.7-1.1 ms faster (fbgemm's cost rises with the row count where the
weight stream should hide it); alone, 96-480 rows 5-10% slower. The oneDNN kernel against ``F.linear``, per
call: 1.5-4x faster at 2-16 rows (a verify step's 1 + k tokens, a batch of decodes), e.g.
512 -> 3072 at 5 rows 184 vs 536 us, and for vocab-sized outputs at any row count (512 -> 8192
at one row 0.73 vs 2.1 ms); at one row a few small layers are slower (1536 -> 512: 96 vs 73 us).

sluice's kernel and oneDNN's are batch-invariant: a row's result is the same bits whatever the
number of rows (MKL's one-row path rounds differently from its many-row one, and so does fbgemm).
None is bitwise equal to ``F.linear``; the engine's tests compare tokens with ``transformers``,
which these kernels keep.
"""

from __future__ import annotations

import torch

from engine.layers import cpu_native

# The row count the oneDNN layout is tuned for (it serves any): a verify step's 1 + 4 tokens.
_PACK_ROWS = 5
# Below fp16's smallest normal number a value keeps fewer bits: rounded there, it moves by at most
# 2**-25, far under the rounding of any dot product that has a weight of normal size in it.
_FP16_MIN_NORMAL = 2.0**-14
_FP16_MAX = 65504.0

# fp16 [out, in] for sluice's kernel, oneDNN's fp32 tensor, or fbgemm's fp16 params
PackedWeight = torch.Tensor | torch.ScriptObject


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def fp16_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16")


def fp16_storable(weight: torch.Tensor) -> bool:
    """Whether fp16 holds ``weight`` as it is: every value of fp16's normal range exactly (the
    smaller ones move by at most 2**-25), none beyond its range."""
    if weight.numel() == 0 or bool(weight.abs().max() > _FP16_MAX):
        return False
    normal = weight.abs() >= _FP16_MIN_NORMAL
    return torch.equal(weight[normal].half().float(), weight[normal].float())


def pack(weight: torch.Tensor) -> PackedWeight:
    """``weight [out_features, in_features]`` (fp32, CPU) in the layout ``packed_linear`` runs:
    when ``fp16_storable``, fp16 for sluice's kernel (or fbgemm's where that cannot be built),
    else oneDNN's blocked fp32."""
    weight = weight.detach().contiguous()
    if fp16_storable(weight):
        if cpu_native.available():
            return weight.half()
        if fp16_available():
            return torch.ops.quantized.linear_prepack_fp16(weight, None)
    return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, out_features: int
                  ) -> torch.Tensor:
    """``x @ W^T + b`` for ``x [..., in_features]`` with ``packed`` from ``pack(W)``."""
    flat = x.dim() == 2  # the model's [tokens, features]: no reshapes (a decode step counts its small ops)
    rows = x if flat else x.reshape(-1, x.shape[-1])
    if isinstance(packed, torch.Tensor) and packed.dtype == torch.float16:
        out = cpu_native.gemm_f16_weight(rows, packed)
        if bias is not None:
            out += bias
    elif isinstance(packed, torch.Tensor):
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    else:
        out = torch.ops.quantized.linear_dynamic_fp16(rows, packed)
        if bias is not None:
            out += bias
    return out if flat else out.reshape(*x.shape[:-1], out_features)
