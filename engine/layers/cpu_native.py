"""sluice's own CPU kernels (engine/layers/cpu_gemm.cpp), compiled on first use and called
through ctypes.

The source is compiled once per machine with the system C++ compiler (``$CXX``, default ``g++``)
into ``$SLUICE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/sluice``, else ``~/.cache/sluice``; the
temporary directory when that is not writable), under a name that hashes the source and the
flags, so a changed source builds anew and concurrent first uses never see a half-written file.
It needs an x86-64 CPU with AVX2, FMA and F16C; without one, or without a compiler, or with
``SLUICE_CPU_KERNELS=0``, ``available()`` is False and callers use torch's kernels. The OpenMP
runtime it links is the one torch has already loaded (same soname), so the two share one pool of
threads. ctypes releases the GIL for the call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_gemm.cpp")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_CPU_FLAGS = ("avx2", "fma", "f16c")


def available() -> bool:
    return _library() is not None


def gemm_f16_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for ``x [M, K]`` float32 and ``weight [N, K]`` float16 (both contiguous, CPU):
    float32 ``[M, N]``, each row the same bits whatever M (engine/layers/cpu_gemm.cpp)."""
    lib = _library()
    assert lib is not None, "engine/layers/cpu_native.py: kernels not available"
    # On every linear of every step: attribute checks only (Tensor.device alone costs ~2 us).
    x_shape, w_shape = x.shape, weight.shape
    if (x.dtype != torch.float32 or weight.dtype != torch.float16 or len(x_shape) != 2 or len(w_shape) != 2
            or x_shape[1] != w_shape[1] or not (x.is_cpu and weight.is_cpu) or not weight.is_contiguous()):
        raise ValueError(f"gemm_f16_weight needs x [M, K] float32 and a contiguous weight [N, K] float16 on the "
                         f"CPU, got {tuple(x_shape)} {x.dtype} {x.device} and {tuple(w_shape)} {weight.dtype} "
                         f"{weight.device}")
    x = x.contiguous()
    m, k = x_shape
    out = torch.empty(m, w_shape[0], dtype=torch.float32)
    if m:
        lib.sluice_gemm_f16w(x.data_ptr(), weight.data_ptr(), out.data_ptr(), m, k, w_shape[0],
                             torch.get_num_threads())
    return out


def _cpu_has_flags() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in info.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return all(flag in flags for flag in _CPU_FLAGS)
    return False


def _cache_dir() -> Path:
    root = os.environ.get("SLUICE_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(base) / "sluice"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"sluice-{os.getuid()}"


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SLUICE_CPU_KERNELS", "1") == "0" or not _cpu_has_flags():
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        logger.warning("no C++ compiler found: CPU linears use torch's kernels")
        return None
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    directory = _cache_dir()
    path = directory / f"cpu_gemm-{digest}.so"
    try:
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            partial = directory / f".{path.name}.{os.getpid()}"
            start = time.perf_counter()
            subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(partial)], check=True, capture_output=True,
                           text=True, timeout=300)
            os.replace(partial, path)  # atomic: a concurrent first use loads a whole file or builds its own
            logger.info("compiled CPU kernels into %s in %.1f s", path, time.perf_counter() - start)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("cannot build CPU kernels (%s): CPU linears use torch's kernels", str(detail).strip()[:500])
        return None
    lib.sluice_gemm_f16w.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.sluice_gemm_f16w.restype = None
    return lib
