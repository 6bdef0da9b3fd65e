"""AWQ 4-bit linear vs bf16 ``F.linear`` on Llama-3.1-8B's projection shapes (needs a CUDA GPU).

    python bench/bench_awq_linear.py [--tokens 1 4 16 64 256 2048] [--sweep 1 16 64] [--out FILE]

For each shape and token count it times, replayed from CUDA graphs over enough weight copies
that weights stream from memory: bf16 ``F.linear``; ``awq_linear`` as the engine calls it; the
fused kernel and dequantize + matmul separately (their crossing is where ``FUSED_MAX_TOKENS``
comes from). It reports the int4 weight bytes streamed per second against a measured device
copy bandwidth. ``--sweep``
also times a grid of fused-kernel tilings at the token counts it names and records the best.
Results go to JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels.awq_gemm import (  # noqa: E402
    FUSED_MAX_TOKENS,
    GemmConfig,
    awq_dequantize,
    awq_gemm,
    awq_linear,
    gemm_config,
)
from engine.quantization.awq import quantize  # noqa: E402

# name -> (K in, N out) for Llama-3.1-8B (fused q|k|v and gate|up, as the engine runs them).
SHAPES = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
GROUP_SIZE = 128


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read and written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.numel() / (ms * 1e-3)


def sweep_configs(m: int) -> list[GemmConfig]:
    """Tilings worth trying for ``m`` tokens (none above the fused kernel's range)."""
    if m > FUSED_MAX_TOKENS:
        return []
    block_ms = [16] if m <= 16 else [16, 64] if m <= 64 else [64, 128]
    splits = (1, 2, 4, 8, 16) if m <= 64 else (1, 2)
    return [
        GemmConfig(bm, bn, bk, split, warps, 3)
        for bm in block_ms for bn in (64, 128, 256) for bk in (64, 128)
        for split in splits for warps in ((4,) if m <= 16 else (4, 8))
        if bm * bn <= 128 * 128
    ]


def graph_us(calls: list) -> float:
    """Microseconds per call of ``calls`` replayed back to back from one CUDA graph: no launch
    overhead (decode runs from CUDA graphs too), and every call reads its own weights, so with
    enough copies the weights stream from memory instead of L2."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return do_bench(graph.replay, warmup=10, rep=50) * 1e3 / len(calls)


def copies_for(nbytes: int) -> int:
    """Weight copies that together span several times the L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-4 * l2 // nbytes))


def bench_case(k: int, n: int, m: int, sweep: bool, num_sms: int) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    qweight, qzeros, scales = quantize(w, GROUP_SIZE)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    ref = x.float() @ awq_dequantize(qweight, qzeros, scales, torch.float32)
    got = awq_linear(x, qweight, qzeros, scales).float()
    rel_err = ((got - ref).norm() / ref.norm()).item()

    weight_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2
    awq_copies = [(qweight.clone(), qzeros.clone(), scales.clone()) for _ in range(copies_for(weight_bytes))]
    dense_copies = [w.to(torch.bfloat16) for _ in range(copies_for(k * n * 2))]
    del w

    def awq_calls(fn) -> list:
        return [lambda c=c: fn(x, *c) for c in awq_copies]

    bf16_us = graph_us([lambda d=d: F.linear(x, d) for d in dense_copies])
    auto_us = graph_us(awq_calls(awq_linear))
    dequant_us = graph_us(awq_calls(lambda x, *c: torch.matmul(x, awq_dequantize(*c, torch.bfloat16))))
    default_cfg = gemm_config(m, n, k, GROUP_SIZE, num_sms)
    fused_us = graph_us(awq_calls(lambda x, *c: awq_gemm(x, *c, default_cfg)))
    result = {
        "tokens": m, "k": k, "n": n, "rel_err_vs_fp32": rel_err,
        "bf16_us": bf16_us, "awq_linear_us": auto_us, "fused_us": fused_us,
        "fused_config": list(default_cfg), "dequant_matmul_us": dequant_us,
    }
    if sweep and sweep_configs(m):
        best = (float("inf"), None)
        for cfg in sweep_configs(m):
            try:
                us = graph_us(awq_calls(lambda x, *c, cfg=cfg: awq_gemm(x, *c, cfg)))
            except Exception as e:  # a tiling can run out of shared memory
                print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                continue
            best = min(best, (us, cfg), key=lambda b: b[0])
        result["sweep_best_us"], result["sweep_best_config"] = best[0], list(best[1])
    result["int4_weight_bytes"] = weight_bytes
    result["awq_linear_weight_gbps"] = weight_bytes / (auto_us * 1e-6) / 1e9
    result["speedup_vs_bf16"] = bf16_us / auto_us
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 2048])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep", type=int, nargs="*", default=[],
                        help="token counts at which to also time a grid of fused-kernel tilings")
    parser.add_argument("--out", default="bench/results/awq_linear.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_awq_linear needs a CUDA GPU", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    copy_bps = copy_bandwidth()
    print(f"{props.name}: copy bandwidth {copy_bps / 1e12:.2f} TB/s; FUSED_MAX_TOKENS={FUSED_MAX_TOKENS}")
    results = []
    for name in args.shapes:
        k, n = SHAPES[name]
        for m in args.tokens:
            start = time.perf_counter()
            r = bench_case(k, n, m, m in args.sweep, props.multi_processor_count)
            r["shape"] = name
            r["weight_bw_fraction_of_copy"] = r["awq_linear_weight_gbps"] * 1e9 / copy_bps
            results.append(r)
            line = (f"{name:8s} {k:5d}->{n:5d} tokens {m:5d}: bf16 {r['bf16_us']:8.1f} us"
                    f"  awq {r['awq_linear_us']:8.1f} us ({r['speedup_vs_bf16']:.2f}x,"
                    f" {r['weight_bw_fraction_of_copy']:.0%} of copy BW)"
                    f"  fused {r['fused_us']:8.1f}  dequant+mm {r['dequant_matmul_us']:8.1f}")
            if "sweep_best_us" in r:
                line += f"  best {r['sweep_best_us']:.1f} {r['sweep_best_config']}"
            elapsed = time.perf_counter() - start
            print(line + f"  err {r['rel_err_vs_fp32']:.1e}  [{elapsed:.0f}s]", flush=True)
    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "copy_bandwidth_tbps": copy_bps / 1e12, "group_size": GROUP_SIZE,
        "fused_max_tokens": FUSED_MAX_TOKENS, "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
