"""awq_mma at one token (Llama-3.1-8B shapes, random weights), three ways. On the GPU machine, after
``source bench/gpu/setup.sh``:

    python bench/gpu/awq_mma_one_token.py stages   # each shape at 2, 3, 4 pipeline stages
    python bench/gpu/awq_mma_one_token.py splits   # split-K counts, with the partials' consumers
    ncu --clock-control none -k regex:_awq_mma --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SourceCounters -o $OUT/mma \\
        python bench/gpu/awq_mma_one_token.py 2 gate_up   # an ncu target: three calls, 2 stages, gate_up

Timings are us a call of 20 calls back to back in a CUDA graph, over 10 replays. Every call reads
the same weight, so shapes smaller than L2 (qkv, o, down) partly read it from L2: compare within a
shape, and end to end before keeping anything (bench/results/awq_mma_stages_ncu_s29.json).
"""

import sys

import torch

from bench.bench_awq_linear import SHAPES
from engine.kernels.activation import silu_and_mul, silu_and_mul_partials
from engine.kernels.awq_mma import MmaConfig, awq_mma, mma_config
from engine.kernels.rotary import rope_and_cache_partials
from engine.layers.rotary import RotaryEmbedding
from engine.quantization.awq import quantize

sms = torch.cuda.get_device_properties(0).multi_processor_count


def timed(fn, *args) -> float:
    for _ in range(3):
        fn(*args)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn(*args)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / 200


def weights(shape):
    k, n = SHAPES[shape]
    torch.manual_seed(0)
    qw, qz, s = quantize(torch.randn(n, k, device="cuda") * 0.02, 128)
    return torch.randn(1, k, device="cuda", dtype=torch.bfloat16), qw, qz, s, mma_config(1, n, k, sms)


def plain_silu(w):
    return silu_and_mul(awq_mma(*w[:4]))


def partials_silu(w, c):
    return silu_and_mul_partials(awq_mma(*w[:4], c, return_partials=True), torch.bfloat16)


def partials_rope(w, c, rope_args):
    return rope_and_cache_partials(rope_args[0], awq_mma(*w[:4], c, return_partials=True), torch.bfloat16, 32, 8,
                                   *rope_args[1:])


def stages() -> None:
    for shape in ("qkv", "o", "gate_up", "down"):
        w = weights(shape)
        cfg = w[4]
        row = [shape, str(cfg)]
        row += [f"{st}st {timed(awq_mma, *w[:4], MmaConfig(cfg.halves, cfg.split_k, st)):.2f}us" for st in (2, 3, 4)]
        print(" | ".join(row), flush=True)


def splits() -> None:
    w = weights("gate_up")
    print("gate_up default", w[4], f"plain (in-kernel sum + silu) {timed(plain_silu, w):.2f}", flush=True)
    for sk in (1, 2, 3, 4, 5, 6, 8):
        c = MmaConfig(1, sk)
        print(f"gate_up split {sk}: partials+silu {timed(partials_silu, w, c):.2f}", flush=True)

    w = weights("qkv")
    rot = RotaryEmbedding(128, 4096, 500000.0, None).to("cuda")
    kc = torch.zeros(64, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    rope_args = (torch.tensor([200], device="cuda"), rot.cos_cache, rot.sin_cache, kc, kc.clone(),
                 torch.tensor([37], device="cuda"))
    print("qkv default", w[4], flush=True)
    for sk in (4, 8, 11, 16, 22, 32):
        print(f"qkv split {sk}: partials+rope {timed(partials_rope, w, MmaConfig(1, sk), rope_args):.2f}", flush=True)
    for shape in ("o", "down"):
        w = weights(shape)
        row = [f"{shape} default {w[4].split_k}: {timed(awq_mma, *w[:4]):.2f}"]
        row += [f"{sk}: {timed(awq_mma, *w[:4], MmaConfig(1, sk)):.2f}" for sk in (8, 16, 24, 32)]
        print("  ".join(row), flush=True)


if sys.argv[1] == "stages":
    stages()
elif sys.argv[1] == "splits":
    splits()
else:  # an ncu target
    w = weights(sys.argv[2])
    config = MmaConfig(w[4].halves, w[4].split_k, int(sys.argv[1]))
    for _ in range(3):
        awq_mma(*w[:4], config)
    torch.cuda.synchronize()
