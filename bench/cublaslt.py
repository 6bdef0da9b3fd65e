"""cuBLASLt through ctypes, for the one product the dense linears run: ``out = x @ w.T`` in bf16 or
fp16 with float32 accumulation (``x [M, K]``, ``w [N, K]``, ``out [M, N]``, all row-major and
contiguous), with the algorithm chosen by the caller instead of by cuBLAS's heuristic.

cuBLAS picks one kernel per problem shape by a heuristic; ``cublasLtMatmulAlgoGetHeuristic`` lists
others for the same problem (tile shapes, split-K). bench/bench_cublaslt.py times them against
cuBLAS's pick. Timed alone, some are faster at decode batch sizes (Llama-3.1-8B's gate_up at 64
rows 59.3 against 64.7 µs on an H200); picked that way for the engine's linears (session 36), they
gained 0.1-0.5% on the 8B offline run and left the Qwen3-0.6B decode steps as they were
(docs/experiments.md), so the engine calls cuBLAS and this binding serves the benchmark only.

Row-major ``out [M, N] = x [M, K] @ w[N, K].T`` is column-major ``out.T [N, M] = w.T @ x.T``:
cuBLASLt's A is ``w`` read transposed (``K x N``, ld K), B is ``x`` (``K x M``, ld K) and D is
``out`` (``N x M``, ld N) -- the call ``F.linear`` makes.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable, Sequence

import torch

CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F = 68
DESC_TRANSA, DESC_TRANSB = 3, 4
PREF_MAX_WORKSPACE_BYTES = 1
OP_N, OP_T = 0, 1
WORKSPACE_BYTES = 32 << 20  # what torch gives cuBLAS on Hopper


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@functools.cache
def _lib() -> ctypes.CDLL:
    """libcublasLt, the one torch loaded (by soname first, then beside torch's CUDA wheels)."""
    names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    roots = {os.path.dirname(os.path.dirname(torch.__file__))}
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcublasLt.so*"), recursive=True)):
            return ctypes.CDLL(path)
    raise OSError("libcublasLt not found")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


class _Problem:
    """The descriptors of one (M, N, K, dtype) product; they live as long as the object."""

    def __init__(self, lt: LtMatmul, m: int, n: int, k: int, dtype: torch.dtype):
        lib, self.lib = lt.lib, lt.lib
        cuda_type = {torch.bfloat16: CUDA_R_16BF, torch.float16: CUDA_R_16F}[dtype]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
               "cublasLtMatmulDescCreate")
        for attr, op in ((DESC_TRANSA, OP_T), (DESC_TRANSB, OP_N)):
            value = ctypes.c_int32(op)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.c_size_t(4)),
                   "cublasLtMatmulDescSetAttribute")
        self.layouts = []
        for rows, cols, ld in ((k, n, k), (k, m, k), (n, m, n)):  # A = w, B = x, C = D = out
            layout = ctypes.c_void_p()
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), cuda_type, ctypes.c_uint64(rows),
                                                  ctypes.c_uint64(cols), ctypes.c_int64(ld)),
                   "cublasLtMatrixLayoutCreate")
            self.layouts.append(layout)

    def __del__(self):
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        for layout in getattr(self, "layouts", []):
            lib.cublasLtMatrixLayoutDestroy(layout)
        if getattr(self, "desc", None):
            lib.cublasLtMatmulDescDestroy(self.desc)


class LtMatmul:
    """One cuBLASLt handle and workspace on ``device``; ``algos`` lists candidates for a problem,
    ``matmul`` runs one on the current stream (so it can be captured in a CUDA graph)."""

    def __init__(self, device: torch.device):
        self.lib = _lib()
        self.device = device
        self.handle = ctypes.c_void_p()
        _check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._problems: dict[tuple, _Problem] = {}
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def problem(self, m: int, n: int, k: int, dtype: torch.dtype) -> _Problem:
        key = (m, n, k, dtype)
        if key not in self._problems:
            self._problems[key] = _Problem(self, m, n, k, dtype)
        return self._problems[key]

    def algos(self, m: int, n: int, k: int, dtype: torch.dtype, count: int = 32) -> list[_HeuristicResult]:
        """Up to ``count`` algorithms cuBLASLt offers for the product, its own first choice first."""
        p = self.problem(m, n, k, dtype)
        pref = ctypes.c_void_p()
        _check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        try:
            ws = ctypes.c_uint64(WORKSPACE_BYTES)
            _check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws),
                                                                  ctypes.c_size_t(8)),
                   "cublasLtMatmulPreferenceSetAttribute")
            results = (_HeuristicResult * count)()
            returned = ctypes.c_int(0)
            a, b, c = p.layouts
            _check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, p.desc, a, b, c, c, pref, count, results,
                                                           ctypes.byref(returned)),
                   "cublasLtMatmulAlgoGetHeuristic")
        finally:
            self.lib.cublasLtMatmulPreferenceDestroy(pref)
        return [results[i] for i in range(returned.value) if results[i].state == 0]

    def matmul(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, algo: _HeuristicResult) -> torch.Tensor:
        m, k = x.shape
        n = w.shape[0]
        p = self.problem(m, n, k, x.dtype)
        a, b, c = p.layouts
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        _check(self.lib.cublasLtMatmul(
            self.handle, p.desc, ctypes.byref(self._one), ctypes.c_void_p(w.data_ptr()), a,
            ctypes.c_void_p(x.data_ptr()), b, ctypes.byref(self._zero), ctypes.c_void_p(out.data_ptr()), c,
            ctypes.c_void_p(out.data_ptr()), c, ctypes.byref(algo.algo), ctypes.c_void_p(self.workspace.data_ptr()),
            ctypes.c_size_t(algo.workspace_size), stream), "cublasLtMatmul")
        return out


def graph_us(fn: Callable[[int], object], calls: int, replays: int = 3) -> float:
    """µs a call of ``fn(i)`` (i in range(calls)) captured in one CUDA graph: the fastest of
    ``replays`` timed replays. The calls run once first, outside the capture, on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return min(times)


def time_product(lt: LtMatmul, x: torch.Tensor, weights: Sequence[torch.Tensor], out: torch.Tensor,
                 algo: _HeuristicResult | None, calls: int, replays: int = 3,
                 between: Callable[[], object] | None = None) -> float:
    """``graph_us`` of ``out = x @ w.T`` over ``weights`` in turn, each after ``between()`` (a small
    kernel, as the engine runs a norm or an activation between its linears): by ``algo``, or with
    None by ``torch.mm`` (cuBLAS's own pick)."""

    def call(i: int) -> None:
        if between is not None:
            between()
        w = weights[i % len(weights)]
        if algo is None:
            torch.mm(x, w.t(), out=out)
        else:
            lt.matmul(x, w, out, algo)

    return graph_us(call, calls, replays)
