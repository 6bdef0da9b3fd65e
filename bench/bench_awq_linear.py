"""AWQ 4-bit linear vs bf16 ``F.linear`` on Llama-3.1-8B's projection shapes (needs a CUDA GPU).

    python bench/bench_awq_linear.py [--tokens 1 4 16 64 256 2048] [--sweep 1 16 64]
                                     [--gemv-sweep] [--out FILE]

For each shape and token count it times, replayed from CUDA graphs over enough weight copies
that weights stream from memory: bf16 ``F.linear``; ``awq_linear`` as the engine calls it; the
fused kernel and dequantize + matmul separately (their crossing is where ``FUSED_MAX_TOKENS``
comes from); up to ``GEMV_MAX_TOKENS`` tokens, the split-K gemv; and up to ``MMA_MAX_TOKENS``, on
Hopper, the tensor-core kernel of engine/kernels/awq_mma.py (what ``awq_linear`` runs there;
``--mma-sweep`` times a grid of its configurations); above that, on Hopper, the wgmma kernel of
engine/kernels/awq_wgmma.py (``--wgmma-sweep`` times a grid of its configurations). It reports the int4 weight
bytes streamed per second against a measured device copy bandwidth. ``--sweep`` also times a
grid of fused-kernel tilings at the token counts it names and records the best. ``--gemv-sweep`` times, at each token
count up to ``GEMV_MAX_TOKENS``, a grid of gemv configurations (``gemv_sweep_configs``), records
the best per shape and prints a summary table.
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
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench as triton_do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment  # noqa: E402
from engine.kernels.awq_gemm import (  # noqa: E402
    FUSED_MAX_TOKENS,
    GEMV_MAX_TOKENS,
    GemmConfig,
    GemvConfig,
    awq_dequantize,
    awq_gemm,
    awq_gemv,
    awq_linear,
    gemm_config,
    gemv_config,
)
from engine.kernels.awq_mma import MMA_MAX_TOKENS, MmaConfig, awq_mma, mma_config, mma_supported  # noqa: E402
from engine.kernels.awq_wgmma import WgmmaConfig, awq_wgmma, wgmma_config, wgmma_supported  # noqa: E402
from engine.quantization.awq import quantize  # noqa: E402

# name -> (K in, N out) for Llama-3.1-8B (fused q|k|v and gate|up, as the engine runs them).
SHAPES = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
GROUP_SIZE = 128
ROUNDS = 3  # interleaved timing rounds of a case's paths (interleaved_us)
SWEEP_FINALISTS = 4  # a sweep's fastest configurations timed again, interleaved with the default
GEMV_SWEEP_PROGRAMS_PER_SM = (1, 2, 4, 8)  # split-K targets (a runtime argument: no recompilation)


def do_bench(fn, rep: int = 50) -> float:
    """Milliseconds per call of ``fn`` (triton.testing.do_bench; warmup a fifth of ``rep``)."""
    return triton_do_bench(fn, warmup=max(5, rep // 5), rep=rep)


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read and written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def sweep_configs(m: int) -> list[GemmConfig]:
    """Tilings worth trying for ``m`` tokens (none above the fused kernel's range): 64-256 columns,
    128-row K tiles, split-K 1-16, the weight on either side of the MMA."""
    if m > FUSED_MAX_TOKENS:
        return []
    block_ms = [16] if m <= 16 else [16, 32, 64]
    return [
        GemmConfig(bm, bn, 128, split, 4, 3, swap)
        for bm in block_ms for bn in (64, 128, 256) for split in (1, 2, 4, 8, 16) for swap in (False, True)
        if bm * bn <= 128 * 128
    ]


def gemv_sweep_configs(n: int, k: int, num_sms: int, tokens: int) -> list[GemvConfig]:
    """Gemv configurations to time on a [K, N] weight: the default for ``tokens`` first, then words per
    program in {8, 16, 32} (one warp), K tiles of 64-256 rows inside a group, 2-4 stages, and the
    split-K values nearest 1, 2, 4 and 8 programs per SM (the split is a runtime argument: one
    compiled kernel per tiling)."""
    configs = [gemv_config(n, k, GROUP_SIZE, num_sms, tokens)]
    for block_w in (8, 16, 32):
        programs = triton.cdiv(n // 8, block_w)
        for block_k in (64, 128, 256):
            if k % block_k or GROUP_SIZE % block_k:
                continue
            splits = {max(1, min(k // block_k, round(t * num_sms / programs))) for t in GEMV_SWEEP_PROGRAMS_PER_SM}
            configs += [GemvConfig(block_w, block_k, s, stages) for stages in (2, 3, 4) for s in sorted(splits)]
    return list(dict.fromkeys(configs))


def mma_sweep_configs(m: int, n: int, k: int, num_sms: int) -> list[MmaConfig]:
    """awq_mma configurations to time: the default first, then 128- or 256-row stages, split-K
    nearest 1, 2, 4 and 8 programs per SM, 2 or 3 stages."""
    configs = [mma_config(m, n, k, num_sms)]
    for halves in (1, 2):
        if k % (128 * halves):
            continue
        k_tiles = k // (128 * halves)
        splits = {max(1, min(k_tiles, round(p * num_sms / (n // 128)))) for p in (1, 2, 4, 8)}
        configs += [MmaConfig(halves, s, stages) for s in sorted(splits) for stages in (2, 3)]
    return list(dict.fromkeys(configs))


def wgmma_sweep_configs(m: int, n: int, k: int, num_sms: int) -> list[WgmmaConfig]:
    """awq_wgmma configurations to time: the default first, then 64-256 tokens a program (not
    more than twice the tokens, nor fewer than half of them up to 512: smaller programs never came
    close in awq_linear_s17_sweep*.json), split-K 1, 2 or 4, 4 or 5 stages for 256-token programs
    and 5 or 6 for smaller ones (fewer never came close in awq_linear_s17_sweep_stages.json)."""
    configs = [wgmma_config(m, n, k, num_sms)]
    configs += [WgmmaConfig(bt, s, st) for bt in (64, 128, 256) if bt < 2 * m and 2 * bt >= min(m, 512)
                for s in (1, 2, 4) for st in ((4, 5) if bt == 256 else (5, 6))]
    return list(dict.fromkeys(configs))


def capture(calls: list) -> torch.cuda.CUDAGraph:
    """``calls`` back to back in one CUDA graph (run once first, so nothing compiles inside)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def graph_us(calls: list, rep: int = 50) -> float:
    """Microseconds per call of ``calls`` replayed back to back from one CUDA graph: no launch
    overhead (decode runs from CUDA graphs too), and every call reads its own weights, so with
    enough copies the weights stream from memory instead of L2."""
    return do_bench(capture(calls).replay, rep=rep) * 1e3 / len(calls)


def interleaved_us(variants: dict[str, list], rounds: int = ROUNDS) -> dict[str, float]:
    """``graph_us`` of each variant's calls, timed in ``rounds`` rounds that take every variant
    once, each keeping its fastest; round r starts at the r-th variant, so that no variant always
    follows the same one. On the H200 one measurement depends on what ran before it: in
    awq_linear_s18b.json, timed one after another, awq_linear and the dequantize + matmul column
    (the same two operations at 2048 tokens) read 377.3 and 452.5 us on down; in awq_linear_s19.json,
    interleaved in a fixed order (awq_linear always right after bf16's GEMMs), awq_linear read up to
    10% above the wgmma column, the same kernel."""
    graphs = {name: capture(calls) for name, calls in variants.items()}
    names = list(graphs)
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            best[name] = min(best[name], do_bench(graphs[name].replay) * 1e3 / len(variants[name]))
    return best


def copies_for(nbytes: int) -> int:
    """Weight copies that together span several times the L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-4 * l2 // nbytes))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def bench_case(k: int, n: int, m: int, sweep: bool, gemv_sweep: bool, num_sms: int, copy_bps: float,
               mma_sweep: bool = False, wgmma_sweep: bool = False) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    qweight, qzeros, scales = quantize(w, GROUP_SIZE)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    ref = x.float() @ awq_dequantize(qweight, qzeros, scales, torch.float32)
    err = rel_err(awq_linear(x, qweight, qzeros, scales), ref)

    weight_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2
    awq_copies = [(qweight.clone(), qzeros.clone(), scales.clone()) for _ in range(copies_for(weight_bytes))]
    dense_copies = [w.to(torch.bfloat16) for _ in range(copies_for(k * n * 2))]
    del w

    def awq_calls(fn) -> list:
        return [lambda c=c: fn(x, *c) for c in awq_copies]

    def bw_fraction(us: float) -> float:
        return weight_bytes / (us * 1e-6) / copy_bps

    def time_configs(name: str, fn, configs: list) -> dict:
        """Time ``fn(x, *weights, cfg)`` for each config (checked against the reference first),
        one after another, then the SWEEP_FINALISTS fastest and the default (the first config)
        again in interleaved rounds (``interleaved_us``: one after another, a timing depends on
        what ran before it), which replace their first timings: the sorted list and the best,
        under ``{name}_sweep*`` keys."""
        timings = {}
        for cfg in configs:
            try:
                e = rel_err(fn(x, qweight, qzeros, scales, cfg), ref)
            except OutOfResources as exc:  # too many stages for shared memory
                print(f"  {name} {cfg}: {exc}")
                continue
            assert e < 1e-2, f"{cfg}: relative error {e:.1e}"
            timings[cfg] = graph_us(awq_calls(lambda x, *c, cfg=cfg: fn(x, *c, cfg)), rep=20)
        if not timings:
            return {}
        finalists = sorted(timings, key=timings.get)[:SWEEP_FINALISTS]
        finalists += [cfg for cfg in configs[:1] if cfg in timings and cfg not in finalists]
        again = interleaved_us({cfg: awq_calls(lambda x, *c, cfg=cfg: fn(x, *c, cfg)) for cfg in finalists})
        ranked = sorted(((again.get(cfg, us), cfg) for cfg, us in timings.items()), key=lambda t: t[0])
        return {f"{name}_sweep": [[us, list(cfg)] for us, cfg in ranked],
                f"{name}_sweep_interleaved": [list(cfg) for cfg in finalists],
                f"{name}_sweep_best_us": ranked[0][0], f"{name}_sweep_best_config": list(ranked[0][1])}

    # Every path on its default configuration, timed together (``interleaved_us``).
    default_cfg = gemm_config(m, n, k, GROUP_SIZE, num_sms)
    variants = {
        "bf16": [lambda d=d: F.linear(x, d) for d in dense_copies],
        "awq_linear": awq_calls(awq_linear),
        "dequant_matmul": awq_calls(lambda x, *c: torch.matmul(x, awq_dequantize(*c, torch.bfloat16))),
        "fused": awq_calls(lambda x, *c: awq_gemm(x, *c, default_cfg)),
    }
    result = {"tokens": m, "k": k, "n": n, "rel_err_vs_fp32": err, "fused_config": list(default_cfg)}
    if m <= MMA_MAX_TOKENS and mma_supported(x, qweight, GROUP_SIZE):
        mma_cfg = mma_config(m, n, k, num_sms)
        result["mma_config"] = list(mma_cfg)
        result["mma_rel_err_vs_fp32"] = rel_err(awq_mma(x, qweight, qzeros, scales, mma_cfg), ref)
        variants["mma"] = awq_calls(lambda x, *c: awq_mma(x, *c, mma_cfg))
    if m > MMA_MAX_TOKENS and wgmma_supported(x, qweight, GROUP_SIZE):
        wg_cfg = wgmma_config(m, n, k, num_sms)
        result["wgmma_config"] = list(wg_cfg)
        result["wgmma_rel_err_vs_fp32"] = rel_err(awq_wgmma(x, qweight, qzeros, scales, wg_cfg), ref)
        variants["wgmma"] = awq_calls(lambda x, *c: awq_wgmma(x, *c, wg_cfg))
    if m <= GEMV_MAX_TOKENS:
        gemv_cfg = gemv_config(n, k, GROUP_SIZE, num_sms, m)
        result["gemv_config"] = list(gemv_cfg)
        result["gemv_rel_err_vs_fp32"] = rel_err(awq_gemv(x, qweight, qzeros, scales, gemv_cfg), ref)
        variants["gemv"] = awq_calls(lambda x, *c: awq_gemv(x, *c, gemv_cfg))
    result |= {f"{name}_us": us for name, us in interleaved_us(variants).items()}
    for name in ("mma", "gemv"):
        if f"{name}_us" in result:
            result[f"{name}_weight_bw_fraction_of_copy"] = bw_fraction(result[f"{name}_us"])
    auto_us = result["awq_linear_us"]
    if mma_sweep and "mma_us" in result:
        result |= time_configs("mma", awq_mma, mma_sweep_configs(m, n, k, num_sms))
    if wgmma_sweep and "wgmma_us" in result:
        result |= time_configs("wgmma", awq_wgmma, wgmma_sweep_configs(m, n, k, num_sms))
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
    if gemv_sweep:
        timings = []
        for cfg in gemv_sweep_configs(n, k, num_sms, m):
            try:
                e = rel_err(awq_gemv(x, qweight, qzeros, scales, cfg), ref)
                if not e < 1e-2:
                    print(f"  skip {cfg}: relative error {e:.1e}", flush=True)
                    continue
                timings.append((graph_us(awq_calls(lambda x, *c, cfg=cfg: awq_gemv(x, *c, cfg)), rep=20), cfg))
            except Exception as e:  # a tiling can fail to compile or launch
                print(f"  skip {cfg}: {type(e).__name__}: {e}", flush=True)
        timings.sort(key=lambda t: t[0])
        result["gemv_sweep_configs"] = len(timings)
        result["gemv_sweep_top"] = [[us, list(cfg)] for us, cfg in timings[:5]]
        if timings:
            result["gemv_sweep_best_us"], best_cfg = timings[0][0], timings[0][1]
            result["gemv_sweep_best_config"] = list(best_cfg)
            result["gemv_sweep_best_weight_bw_fraction_of_copy"] = bw_fraction(timings[0][0])
    result["int4_weight_bytes"] = weight_bytes
    result["awq_linear_weight_gbps"] = weight_bytes / (auto_us * 1e-6) / 1e9
    result["weight_bw_fraction_of_copy"] = bw_fraction(auto_us)
    result["speedup_vs_bf16"] = result["bf16_us"] / auto_us
    return result


def gemv_summary(results: list[dict]) -> str:
    """The --gemv-sweep table: shape, tokens, bf16, the fused kernel, the best gemv and its
    config (block_w, block_k, split_k, num_stages), its weight bandwidth (fraction of
    the copy bandwidth) and speedup over bf16; then the default gemv config's time."""
    lines = [f"{'shape':8s} {'tok':>3s} {'bf16 us':>8s} {'gemm us':>8s} {'gemv us':>8s} {'config':22s}"
             f" {'BW':>4s} {'vs bf16':>7s} {'default us':>10s}"]
    for r in results:
        if "gemv_sweep_best_us" not in r:
            continue
        best = r["gemv_sweep_best_us"]
        lines.append(
            f"{r['shape']:8s} {r['tokens']:3d} {r['bf16_us']:8.1f} {r['fused_us']:8.1f} {best:8.1f}"
            f" {str(tuple(r['gemv_sweep_best_config'])):22s} {r['gemv_sweep_best_weight_bw_fraction_of_copy']:4.0%}"
            f" {r['bf16_us'] / best:6.2f}x {r.get('gemv_us', float('nan')):10.1f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 2048])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep", type=int, nargs="*", default=[],
                        help="token counts at which to also time a grid of fused-kernel tilings")
    parser.add_argument("--gemv-sweep", action="store_true",
                        help="up to GEMV_MAX_TOKENS tokens (among --tokens), also time a grid of gemv tilings")
    parser.add_argument("--mma-sweep", action="store_true",
                        help="up to MMA_MAX_TOKENS tokens (among --tokens), also time a grid of awq_mma configurations")
    parser.add_argument("--wgmma-sweep", action="store_true",
                        help="above MMA_MAX_TOKENS tokens, also time a grid of awq_wgmma configurations")
    parser.add_argument("--out", default="bench/results/awq_linear.json")
    args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_awq_linear needs a CUDA GPU", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    copy_bps = copy_bandwidth()
    print(f"{props.name}: copy bandwidth {copy_bps / 1e12:.2f} TB/s; FUSED_MAX_TOKENS={FUSED_MAX_TOKENS},"
          f" GEMV_MAX_TOKENS={GEMV_MAX_TOKENS}")
    results = []
    for name in args.shapes:
        k, n = SHAPES[name]
        for m in args.tokens:
            start = time.perf_counter()
            r = bench_case(k, n, m, m in args.sweep, args.gemv_sweep and m <= GEMV_MAX_TOKENS, num_sms, copy_bps,
                           args.mma_sweep, args.wgmma_sweep)
            r["shape"] = name
            results.append(r)
            line = (f"{name:8s} {k:5d}->{n:5d} tokens {m:5d}: bf16 {r['bf16_us']:8.1f} us"
                    f"  awq {r['awq_linear_us']:8.1f} us ({r['speedup_vs_bf16']:.2f}x,"
                    f" {r['weight_bw_fraction_of_copy']:.0%} of copy BW)"
                    f"  fused {r['fused_us']:8.1f}  dequant+mm {r['dequant_matmul_us']:8.1f}")
            if "mma_us" in r:
                line += f"  mma {r['mma_us']:7.1f} ({r['mma_weight_bw_fraction_of_copy']:.0%})"
            if "wgmma_us" in r:
                line += f"  wgmma {r['wgmma_us']:7.1f} {r['wgmma_config']}"
            if "gemv_us" in r:
                line += f"  gemv {r['gemv_us']:7.1f} ({r['gemv_weight_bw_fraction_of_copy']:.0%})"
            for kind in ("wgmma_", "mma_", "", "gemv_"):  # each sweep's best, where one ran
                if f"{kind}sweep_best_us" in r:
                    line += f"  best {kind.rstrip('_')} {r[f'{kind}sweep_best_us']:.1f} {r[f'{kind}sweep_best_config']}"
            elapsed = time.perf_counter() - start
            print(line + f"  err {r['rel_err_vs_fp32']:.1e}  [{elapsed:.0f}s]", flush=True)
    if args.gemv_sweep:
        print(gemv_summary(results))
    out = {
        "environment": environment(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "copy_bandwidth_tbps": copy_bps / 1e12, "group_size": GROUP_SIZE,
        "fused_max_tokens": FUSED_MAX_TOKENS, "gemv_max_tokens": GEMV_MAX_TOKENS, "mma_max_tokens": MMA_MAX_TOKENS,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
