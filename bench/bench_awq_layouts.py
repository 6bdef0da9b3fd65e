"""Where an AWQ GEMV's time goes on an H200, and a candidate weight layout for the next kernel.

Two measurements on the Llama-3.1-8B linears (int4 bytes of q/k/v 4096->6144, o 4096->4096,
gate/up 4096->28672, down 14336->4096), each call replayed from a CUDA graph over enough weight
copies that they stream from memory (bench/bench_awq_linear.py's timing):

- ``probe``: the bandwidth a read of the packed words reaches by access pattern alone, with one
  or eight mask-and-FFMA per word. "rows": a thread reads 16 bytes of its own row and its
  neighbours read other rows (how awq_gemv and a row-per-thread GEMV touch memory); "cols": a
  warp reads 512 contiguous bytes of one row (how a dense GEMV touches it).
- ``kmajor``: a split-K GEMV on the weight repacked K-major (``repack``), the "cols" pattern, for
  1, 2 or 4 tokens, against bf16 ``F.linear`` and the engine's ``awq_linear``. It is a prototype:
  the engine keeps AutoAWQ's layout, which its fused and dequantize kernels read.

    python -m bench.bench_awq_layouts [--tokens 1 2 4] [--out FILE]   # needs a CUDA GPU
    TRITON_INTERPRET=1 python -m bench.bench_awq_layouts --check      # the prototype on CPU
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.common import write_result
from engine.quantization.awq import dequantize, quantize, unpack_int4

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """AutoAWQ [K, N/8] -> (words int32 [N, K/8], zeros uint8 [N, G], scales [N, G]). Each run of
    32 inputs of a row is 4 words: word w, nibble j holds input 32 t + 4 j + w, so that the 4 words
    a thread loads at once meet 4 consecutive activations per nibble."""
    k = qweight.shape[0]
    q = unpack_int4(qweight).to(torch.int64).t().reshape(-1, k // 32, 8, 4)  # [N, t, j, w]
    shifts = (4 * torch.arange(8, device=q.device)).view(1, 1, 8, 1)
    words = (q << shifts).sum(dim=2).reshape(q.shape[0], k // 8)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.contiguous(), unpack_int4(qzeros).t().contiguous(), scales.t().contiguous()


@triton.jit
def _raw_tile(words, hi, x_row, xk, BN: tl.constexpr, BKW: tl.constexpr, m, M):
    """Per row and thread: sum over its 32 inputs of x * q (scaled by 2**-59: subnormal nibbles,
    one LOP3 and one FFMA per weight, as awq_gemv), and the sum of those x."""
    raw = tl.zeros((BN, BKW), dtype=tl.float32)
    xs = tl.zeros((1, BKW), dtype=tl.float32)
    for j in tl.static_range(8):
        x = tl.load(x_row + xk + 4 * j, mask=(xk * 0 + m) < M, other=0.0).to(tl.float32)
        src = words if j < 4 else hi
        raw += (src & (0xF << (4 * (j % 4)))).to(tl.float32, bitcast=True) * (x * (2.0 ** (90 - 4 * (j % 4))))
        xs += x
    T: tl.constexpr = BKW // 4
    return tl.sum(tl.reshape(raw, (BN, T, 4)), axis=2), tl.sum(tl.reshape(xs, (1, T, 4)), axis=2)


@triton.jit
def _store_partial(acc, partial_ptr, pid_s, m, M, N, n, n_ok):
    out = tl.sum(acc, axis=1) * (2.0 ** 59)
    tl.store(partial_ptr + (pid_s * M + m) * N + n, out, mask=n_ok & ((n * 0 + m) < M))


@triton.jit(do_not_specialize=["tiles_per_split", "split_k"])
def _kmajor_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, partial_ptr, lock_ptr,
    M, N, KW, num_groups, stride_xm, tiles_per_split, split_k,
    GROUP_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BKW: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N), split_k)``: program (p, s) owns BLOCK_N rows and the s-th run of
    K tiles of BKW words; the 32 threads of a warp lie along K (4 words, 16 bytes, each), rows
    repeat in registers. Every split stores fp32 partials; the last to arrive sums them in order."""
    T: tl.constexpr = BKW // 4
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = tl.minimum(n, N - 1)
    kw = tl.arange(0, BKW)[None, :]
    w_ptrs = w_ptr + n_in[:, None].to(tl.int64) * KW + kw
    xk = (kw // 4) * 32 + kw % 4
    t = tl.arange(0, T)[None, :]
    sz_row = n_in[:, None] * num_groups
    kw_lo = pid_s * tiles_per_split * BKW
    kw_hi = tl.minimum(kw_lo + tiles_per_split * BKW, KW)
    acc0 = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    for kw0 in tl.range(kw_lo, kw_hi, BKW, num_stages=NUM_STAGES):
        words = tl.load(w_ptrs + kw0, mask=(kw + kw0) < kw_hi, other=0)
        hi = (words.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)
        g = 0 if GROUP_SHIFT == 31 else ((kw0 + 4 * t) * 8) >> GROUP_SHIFT
        t_ok = (kw0 + 4 * t) < kw_hi
        s = tl.load(s_ptr + sz_row + g, mask=t_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_row + g, mask=t_ok, other=0).to(tl.float32) * (2.0 ** -59)
        x_row = x_ptr + kw0 * 8
        raw, xs = _raw_tile(words, hi, x_row, xk, BLOCK_N, BKW, 0, M)
        acc0 += s * (raw - z * xs)
        if BLOCK_M > 1:
            raw, xs = _raw_tile(words, hi, x_row + stride_xm, xk, BLOCK_N, BKW, 1, M)
            acc1 += s * (raw - z * xs)
        if BLOCK_M > 2:
            raw, xs = _raw_tile(words, hi, x_row + 2 * stride_xm, xk, BLOCK_N, BKW, 2, M)
            acc2 += s * (raw - z * xs)
            raw, xs = _raw_tile(words, hi, x_row + 3 * stride_xm, xk, BLOCK_N, BKW, 3, M)
            acc3 += s * (raw - z * xs)
    n_ok = n < N
    _store_partial(acc0, partial_ptr, pid_s, 0, M, N, n, n_ok)
    if BLOCK_M > 1:
        _store_partial(acc1, partial_ptr, pid_s, 1, M, N, n, n_ok)
    if BLOCK_M > 2:
        _store_partial(acc2, partial_ptr, pid_s, 2, M, N, n, n_ok)
        _store_partial(acc3, partial_ptr, pid_s, 3, M, N, n, n_ok)
    tl.debug_barrier()
    arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == split_k - 1:
        for m in tl.static_range(BLOCK_M):
            ok = n_ok & ((n * 0 + m) < M)
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s0 in range(0, split_k):
                total += tl.load(partial_ptr + (s0 * M + m) * N + n, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + m * N + n, total.to(out_ptr.dtype.element_ty), mask=ok)
        tl.atomic_xchg(lock_ptr + pid_n, 0, sem="relaxed", scope="gpu")


_LOCKS: dict[torch.device, torch.Tensor] = {}


def kmajor_gemv(x, words, zeros, scales, block_n=8, num_warps=1, bkw=128, target_programs=1024, num_stages=1):
    """``x`` [M <= 4, K] times the repacked weight -> [M, N] in x's dtype."""
    m, k = x.shape
    n, kw = words.shape
    groups = scales.shape[1]
    group_shift = 31 if groups == 1 else (k // groups).bit_length() - 1
    bkw = min(bkw, triton.next_power_of_2(kw))
    tiles = triton.cdiv(kw, bkw)
    programs = triton.cdiv(n, block_n)
    split_k = 1
    while programs * split_k * 2 <= target_programs and split_k * 2 <= tiles:
        split_k *= 2
    tiles_per_split = triton.cdiv(tiles, split_k)
    split_k = triton.cdiv(tiles, tiles_per_split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    locks = _LOCKS.get(x.device)
    if locks is None:
        locks = _LOCKS[x.device] = torch.zeros(1 << 16, dtype=torch.int32, device=x.device)
    _kmajor_gemv_kernel[(programs, split_k)](
        x, words, scales, zeros, out, partial, locks, m, n, kw, groups, x.stride(0), tiles_per_split, split_k,
        GROUP_SHIFT=group_shift, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BKW=bkw,
        NUM_STAGES=num_stages, num_warps=num_warps, num_stages=num_stages)
    return out


@triton.jit
def _probe_rows_kernel(w_ptr, out_ptr, N, KW, tiles_per_split, BN: tl.constexpr, U: tl.constexpr,
                       OPS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    row = w_ptr + n[:, None].to(tl.int64) * KW + tl.arange(0, 4)[None, :]
    lo = pid_s * tiles_per_split * 4 * U
    hi = tl.minimum(lo + tiles_per_split * 4 * U, KW)
    acc = tl.zeros((BN, 4), dtype=tl.float32)
    for kw0 in range(lo, hi, 4 * U):
        for v in tl.static_range(U):
            w = tl.load(row + kw0 + 4 * v)
            for j in tl.static_range(OPS):
                acc += (w & (0xF << (4 * (j % 4)))).to(tl.float32, bitcast=True) * 1.5
    tl.store(out_ptr + pid_s * N + n, tl.sum(acc, axis=1))


@triton.jit
def _probe_cols_kernel(w_ptr, out_ptr, N, KW, tiles_per_split, BN: tl.constexpr, BKW: tl.constexpr,
                       OPS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    row = w_ptr + n[:, None].to(tl.int64) * KW + tl.arange(0, BKW)[None, :]
    lo = pid_s * tiles_per_split * BKW
    hi = tl.minimum(lo + tiles_per_split * BKW, KW)
    acc = tl.zeros((BN, BKW), dtype=tl.float32)
    for kw0 in range(lo, hi, BKW):
        w = tl.load(row + kw0)
        for j in tl.static_range(OPS):
            acc += (w & (0xF << (4 * (j % 4)))).to(tl.float32, bitcast=True) * 1.5
    tl.store(out_ptr + pid_s * N + n, tl.sum(acc, axis=1))


def probe(name: str, k: int, n: int, copy_bps: float) -> list[dict]:
    from bench.bench_awq_linear import copies_for, graph_us

    kw = k // 8
    words = torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32, device="cuda")
    nbytes = words.numel() * 4
    copies = [words.clone() for _ in range(copies_for(nbytes))]
    out = torch.empty(64 * n, device="cuda")

    def calls(kernel, grid, tiles_per_split, **meta):
        return [lambda c=c: kernel[grid](c, out, n, kw, tiles_per_split, **meta) for c in copies]

    rows = []
    for ops in (1, 8):
        timings = {"rows": [], "cols": []}
        for bn, nw, u, split in itertools.product((128, 256), (1, 2), (2, 4), (4, 8, 16)):
            if bn // (32 * nw) < 2:
                continue
            tps = triton.cdiv(kw // (4 * u), split)
            grid = (n // bn, triton.cdiv(kw // (4 * u), tps))
            us = graph_us(calls(_probe_rows_kernel, grid, tps, BN=bn, U=u, OPS=ops, num_warps=nw), rep=20)
            timings["rows"].append((us, [bn, nw, u, split]))
        for bn, nw, bkw, split in itertools.product((8, 16), (1, 4), (128, 256), (1, 2, 4, 8)):
            tps = triton.cdiv(kw // bkw, split)
            grid = (n // bn, triton.cdiv(kw // bkw, tps))
            us = graph_us(calls(_probe_cols_kernel, grid, tps, BN=bn, BKW=bkw, OPS=ops, num_warps=nw), rep=20)
            timings["cols"].append((us, [bn, nw, bkw, split]))
        for pattern, found in timings.items():
            us, cfg = min(found)
            rows.append({"shape": name, "k": k, "n": n, "pattern": pattern, "ops_per_word": ops, "us": us,
                         "config": cfg, "bw_fraction_of_copy": nbytes / (us * 1e-6) / copy_bps})
            print(f"probe {name:8s} {pattern} {ops} ops/word: {us:7.2f} us "
                  f"({rows[-1]['bw_fraction_of_copy'] * 100:.0f}% of copy) {cfg}", flush=True)
    return rows


def kmajor_case(name: str, k: int, n: int, m: int, copy_bps: float) -> dict:
    from bench.bench_awq_linear import copies_for, graph_us, rel_err
    from engine.kernels.awq_gemm import awq_dequantize, awq_linear

    torch.manual_seed(0)
    qweight, qzeros, scales = quantize(torch.randn(n, k, device="cuda") * 0.02, 128)
    packed = repack(qweight, qzeros, scales)
    nbytes = packed[0].numel() * 4
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ awq_dequantize(qweight, qzeros, scales, torch.float32)
    w16 = awq_dequantize(qweight, qzeros, scales, torch.bfloat16).t().contiguous()  # [N, K] as nn.Linear
    bf16_us = graph_us([lambda c=c: F.linear(x, c) for c in [w16.clone() for _ in range(copies_for(nbytes * 4))]])
    awq_copies = [(qweight.clone(), qzeros.clone(), scales.clone()) for _ in range(copies_for(nbytes))]
    awq_us = graph_us([lambda c=c: awq_linear(x, *c) for c in awq_copies])
    copies = [tuple(t.clone() for t in packed) for _ in range(copies_for(nbytes))]
    tilings = [(8, 1, 128), (4, 1, 128), (8, 2, 128)] if m <= 2 else [(4, 1, 128), (2, 1, 128)]
    timings = []
    for (bn, nw, bkw), target, stages in itertools.product(tilings, (1024, 2048), (1, 2)):
        cfg = dict(block_n=bn, num_warps=nw, bkw=bkw, target_programs=target, num_stages=stages)
        err = rel_err(kmajor_gemv(x, *packed, **cfg), ref)
        timings.append((graph_us([lambda c=c, cfg=cfg: kmajor_gemv(x, *c, **cfg) for c in copies], rep=20), err, cfg))
    us, err, cfg = min(timings, key=lambda r: r[0])
    result = {"shape": name, "k": k, "n": n, "tokens": m, "bf16_us": bf16_us, "awq_linear_us": awq_us,
              "kmajor_us": us, "kmajor_config": cfg, "kmajor_rel_err_vs_fp32": err,
              "kmajor_speedup_vs_bf16": bf16_us / us, "kmajor_vs_awq_linear": awq_us / us,
              "kmajor_bw_fraction_of_copy": nbytes / (us * 1e-6) / copy_bps}
    print(f"kmajor {name:8s} m={m}: bf16 {bf16_us:6.2f} us, awq_linear {awq_us:6.2f}, kmajor {us:6.2f} "
          f"({result['kmajor_speedup_vs_bf16']:.2f}x bf16, {result['kmajor_bw_fraction_of_copy'] * 100:.0f}% of copy) "
          f"{cfg}", flush=True)
    return result


def check() -> None:
    """The prototype against float64 on small shapes (CPU through the interpreter, or CUDA)."""
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for k, n, group, m in [(256, 64, 128, 1), (256, 64, 64, 3), (512, 96, 128, 2), (256, 64, 256, 4)]:
        qweight, qzeros, scales = quantize(torch.randn(n, k, generator=gen) * 0.02, group)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        ref = x.double() @ dequantize(qweight, qzeros, scales.float()).double()
        packed = [t.to(device) for t in repack(qweight, qzeros, scales)]
        got = kmajor_gemv(x.to(device), *packed, block_n=8, bkw=16).cpu().double()
        ulps = ((got - ref).abs() / (ref.abs() * 2**-7 + 1e-30)).max().item()
        print(f"K={k} N={n} G={group} M={m}: max error {ulps:.2f} bf16 ulps of the float64 product")
        assert ulps <= 1.0, "the prototype disagrees with the float64 reference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--check", action="store_true", help="only check the prototype against float64")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.check:
        check()
        return
    from bench.bench_awq_linear import copy_bandwidth

    copy_bps = copy_bandwidth()
    result = {"benchmark": "awq_layouts", "copy_bandwidth_bytes_per_s": copy_bps, "probe": [], "kmajor": []}
    for name, (k, n) in SHAPES.items():
        result["probe"] += probe(name, k, n, copy_bps)
    for m in args.tokens:
        for name, (k, n) in SHAPES.items():
            result["kmajor"].append(kmajor_case(name, k, n, m, copy_bps))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
