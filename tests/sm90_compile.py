"""Compile one of sluice's AWQ Gluon kernels for sm_90 and print its SASS (used by the kernel
tests through ``sm90_sass``).

It runs in a process of its own: Triton's interpreter, which the other CPU tests run kernels in,
patches ``tl``'s tensor operators process-wide while it interprets, and in one full CI run a
Gluon compile in the test process met those patches (``t0 = pid_t * BLOCK_T`` failing inside the
interpreter's ``__mul__``) although the same files run alone passed."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def compile_sass(module: str, kernel: str, block_t: int, descriptor_args: list, consts: dict, dtype: str,
                 num_warps: int) -> tuple[str, str]:
    """(PTX, SASS) of ``module.kernel`` (arguments x_desc, w_desc, qzeros_ptr, scales_ptr, out_ptr,
    partial_ptr, lock_ptr, then integers and ``consts``), its descriptors from
    ``module._descriptors(x [block_t, K], qweight, *descriptor_args)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    importlib.import_module("engine.kernels.awq_gemm")  # the Gluon modules import from it last
    mod = importlib.import_module(module)
    fn = getattr(mod, kernel)
    torch_dtype = getattr(torch, dtype)
    k, n = consts["K"], consts["N"]
    x_desc, w_desc = mod._descriptors(torch.zeros(block_t, k, dtype=torch_dtype),
                                      torch.zeros(k, n // 8, dtype=torch.int32), block_t, *descriptor_args)
    out_ty = "*bf16" if torch_dtype == torch.bfloat16 else "*fp16"
    types = dict(x_desc=mangle_type(x_desc), w_desc=mangle_type(w_desc), qzeros_ptr="*i32", scales_ptr="*fp16",
                 out_ptr=out_ty, partial_ptr="*fp32", lock_ptr="*i32", attn_out_ptr="*fp32", attn_lse_ptr="*fp32",
                 seq_lens_ptr="*i32")
    if "s_desc" in fn.arg_names:  # awq_wgmma's scale and zero-point descriptors
        groups = k // consts["GROUP"]
        s_desc, z_desc = mod._param_descriptors(torch.zeros(groups, n, dtype=torch.float16),
                                                torch.zeros(groups, n // 8, dtype=torch.int32))
        types |= dict(s_desc=mangle_type(s_desc), z_desc=mangle_type(z_desc))
    # constexpr parameters not in ``consts`` take their defaults, as a launch that leaves them out does
    consts = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default} | consts
    signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in types
             if a in fn.arg_names and types[a].startswith("*")}
    compiled = triton.compile(GluonASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"{kernel}_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink()
    return compiled.asm["ptx"], sass


def sm90_sass(module: str, kernel: str, block_t: int, descriptor_args: list, consts: dict, dtype: torch.dtype,
              num_warps: int) -> tuple[str, str]:
    """``compile_sass`` in a fresh Python process (without TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    request = json.dumps([module, kernel, block_t, descriptor_args, consts, str(dtype).removeprefix("torch."),
                          num_warps])
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "tests.sm90_compile"], input=request, capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ptx, sass = json.loads(done.stdout)
    return ptx, sass


if __name__ == "__main__":
    print(json.dumps(compile_sass(*json.loads(sys.stdin.read()))))
