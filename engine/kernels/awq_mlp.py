"""A gated MLP's AWQ linears and its SiLU-and-mul in one persistent launch for 1-4 tokens:
``awq_mlp`` (Gluon, Hopper).

``down(silu(gate) * up)`` of ``gate_up = x W_gu`` is, as separate launches, ``awq_mma`` over the
gate_up weight, the SiLU-and-mul kernel and ``awq_mma`` over the down weight: each launch starts
its weight stream from nothing and drains it before the next can use the result. Here one grid of
programs works through both linears' items (a 128-column block of a K split, as ``awq_mma``'s
programs) in one ordered list, gate_up's first, each program claiming its next item while the
current one's last tile streams, so the weight stream runs on across the boundary between the
two linears:

- A gate_up item is ``awq_mma``'s program: its activations come by TMA with its weight tiles, its
  split-K partials are summed by the last program of its column block to arrive, which then
  counts the block done for the down split that reads those features (``ready[s]``).
- A down item requests its first weight tile, then waits until every gate and up block of its K
  split is done (its ``ready`` count), forms ``silu(gate) * up`` for its K rows from gate_up's
  output into shared memory (the SiLU-and-mul kernel's arithmetic: bit-identical) and streams
  the rest of its weight against it. Its partials are summed as ``awq_mma``'s.

Items are claimed in list order from a counter, so an item waits only for items already claimed
by running programs: no residency assumption, no deadlock. The counters (``arrival_counters``)
are reset by the programs that use them last. Splits and tiles are ``awq_mma``'s for the same
shapes (``mma_config``), so the result is bit-identical to the three launches.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from engine.kernels.awq_mma import BLOCK_K, HAVE_GLUON, WARPS, mma_config, mma_supported
from engine.kernels.counters import arrival_counters
from engine.kernels.pdl import pdl_args

# Tokens the fused MLP takes: gate_up's activation rows for the down items are formed for these.
MLP_MAX_TOKENS = 4
# Weight tiles in flight a program (a ring across items); every item must have at least this many.
STAGES = int(os.environ.get("SLUICE_AWQ_MLP_STAGES", "4"))
# Programs an SM: awq_mma's 4 at 1-4 tokens, fewer where the ring does not fit 4 times.
SMEM_PER_SM = 227 * 1024
_ENABLED = os.environ.get("SLUICE_AWQ_MLP", "1") != "0"

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    from engine.kernels.awq_mma import (
        _cta_barrier,
        _descriptors,
        _group,
        _load_scales,
        _mma_layout,
        _operand_layout,
        _out_layout,
        _pdl_wait,
        _store_split_k,
        _tma_load,
    )

from engine.kernels.awq_gemm import _check_shapes, _num_sms  # noqa: E402


class _Plan(NamedTuple):
    gu_kps: int  # K rows a gate_up item
    gu_split: int
    d_kps: int  # K rows a down item
    d_split: int


def _plan(m: int, gate_up: tuple[torch.Tensor, ...], down: tuple[torch.Tensor, ...], num_sms: int) -> _Plan:
    """awq_mma's splits for both linears (``mma_config``): the same partials, so the same bits."""
    gu_k, gu_n = gate_up[0].shape[0], gate_up[0].shape[1] * 8
    d_k, d_n = down[0].shape[0], down[0].shape[1] * 8
    gu_cfg, d_cfg = mma_config(m, gu_n, gu_k, num_sms), mma_config(m, d_n, d_k, num_sms)
    assert gu_cfg.halves == d_cfg.halves == 1 and gu_cfg.num_stages == d_cfg.num_stages == 2
    gu_kps = triton.cdiv(gu_k // BLOCK_K, gu_cfg.split_k) * BLOCK_K
    d_kps = triton.cdiv(d_k // BLOCK_K, d_cfg.split_k) * BLOCK_K
    return _Plan(gu_kps, triton.cdiv(gu_k, gu_kps), d_kps, triton.cdiv(d_k, d_kps))


def mlp_supported(x: torch.Tensor, gate_up: tuple[torch.Tensor, ...], down: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``awq_mlp`` takes these: up to 4 tokens, both linears ``awq_mma``'s (``mma_supported``),
    gate_up [K, 2 I] and down [I, N] with I a multiple of 128, and splits of equal length with at
    least ``STAGES`` K tiles an item. ``SLUICE_AWQ_MLP=0`` in the environment at start-up turns it
    off (the three launches then run)."""
    if not (_ENABLED and x.dim() == 2 and 1 <= x.shape[0] <= MLP_MAX_TOKENS):
        return False
    gu_k, gu_n, gu_group = gate_up[0].shape[0], gate_up[0].shape[1] * 8, gate_up[0].shape[0] // gate_up[1].shape[0]
    d_k, d_group = down[0].shape[0], down[0].shape[0] // down[1].shape[0]
    inter = gu_n // 2
    if not (gu_k == x.shape[1] and d_k == inter and inter % BLOCK_K == 0
            and mma_supported(x, gate_up[0], gu_group) and mma_supported(x, down[0], d_group)):
        return False
    plan = _plan(x.shape[0], gate_up, down, _num_sms(x.device))
    return (gu_k % plan.gu_kps == 0 and d_k % plan.d_kps == 0
            and min(plan.gu_kps, plan.d_kps) >= STAGES * BLOCK_K)


def awq_mlp(x: torch.Tensor, gate_up: tuple[torch.Tensor, ...], down: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x`` [M, K] -> ``down(silu(gate) * up)`` [M, N] in x's dtype, ``gate_up`` and ``down`` each
    ``(qweight, qzeros, scales)`` as AWQ stores them (gate_up: gate's columns, then up's). Needs
    ``mlp_supported``."""
    assert mlp_supported(x, gate_up, down), "awq_mlp does not take these activations or weights"
    m, hidden = x.shape
    gu_k, gu_n, gu_group = _check_shapes(*gate_up)
    d_k, d_n, d_group = _check_shapes(*down)
    num_sms = _num_sms(x.device)
    plan = _plan(m, gate_up, down, num_sms)
    gu_tiles, d_tiles = gu_n // (64 * WARPS), d_n // (64 * WARPS)
    items = gu_tiles * plan.gu_split + d_tiles * plan.d_split
    gu_out = torch.empty((m, gu_n), dtype=x.dtype, device=x.device)
    act = torch.empty((m, gu_n // 2), dtype=x.dtype, device=x.device)
    out = torch.empty((m, d_n), dtype=x.dtype, device=x.device)
    gu_partial = torch.empty((plan.gu_split, m, gu_n), dtype=torch.float32, device=x.device) if plan.gu_split > 1 \
        else gu_out
    d_partial = torch.empty((plan.d_split, m, d_n), dtype=torch.float32, device=x.device) if plan.d_split > 1 else out
    x_desc, wg_desc = _descriptors(x, gate_up[0], 8, BLOCK_K)
    act_desc, wd_desc = _descriptors(act, down[0], 8, BLOCK_K)
    counters = arrival_counters(x.device, gu_tiles + d_tiles + gu_tiles + 2)
    # Shared memory a program: the ring (a weight and an activation tile a slot) and a down item's
    # activation tiles.
    smem = STAGES * BLOCK_K * (8 * WARPS * 4 + 8 * 2) + plan.d_kps * 8 * 2 + 1024
    per_sm = min(4, SMEM_PER_SM // smem)
    _awq_mlp_kernel[(min(items, per_sm * num_sms),)](
        x_desc, act_desc, wg_desc, wd_desc, gate_up[1], gate_up[2], down[1], down[2], gu_out, gu_partial, act, out,
        d_partial, counters, m,
        HIDDEN=hidden, INTER=gu_n // 2, N_OUT=d_n, GU_GROUP=gu_group, D_GROUP=d_group, GU_KPS=plan.gu_kps,
        GU_SPLIT=plan.gu_split, D_KPS=plan.d_kps, D_SPLIT=plan.d_split, STAGES=STAGES, num_warps=WARPS,
        **pdl_args(x.device),
    )
    return out


if HAVE_GLUON:
    _BLOCK_K, _WARPS = gl.constexpr(BLOCK_K), gl.constexpr(WARPS)
    _BLOCK_T = gl.constexpr(8)  # the MMA's narrow side: up to 8 tokens
    _ROWS = gl.constexpr(MLP_MAX_TOKENS)

    @gluon.jit
    def _item(item, HIDDEN: gl.constexpr, INTER: gl.constexpr, N_OUT: gl.constexpr, GU_KPS: gl.constexpr,
              GU_SPLIT: gl.constexpr, D_KPS: gl.constexpr):
        """Item ``item`` of the list -> (is it gate_up's, column block, K split, first K row, K tiles)."""
        GU_TILES: gl.constexpr = 2 * INTER // (64 * _WARPS)
        D_TILES: gl.constexpr = N_OUT // (64 * _WARPS)
        is_gu = item < GU_TILES * GU_SPLIT
        if is_gu:
            n = item % GU_TILES
            s = item // GU_TILES
            k_lo = s * GU_KPS
            n_k = (gl.minimum(k_lo + GU_KPS, HIDDEN) - k_lo) // _BLOCK_K
        else:
            d = item - GU_TILES * GU_SPLIT
            n = d % D_TILES
            s = d // D_TILES
            k_lo = s * D_KPS
            n_k = (gl.minimum(k_lo + D_KPS, INTER) - k_lo) // _BLOCK_K
        return is_gu, n, s, k_lo, n_k

    @gluon.jit
    def _fence_proxy_global():
        """Generic-proxy global writes (the SiLU-and-mul's output) ordered with TMA's reads."""
        gl.inline_asm_elementwise("fence.proxy.async.global; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _silu_and_mul_block(act_ptr, gu_ptr, b, M, INTER: gl.constexpr):
        """``silu(gate) * up`` of features 128 b .. 128 b + 127 for the M tokens, from gate_up's
        output (written by other programs: read from L2) to ``act_ptr`` [M, INTER]: the
        SiLU-and-mul kernel's arithmetic, so the same bits."""
        L: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [_WARPS, 1], [1, 0])
        row = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, L))
        col = b * _BLOCK_K + gl.arange(0, _BLOCK_K, layout=gl.SliceLayout(0, L))
        ok = (row < M)[:, None] & (col < INTER)[None, :]
        offs = row[:, None] * (2 * INTER) + col[None, :]
        gate = gl.load(gu_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
        up = gl.load(gu_ptr + offs + INTER, mask=ok, other=0.0, cache_modifier=".cg")
        g, u = gate.to(gl.float32), up.to(gl.float32)
        act = g / (1.0 + gl.exp(-g)) * u
        gl.store(act_ptr + row[:, None] * INTER + col[None, :], act.to(gate.dtype), mask=ok)

    @gluon.jit
    def _produce(P, p_item, p_t, queued, counters_ptr, CLAIM: gl.constexpr, ITEMS: gl.constexpr, bars, w_smem, x_smem,
                 x_desc, wg_desc, wd_desc, with_x: gl.constexpr, HIDDEN: gl.constexpr, INTER: gl.constexpr,
                 N_OUT: gl.constexpr, GU_KPS: gl.constexpr, GU_SPLIT: gl.constexpr, D_KPS: gl.constexpr,
                 STAGES: gl.constexpr):
        """Request the producer's next weight tile (tile ``p_t`` of item ``p_item``) into ring slot
        P % STAGES, with its activations for a gate_up tile (``with_x``: false before the PDL wait),
        and move on; past the item's last tile claim the next item (-> ``queued``, the item this
        program consumes after the current one). Returns (P, p_item, p_t, queued)."""
        W_BYTES: gl.constexpr = _BLOCK_K * 8 * _WARPS * 4
        X_BYTES: gl.constexpr = _BLOCK_T * _BLOCK_K * 2
        is_gu, n, s, k_lo, n_k = _item(p_item, HIDDEN, INTER, N_OUT, GU_KPS, GU_SPLIT, D_KPS)
        slot = P % STAGES
        bar = bars.index(slot)
        live = p_item < ITEMS
        k = k_lo + p_t * _BLOCK_K
        fence_async_shared()  # the slot's last reads (a step ago) before the async write
        if is_gu:
            mbarrier.expect(bar, W_BYTES + X_BYTES, pred=live)
            _tma_load(wg_desc, [k, n * 8 * _WARPS], bar, w_smem.index(slot), pred=live)
            if with_x:
                _tma_load(x_desc, [0, k], bar, x_smem.index(slot), pred=live)
        else:
            mbarrier.expect(bar, W_BYTES, pred=live)
            _tma_load(wd_desc, [k, n * 8 * _WARPS], bar, w_smem.index(slot), pred=live)
        p_t += 1
        if live & (p_t >= n_k):
            p_item = gl.atomic_add(counters_ptr + CLAIM, 1, sem="relaxed", scope="gpu")
            queued = p_item
            p_t = p_t * 0
        return P + 1, p_item, p_t, queued

    @gluon.jit
    def _awq_mlp_kernel(x_desc, act_desc, wg_desc, wd_desc, gz_ptr, gs_ptr, dz_ptr, ds_ptr, gu_ptr, gu_partial_ptr,
                        act_ptr, out_ptr, d_partial_ptr, counters_ptr, M,
                        HIDDEN: gl.constexpr, INTER: gl.constexpr, N_OUT: gl.constexpr, GU_GROUP: gl.constexpr,
                        D_GROUP: gl.constexpr, GU_KPS: gl.constexpr, GU_SPLIT: gl.constexpr, D_KPS: gl.constexpr,
                        D_SPLIT: gl.constexpr, STAGES: gl.constexpr = 4, USE_PDL: gl.constexpr = False):
        """A persistent grid, 2 warps a program (see the module docstring). Items: gate_up's
        (column block n, split s) at s * GU_TILES + n, then down's at GU_ITEMS + s * D_TILES + n
        (split-major: the first down items read the first features); every item has at least
        STAGES K tiles.

        Weight tiles run through a ring of STAGES slots, requested STAGES - 1 tiles ahead of the
        tile being computed across item boundaries: a down item's weight streams while it waits
        for its features. A program claims its first item and requests that item's first STAGES - 1
        weight tiles before the PDL wait (their activations after it); it claims each next item
        when it requests the current one's last tile. A gate_up tile's activations come with its
        weight (same slot and mbarrier); a down item, once each of its feature blocks is formed
        (``ready``), requests all its activation tiles at once (one mbarrier each).

        Counters at ``counters_ptr``, each zero again when the launch ends: gate_up's split-K
        arrivals [GU_TILES] and down's [D_TILES] (reset by their last arrivals), ``pair``
        [INTER / 128] (gate's and up's column block b summed: the second forms features 128 b ..),
        ``ready`` [INTER / 128] (feature block b formed), the claim counter and the exit counter
        (these four zeroed by the last program to exit)."""
        DTYPE: gl.constexpr = x_desc.dtype
        W: gl.constexpr = _WARPS
        MMA: gl.constexpr = _mma_layout(W)
        GU_N: gl.constexpr = 2 * INTER
        GU_TILES: gl.constexpr = GU_N // (64 * W)
        D_TILES: gl.constexpr = N_OUT // (64 * W)
        GU_ITEMS: gl.constexpr = GU_TILES * GU_SPLIT
        ITEMS: gl.constexpr = GU_ITEMS + D_TILES * D_SPLIT
        PAIR: gl.constexpr = GU_TILES + D_TILES
        READY: gl.constexpr = PAIR + GU_TILES // 2
        CLAIM: gl.constexpr = READY + GU_TILES // 2
        EXIT: gl.constexpr = CLAIM + 1
        D_KT: gl.constexpr = D_KPS // _BLOCK_K  # a down item's K tiles, at most
        X_BYTES: gl.constexpr = _BLOCK_T * _BLOCK_K * 2
        KSPLIT: gl.constexpr = 2  # two MMA chains a tile (8 tokens, 128-row stages), as awq_mma

        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, _BLOCK_K, 8 * W], wg_desc.layout)
        x_smem = gl.allocate_shared_memory(DTYPE, [STAGES, _BLOCK_T, _BLOCK_K], x_desc.layout)
        a_smem = gl.allocate_shared_memory(DTYPE, [D_KT, _BLOCK_T, _BLOCK_K], act_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        a_bars = gl.allocate_shared_memory(gl.int64, [D_KT, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        for i in gl.static_range(D_KT):
            mbarrier.init(a_bars.index(i), count=1)
        fence_async_shared()

        # The claim counter is only this kernel's, and the previous launch finished before the
        # kernel ahead of this one passed its wait (a norm at least runs between two MLPs):
        # claimed before the wait. The first item's first STAGES - 1 weight tiles too.
        item = gl.atomic_add(counters_ptr + CLAIM, 1, sem="relaxed", scope="gpu")
        P = item * 0
        p_item = item
        p_t = item * 0
        queued = item * 0 + ITEMS
        for _ in gl.static_range(STAGES - 1):
            P, p_item, p_t, queued = _produce(P, p_item, p_t, queued, counters_ptr, CLAIM, ITEMS, bars, w_smem,
                                              x_smem, x_desc, wg_desc, wd_desc, False, HIDDEN, INTER, N_OUT, GU_KPS,
                                              GU_SPLIT, D_KPS, STAGES)
        if USE_PDL:
            _pdl_wait()
        first_gu, _n0, _s0, first_k, _nk0 = _item(item, HIDDEN, INTER, N_OUT, GU_KPS, GU_SPLIT, D_KPS)
        for i in gl.static_range(STAGES - 1):  # the first item has at least STAGES tiles
            _tma_load(x_desc, [0, first_k + i * _BLOCK_K], bars.index(i), x_smem.index(i),
                      pred=first_gu & (item < ITEMS))

        rows = gl.arange(0, 64 * W, layout=gl.SliceLayout(1, MMA))
        c = (rows // 8) % 2 + 2 * (rows // (16 * W))
        zero_shift = 4 * (c // 2 + 4 * (c % 2))
        ones = gl.full([16 * W, _BLOCK_K // KSPLIT], 1.0, DTYPE, layout=_operand_layout(W, 0))
        OUT_L: gl.constexpr = _out_layout(W, _BLOCK_T)

        g = 0  # tiles this program has consumed: the next is in slot g % STAGES, phase (g // STAGES) & 1
        d_phase = 0  # down items this program has consumed, mod 2: the activation barriers' phase
        while item < ITEMS:
            is_gu, n, s, k_lo, n_k = _item(item, HIDDEN, INTER, N_OUT, GU_KPS, GU_SPLIT, D_KPS)
            w0 = n * 8 * W
            if is_gu:
                zeros_ptr = gz_ptr
                scales_ptr = gs_ptr
                n_cols = GU_N
                group = GU_GROUP
            else:
                zeros_ptr = dz_ptr
                scales_ptr = ds_ptr
                n_cols = N_OUT
                group = D_GROUP
            word = w0 + 8 * ((rows // 16) % W) + rows % 8
            z_next = gl.load(zeros_ptr + (k_lo // group) * (n_cols // 8) + word)
            s_next = _load_scales(scales_ptr, (k_lo // group) * n_cols + 8 * w0, W, MMA)
            if not is_gu:  # each feature block once it is formed, all of them in flight together
                for t in range(n_k):
                    b = k_lo // _BLOCK_K + t
                    ready = gl.atomic_add(counters_ptr + READY + b, 0, sem="acquire", scope="gpu")
                    while ready == 0:
                        ready = gl.atomic_add(counters_ptr + READY + b, 0, sem="acquire", scope="gpu")
                    _fence_proxy_global()
                    mbarrier.expect(a_bars.index(t), X_BYTES)
                    _tma_load(act_desc, [0, k_lo + t * _BLOCK_K], a_bars.index(t), a_smem.index(t))
            acc = gl.zeros([64 * W, _BLOCK_T], gl.float32, layout=MMA)
            for t in range(n_k):
                P, p_item, p_t, queued = _produce(P, p_item, p_t, queued, counters_ptr, CLAIM, ITEMS, bars,
                                                  w_smem, x_smem, x_desc, wg_desc, wd_desc, True, HIDDEN, INTER,
                                                  N_OUT, GU_KPS, GU_SPLIT, D_KPS, STAGES)
                z_cur, s_cur = z_next, s_next
                k_ahead = k_lo + gl.minimum(t + 1, n_k - 1) * _BLOCK_K  # in bounds; unused after the last
                z_next = gl.load(zeros_ptr + (k_ahead // group) * (n_cols // 8) + word)
                s_next = _load_scales(scales_ptr, (k_ahead // group) * n_cols + 8 * w0, W, MMA)

                mbarrier.wait(bars.index(g % STAGES), (g // STAGES) & 1)
                if is_gu:
                    acc = _group(acc, w_smem.index(g % STAGES), x_smem.index(g % STAGES), z_cur, s_cur, zero_shift,
                                 ones, DTYPE, W, _BLOCK_T, MMA, KSPLIT)
                else:
                    mbarrier.wait(a_bars.index(t), d_phase)
                    acc = _group(acc, w_smem.index(g % STAGES), a_smem.index(t), z_cur, s_cur, zero_shift, ones,
                                 DTYPE, W, _BLOCK_T, MMA, KSPLIT)
                g += 1

            out = gl.permute(acc.reshape([4, W, 2, 8, _BLOCK_T]), (4, 1, 3, 0, 2)).reshape([_BLOCK_T, 64 * W])
            out = gl.convert_layout(out, OUT_L, assert_trivial=True)
            if is_gu:
                last = _store_split_k(out, gu_ptr, gu_partial_ptr, counters_ptr, n, 0, n * 64 * W, M, GU_N, s,
                                      GU_SPLIT, OUT_L, _BLOCK_T, OUT_L, FEW_TOKENS=True)
                if last:  # gate's or up's column block b is summed; the second of the two forms b's features
                    b = n % (GU_TILES // 2)
                    _cta_barrier()
                    paired = gl.atomic_add(counters_ptr + PAIR + b, 1, sem="acq_rel", scope="gpu")
                    if paired == 1:
                        _silu_and_mul_block(act_ptr, gu_ptr, b, M, INTER)
                        _fence_proxy_global()
                        _cta_barrier()
                        gl.atomic_add(counters_ptr + READY + b, 1, sem="release", scope="gpu")
            else:
                _cta_barrier()  # both warps are done with the activation tiles before the next item's requests
                d_phase ^= 1
                _store_split_k(out, out_ptr, d_partial_ptr, counters_ptr, GU_TILES + n, 0, n * 64 * W, M, N_OUT, s,
                               D_SPLIT, OUT_L, _BLOCK_T, OUT_L, FEW_TOKENS=True)
            item = queued

        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        for i in gl.static_range(D_KT):
            mbarrier.invalidate(a_bars.index(i))
        exited = gl.atomic_add(counters_ptr + EXIT, 1, sem="acq_rel", scope="gpu")
        if exited == gl.num_programs(0) - 1:  # every program is done with the counters: zero them
            ZL: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
            for z0 in range(PAIR, EXIT + 1, 32 * W):
                slot = z0 + gl.arange(0, 32 * W, layout=ZL)
                gl.store(counters_ptr + slot, gl.zeros([32 * W], gl.int32, layout=ZL), mask=slot <= EXIT)
