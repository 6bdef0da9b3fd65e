"""Kernels that read before their PDL wait (engine/kernels/pdl.py): the decode split kernel (the
request's length, block table and first tile of cached keys and values), the rotary + cache
write kernel (the token's position, slot, cos/sin rows and norm weights) and the GEMV's one-tile
slab (its weights, and the norm's weight when it takes the RMSNorm before it). The interpreter
runs them without PDL (tests/test_kernels_attention.py, test_kernels_fused.py, test_gemv.py check
their numbers, including the decode kernel's re-read of the new token's key and value after the
wait); here each is compiled for sm_90 with PDL on, in a process of its own (see
tests/sm90_compile.py), and its PTX must issue global loads before ``griddepcontrol.wait`` and
read the rest after it. Also: which prologue order a launch gets inside and outside
``trigger_before_wait``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_COMPILE = """
import importlib, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
fn = getattr(importlib.import_module("engine.kernels.{module}"), "{kernel}")
sig = {{a: "i32" for a in fn.arg_names}} | {pointers} | {{k: "constexpr" for k in {consts}}}
kernel = triton.compile(ASTSource(fn, sig, {consts}), target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4}})
ptx = kernel.asm["ptx"]
wait = ptx.index("griddepcontrol.wait")
print(json.dumps([ptx[:wait].count("ld.global"), ptx[wait:].count("ld.global"),
                  ptx.index("griddepcontrol.launch_dependents") < wait, ptx.count("griddepcontrol.wait")]))
"""

_DECODE = dict(
    module="decode_attention", kernel="_decode_split_kernel",
    pointers={**{p: "*bf16" for p in ("q_ptr", "key_cache_ptr", "value_cache_ptr", "out_ptr")},
              "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32",
              **{p: "*i32" for p in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "order_ptr")}},
    consts=dict(GROUP=4, BLOCK_H=16, BLOCK_N=64, HEAD_DIM=128, BLOCK_SIZE=16, NUM_SPLITS=16, USE_WINDOW=False,
                DOT_PRECISION="tf32", MIXED=False, HAS_ORDER=True, USE_PDL=True),
)
_ROPE = dict(
    module="rotary", kernel="_rope_and_cache_kernel",
    pointers={**{p: "*bf16" for p in ("q_ptr", "k_ptr", "v_ptr", "q_norm_ptr", "k_norm_ptr", "key_cache_ptr",
                                      "value_cache_ptr")},
              "cos_ptr": "*fp32", "sin_ptr": "*fp32", "eps": "fp32",
              "positions_ptr": "*i64", "slot_mapping_ptr": "*i64"},
    consts=dict(NORM=True, BLOCK_SIZE=16, BLOCK_HQ=16, BLOCK_HK=8, BLOCK_HALF=64, USE_PDL=True),
)


_GEMV_SLAB = dict(
    module="gemv", kernel="_gemv_kernel",
    pointers={"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16"},
    consts=dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=1024, SPLIT_K=1, EVEN_K=True, SILU_MUL=False, SLAB=True, NORM=False,
                HAS_RESIDUAL=False, USE_PDL=2),
)
_GEMV_SLAB_NORM = dict(
    _GEMV_SLAB, pointers={**_GEMV_SLAB["pointers"], "residual_ptr": "*bf16", "norm_w_ptr": "*bf16",
                          "sum_ptr": "*bf16", "eps": "fp32"},
    consts={**_GEMV_SLAB["consts"], "NORM": True, "HAS_RESIDUAL": True},
)


def _compile(case: dict) -> tuple[int, int, bool, int]:
    """Global loads before and after the (first) PDL wait in the PTX, whether the next kernel may be
    placed before it, and how many waits the PTX has."""
    code = _COMPILE.format(**case)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    before, after, trigger_first, waits = json.loads(done.stdout.strip().splitlines()[-1])
    return before, after, trigger_first, waits


@pytest.mark.parametrize("case", [_DECODE, _ROPE], ids=["decode_split", "rope_and_cache"])
def test_kernel_reads_inputs_before_the_pdl_wait(case: dict) -> None:
    before, after, trigger_first, _ = _compile(case)
    # decode: order, length, block table, keys, values; rope: position, slot, cos, sin, weights.
    assert before >= 5, f"{before} global loads before the PDL wait"
    # What the kernel ahead writes (q, and k and v or the new token's key and value) comes after.
    assert after >= 2, f"{after} global loads after the PDL wait"
    assert not trigger_first  # USE_PDL=True: wait, then let the next kernel be placed


_DECODE_REDUCE = dict(
    module="decode_attention", kernel="_decode_reduce_kernel",
    pointers={"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16", "query_start_loc_ptr": "*i32",
              "seq_lens_ptr": "*i32"},
    consts=dict(NUM_SPLITS=16, SPLITS_P2=16, HEAD_DIM=128, BLOCK_N=64, USE_WINDOW=False, MIXED=True, USE_PDL=True),
)


@pytest.mark.parametrize("case", [{**_DECODE, "consts": {**_DECODE["consts"], "MIXED": True}}, _DECODE_REDUCE],
                         ids=["decode_split", "decode_reduce"])
def test_mixed_batch_rows_left_to_prefill_wait_before_they_exit(case: dict) -> None:
    """In a mixed batch the decode kernels' programs of rows that are not decodes exit early; they
    wait first, or a batch without decode rows would finish the kernels before the prefill kernel
    ahead and break the chain's order (engine/kernels/pdl.py): a wait on that exit path and one on
    the main path."""
    assert _compile(case)[3] >= 2


def test_gemv_slab_requests_its_weight_before_the_wait_and_places_the_next_kernel_first() -> None:
    """engine/kernels/gemv.py's one-tile slab under ``trigger_before_wait`` (USE_PDL=2): the
    weight loads come before the wait, the activations after it, and the next kernel may be
    placed before this one waits. With the RMSNorm inside, the norm weight's loads join those
    before the wait and the residual's those after it."""
    before, after, trigger_first, _ = _compile(_GEMV_SLAB)
    # 4 rows x 1024 bf16 over 128 threads: at least one 16-byte load per thread and row pair.
    assert before >= 2, f"{before} global loads before the PDL wait"
    assert after >= 1, f"{after} global loads after the PDL wait"
    assert trigger_first
    norm_before, norm_after, trigger_first, _ = _compile(_GEMV_SLAB_NORM)
    assert norm_before > before and norm_after > after, (before, after, norm_before, norm_after)
    assert trigger_first


def test_trigger_before_wait_orders_the_prologue_of_kernels_launched_inside(monkeypatch) -> None:
    from engine.kernels import pdl

    monkeypatch.setattr(pdl, "_enabled", lambda device: True)
    device = torch.device("cpu")
    assert pdl.pdl_args(device) == {"USE_PDL": pdl.WAIT_FIRST, "launch_pdl": True}
    with pytest.raises(RuntimeError, match="inside"):
        with pdl.trigger_before_wait():
            assert pdl.pdl_args(device)["USE_PDL"] == pdl.TRIGGER_FIRST
            with pdl.trigger_before_wait():
                assert pdl.pdl_args(device)["USE_PDL"] == pdl.TRIGGER_FIRST
            assert pdl.pdl_args(device)["USE_PDL"] == pdl.TRIGGER_FIRST
            raise RuntimeError("inside")
    assert pdl.pdl_args(device)["USE_PDL"] == pdl.WAIT_FIRST
    assert pdl.pdl_args(device, trigger_first=True)["USE_PDL"] == pdl.TRIGGER_FIRST
    monkeypatch.setattr(pdl, "_enabled", lambda device: False)
    with pdl.trigger_before_wait():
        assert pdl.pdl_args(device) == {}  # no PDL: plain launches either way


@pytest.mark.parametrize("num_tokens", [1, 2, 5])
def test_rotary_places_decode_attention_ahead_for_one_token_only(monkeypatch, num_tokens: int) -> None:
    """The rotary + cache write kernel lets the next kernel be placed before it waits on a step of
    one token (a one-request decode: decode attention's loads before its wait then overlap the
    qkv projection), and waits first on any other."""
    from engine.kernels import pdl, rotary

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs["USE_PDL"], kwargs["launch_pdl"]))

    monkeypatch.setattr(pdl, "_enabled", lambda device: True)
    monkeypatch.setattr(rotary, "_rope_and_cache_kernel", Recorder())
    q, k, v = torch.zeros(num_tokens, 4, 8), torch.zeros(num_tokens, 2, 8), torch.zeros(num_tokens, 2, 8)
    cache = torch.zeros(4, 16, 2, 8)
    cos_sin = torch.zeros(32, 4)
    positions = torch.arange(num_tokens)
    rotary.rope_and_cache(positions, q, k, v, cos_sin, cos_sin, cache, cache.clone(), positions)
    assert launches == [((num_tokens,), pdl.TRIGGER_FIRST if num_tokens == 1 else pdl.WAIT_FIRST, True)]
