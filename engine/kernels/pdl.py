"""Programmatic dependent launch (PDL) for sluice's Triton kernels on Hopper and newer GPUs.

A decode step is hundreds of small kernels back to back; between two of them the GPU spends
about a microsecond launching the second after the first has drained, even inside a CUDA graph.
Launched with PDL, a kernel's programs are placed on the SMs as soon as every program of the
kernel before it has let them (``griddepcontrol.launch_dependents``), and wait there
(``griddepcontrol.wait``) until that kernel has finished and its writes are visible: the launch
overlaps the previous kernel's work.

Every kernel launched with ``pdl_args`` calls ``pdl_prologue`` before it writes memory or reads
anything a kernel of the step writes. A kernel finishes only after its own wait, so one whose
wait returns finds every kernel before it finished: plain launches' order, whichever way the
prologue orders its two instructions:

- wait, then let the next kernel be placed (the default): only the kernel ahead can still be
  running while a kernel's programs start.
- let the next kernel be placed, then wait (inside ``trigger_before_wait()``, or launched with
  ``pdl_args(device, trigger_first=True)``): the placement runs ahead through a chain of kernels
  as far as the SMs have room, each waiting at its prologue.
  This pays when every linear of the chain can request its whole weight before its wait (a
  small model's one-token decode, engine/kernels/gemv.py's slab): the weights then stream while
  the small kernels between the linears (norms, rotary, attention) run. Where a linear's weight
  does not fit, waiting programs only hold SM room that the running kernel needs, and kernels
  placed while another fills the GPU likely land unevenly on the SMs (on an H200, every kernel
  placing ahead made Llama-3.1-8B's one-token step 6% slower in bf16 and 29% slower in AWQ;
  docs/benchmarks.md, session 22).

On a step of one token (a one-request decode), graph or eager, the rotary + cache write kernel
places the next before it waits. The decode attention kernel after it reads its block table and
first keys and values before its wait (below); placed while rotary still waits for the qkv
projection, it has those loads done when rotary finishes (Llama-3.1-8B AWQ's one-token step
2.050 -> 2.007 ms on an H200, docs/benchmarks.md, session 26). Placing an AWQ linear's programs
early that way made that step slower: after the SiLU 0.6%, after the input RMSNorm 1.8%, after
the post-attention one 23%.

That order holds along the chain only if every kernel has a program that waits: a program may
exit before its wait (work it finds it has none of) only where another program of the same
launch surely waits.

What may be read before the wait is what no kernel of the step writes: weights, the step's
inputs that the host copied in before the first kernel, and the KV cache of earlier steps (the
decode split kernel reads its first tile of keys and values there, the rotary kernels their
positions and cos/sin rows, the GEMV its weight slab, RMSNorm its weight; the AWQ kernels request
weight tiles).
The AWQ kernels (Gluon) always wait first. Kernels that are not Triton's (cuBLAS, PyTorch) launch
as before and are waited for in full. ``SLUICE_PDL=0`` turns PDL off.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

# Values of a kernel's USE_PDL besides 0 (off): its prologue's order.
WAIT_FIRST = 1
TRIGGER_FIRST = 2

_trigger_first = False


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """Wait for the kernel before this one (all of it, its writes visible) and let the kernel
    after this one be placed, in the order USE_PDL names: call before a kernel's first store and
    its first read of anything a kernel of the step writes (see the module docstring)."""
    if USE_PDL == 2:  # TRIGGER_FIRST
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    elif USE_PDL:
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


def pdl_args(device: torch.device, trigger_first: bool = False) -> dict[str, int | bool]:
    """Launch options for a kernel that calls ``pdl_prologue``: PDL on GPUs that have it, the
    prologue letting the next kernel be placed before it waits with ``trigger_first`` or inside
    ``trigger_before_wait()``."""
    if not _enabled(device):
        return {}
    return {"USE_PDL": TRIGGER_FIRST if trigger_first or _trigger_first else WAIT_FIRST, "launch_pdl": True}


@contextlib.contextmanager
def trigger_before_wait() -> Iterator[None]:
    """Kernels launched (or captured into a CUDA graph) inside let the next kernel be placed
    before they wait (see the module docstring for when that pays)."""
    global _trigger_first
    saved, _trigger_first = _trigger_first, True
    try:
        yield
    finally:
        _trigger_first = saved
