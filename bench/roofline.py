"""Roofline figures for the benchmark workloads on the H200 (../shared/gpu/README.md: 4.1 TB/s
device memory copy, 744 TFLOP/s bf16 matmul), from the model shape and the seeded workload.

    python -m bench.roofline

- Single stream (batch 1 decode): every weight is read once per token, so tok/s <= bandwidth /
  weight bytes (the input embedding is a gather of one row; a tied lm_head is read in full).
- Offline throughput: decode reads each running request's KV once per step and the weights once
  per step (at least max output length steps), prefill is bound by its matmul FLOPs; the bound
  is output tokens / (KV bytes + steps x weight bytes) / bandwidth + prefill FLOPs / peak).
"""

from __future__ import annotations

import random

from bench.common import SHAPES

BANDWIDTH = 4.1e12  # bytes/s
PEAK_FLOPS = 744e12  # bf16 dense


def shape_bytes(name: str, weight_bits: int = 16) -> tuple[float, float, int]:
    """(weight bytes read per decode step, parameters in matmuls, KV bytes per token)."""
    c = SHAPES[name][1]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim", h // heads)
    per_layer = h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h + 3 * h * inter
    lm_head = c["vocab_size"] * h
    matmul_params = layers * per_layer + lm_head
    weight_bytes = layers * per_layer * weight_bits / 8 + lm_head * 2  # lm_head stays bf16
    kv_bytes = 2 * layers * kv_heads * head_dim * 2
    return weight_bytes, matmul_params, kv_bytes


def offline_workload(seed: int = 0, num: int = 256, lo: int = 100, hi: int = 1024) -> list[tuple[int, int]]:
    rng = random.Random(seed)  # the same draws as bench_offline
    return [(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(num)]


def offline_bound(name: str) -> float:
    weight_bytes, params, kv_bytes = shape_bytes(name)
    work = offline_workload()
    kv_read = sum(o * p + o * (o - 1) / 2 for p, o in work) * kv_bytes
    steps = max(o for _, o in work)
    prefill_flops = 2 * params * sum(p for p, _ in work)
    seconds = (kv_read + steps * weight_bytes) / BANDWIDTH + prefill_flops / PEAK_FLOPS
    return sum(o for _, o in work) / seconds


def main() -> None:
    for name in ("qwen3-0.6b", "llama-3.1-8b"):
        weight_bytes, _, _ = shape_bytes(name)
        print(f"{name}: single stream <= {BANDWIDTH / weight_bytes:,.0f} tok/s; "
              f"offline <= {offline_bound(name):,.0f} output tok/s")
    awq_bytes, _, _ = shape_bytes("llama-3.1-8b", weight_bits=4)
    print(f"llama-3.1-8b AWQ (4-bit + bf16 lm_head): single stream <= {BANDWIDTH / awq_bytes:,.0f} tok/s")


if __name__ == "__main__":
    main()
