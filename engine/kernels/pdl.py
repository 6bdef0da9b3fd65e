"""Programmatic dependent launch (PDL) for sluice's Triton kernels on Hopper and newer GPUs.

A decode step is hundreds of small kernels back to back; between two of them the GPU spends
about a microsecond launching the second after the first has drained, even inside a CUDA graph.
Launched with PDL, a kernel's programs are placed on the SMs as soon as every program of the
kernel before it has started, and wait there (``griddepcontrol.wait``) until that kernel has
finished and its writes are visible: the launch overlaps the previous kernel's tail.

Every kernel launched with ``pdl_args`` calls ``pdl_prologue`` before it writes memory or reads
anything the kernel ahead of it could be writing; and since each one waits before it lets the
next be placed, a kernel that starts finds every kernel but the one ahead finished, and one that
finishes implies all before it have: the order plain launches give. What may be read before the
wait is what no kernel of the step writes: weights, the step's inputs that the host copied in
before the first kernel, and the KV cache of earlier steps (the decode split kernel reads its
first tile of keys and values there, the rotary kernels their positions and cos/sin rows; the
AWQ kernels request weight tiles). Kernels that are not Triton's (cuBLAS, PyTorch) launch as
before and are waited for in full. ``SLUICE_PDL=0`` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """Wait for the kernel before this one (all of it, its writes visible), then let the kernel
    after this one be placed: call before a kernel's first store and its first read of anything
    the kernel ahead may write (see the module docstring)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _enabled(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("SLUICE_PDL", "1") == "0":
        return False
    try:  # Triton 3.3 and later: griddepcontrol in the language, launch_pdl at launch
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_args(device: torch.device) -> dict[str, bool]:
    """Launch options for a kernel that calls ``pdl_prologue``: PDL on GPUs that have it."""
    return {"USE_PDL": True, "launch_pdl": True} if _enabled(device) else {}
