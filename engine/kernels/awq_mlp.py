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

import torch
import triton

from engine.kernels.awq_mma import BLOCK_K, HAVE_GLUON, WARPS, mma_config, mma_supported
from engine.kernels.counters import arrival_counters
from engine.kernels.pdl import pdl_args

# Tokens the fused MLP takes: gate_up's activation rows for the down items are formed for these.
MLP_MAX_TOKENS = 4
# Programs an SM: awq_mma's at 1-4 tokens.
PROGRAMS_PER_SM = 4
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


def mlp_supported(x: torch.Tensor, gate_up: tuple[torch.Tensor, ...], down: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``awq_mlp`` takes these: up to 4 tokens, both linears ``awq_mma``'s (``mma_supported``),
    gate_up [K, 2 I] and down [I, N] with I a multiple of 128. ``SLUICE_AWQ_MLP=0`` in the
    environment at start-up turns it off (the three launches then run)."""
    if not (_ENABLED and x.dim() == 2 and 1 <= x.shape[0] <= MLP_MAX_TOKENS):
        return False
    gu_k, gu_n, gu_group = gate_up[0].shape[0], gate_up[0].shape[1] * 8, gate_up[0].shape[0] // gate_up[1].shape[0]
    d_k, d_group = down[0].shape[0], down[0].shape[0] // down[1].shape[0]
    inter = gu_n // 2
    return (gu_k == x.shape[1] and d_k == inter and inter % BLOCK_K == 0
            and mma_supported(x, gate_up[0], gu_group) and mma_supported(x, down[0], d_group))


def awq_mlp(x: torch.Tensor, gate_up: tuple[torch.Tensor, ...], down: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x`` [M, K] -> ``down(silu(gate) * up)`` [M, N] in x's dtype, ``gate_up`` and ``down`` each
    ``(qweight, qzeros, scales)`` as AWQ stores them (gate_up: gate's columns, then up's). Needs
    ``mlp_supported``."""
    assert mlp_supported(x, gate_up, down), "awq_mlp does not take these activations or weights"
    m, hidden = x.shape
    gu_k, gu_n, gu_group = _check_shapes(*gate_up)
    d_k, d_n, d_group = _check_shapes(*down)
    num_sms = _num_sms(x.device)
    gu_cfg, d_cfg = mma_config(m, gu_n, gu_k, num_sms), mma_config(m, d_n, d_k, num_sms)
    assert gu_cfg.halves == d_cfg.halves == 1 and gu_cfg.num_stages == d_cfg.num_stages == 2
    gu_kps = triton.cdiv(gu_k // BLOCK_K, gu_cfg.split_k) * BLOCK_K
    d_kps = triton.cdiv(d_k // BLOCK_K, d_cfg.split_k) * BLOCK_K
    gu_split, d_split = triton.cdiv(gu_k, gu_kps), triton.cdiv(d_k, d_kps)
    gu_tiles, d_tiles = gu_n // (64 * WARPS), d_n // (64 * WARPS)
    items = gu_tiles * gu_split + d_tiles * d_split
    gu_out = torch.empty((m, gu_n), dtype=x.dtype, device=x.device)
    act = torch.empty((m, gu_n // 2), dtype=x.dtype, device=x.device)
    out = torch.empty((m, d_n), dtype=x.dtype, device=x.device)
    gu_partial = torch.empty((gu_split, m, gu_n), dtype=torch.float32, device=x.device) if gu_split > 1 else gu_out
    d_partial = torch.empty((d_split, m, d_n), dtype=torch.float32, device=x.device) if d_split > 1 else out
    x_desc, wg_desc = _descriptors(x, gate_up[0], 8, BLOCK_K)
    act_desc, wd_desc = _descriptors(act, down[0], 8, BLOCK_K)
    counters = arrival_counters(x.device, gu_tiles + d_tiles + gu_tiles + 2)
    _awq_mlp_kernel[(min(items, PROGRAMS_PER_SM * num_sms),)](
        x_desc, act_desc, wg_desc, wd_desc, gate_up[1], gate_up[2], down[1], down[2], gu_out, gu_partial, act, out,
        d_partial, counters, m,
        HIDDEN=hidden, INTER=gu_n // 2, N_OUT=d_n, GU_GROUP=gu_group, D_GROUP=d_group, GU_KPS=gu_kps,
        GU_SPLIT=gu_split, D_KPS=d_kps, D_SPLIT=d_split, num_warps=WARPS, **pdl_args(x.device),
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
    def _request(is_gu, with_x, k, w0, bar, w_slot, x_slot, x_desc, act_desc, wg_desc, wd_desc, pred):
        """One pipeline stage on ``bar``: the weight tile [128, 16 words] at (k, w0) and the
        activations [8, 128] at k (gate_up's input, or for down the SiLU-and-mul's output, which
        a down item requests for its first tile only once that is formed: ``with_x`` false)."""
        W_BYTES: gl.constexpr = _BLOCK_K * 8 * _WARPS * 4
        X_BYTES: gl.constexpr = _BLOCK_T * _BLOCK_K * 2
        mbarrier.expect(bar, W_BYTES + X_BYTES, pred=pred)
        if is_gu:
            _tma_load(wg_desc, [k, w0], bar, w_slot, pred=pred)
            if with_x:
                _tma_load(x_desc, [0, k], bar, x_slot, pred=pred)
        else:
            _tma_load(wd_desc, [k, w0], bar, w_slot, pred=pred)
            if with_x:
                _tma_load(act_desc, [0, k], bar, x_slot, pred=pred)

    @gluon.jit
    def _fence_proxy_global():
        """Generic-proxy global writes (the SiLU-and-mul's output) ordered with TMA's reads."""
        gl.inline_asm_elementwise("fence.proxy.async.global; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _request_features(act_desc, ready_ptr, k, bar, x_slot):
        """Down's activations [8, 128] at k on ``bar``, once the SiLU-and-mul has formed them
        (``ready_ptr[k / 128]`` set, acquired)."""
        ready = gl.atomic_add(ready_ptr + k // _BLOCK_K, 0, sem="acquire", scope="gpu")
        while ready == 0:
            ready = gl.atomic_add(ready_ptr + k // _BLOCK_K, 0, sem="acquire", scope="gpu")
        _fence_proxy_global()
        _tma_load(act_desc, [0, k], bar, x_slot)

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
    def _awq_mlp_kernel(x_desc, act_desc, wg_desc, wd_desc, gz_ptr, gs_ptr, dz_ptr, ds_ptr, gu_ptr, gu_partial_ptr,
                        act_ptr, out_ptr, d_partial_ptr, counters_ptr, M,
                        HIDDEN: gl.constexpr, INTER: gl.constexpr, N_OUT: gl.constexpr, GU_GROUP: gl.constexpr,
                        D_GROUP: gl.constexpr, GU_KPS: gl.constexpr, GU_SPLIT: gl.constexpr, D_KPS: gl.constexpr,
                        D_SPLIT: gl.constexpr, USE_PDL: gl.constexpr = False):
        """A persistent grid, 2 warps a program (see the module docstring). Items: gate_up's
        (column block n, split s) at s * GU_TILES + n, then down's at GU_ITEMS + s * D_TILES + n
        (split-major: the first down items read the first features). A program claims its first
        item before the PDL wait and requests that item's first weight tile; it claims its next
        item while the current item's second-last tile streams and requests the next item's
        first tile with the current item's last, so a tile is always in flight.

        Counters at ``counters_ptr``, each zero again when the launch ends: gate_up's split-K
        arrivals [GU_TILES] and down's [D_TILES] (reset by their last arrivals), ``pair``
        [INTER / 128] (gate's and up's column block b summed: the second forms features 128 b ..),
        ``ready`` [D_SPLIT] (feature blocks formed, by down split), the claim counter and the
        exit counter (these four zeroed by the last program to exit)."""
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
        KSPLIT: gl.constexpr = 2  # two MMA chains a tile (8 tokens, 128-row stages), as awq_mma

        w_smem = gl.allocate_shared_memory(gl.int32, [2, _BLOCK_K, 8 * W], wg_desc.layout)
        x_smem = gl.allocate_shared_memory(DTYPE, [2, _BLOCK_T, _BLOCK_K], x_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()

        # The claim counter is only this kernel's, and the previous launch finished before the
        # kernel ahead of this one passed its wait (a norm at least runs between two MLPs):
        # claimed before the wait.
        item = gl.atomic_add(counters_ptr + CLAIM, 1, sem="relaxed", scope="gpu")
        is_gu, n, s, k_lo, n_k = _item(item, HIDDEN, INTER, N_OUT, GU_KPS, GU_SPLIT, D_KPS)
        _request(is_gu, False, k_lo, n * 8 * W, bars.index(0), w_smem.index(0), x_smem.index(0), x_desc, act_desc,
                 wg_desc, wd_desc, item < ITEMS)
        if USE_PDL:
            _pdl_wait()
        if is_gu:
            _tma_load(x_desc, [0, k_lo], bars.index(0), x_smem.index(0), pred=item < ITEMS)

        rows = gl.arange(0, 64 * W, layout=gl.SliceLayout(1, MMA))
        c = (rows // 8) % 2 + 2 * (rows // (16 * W))
        zero_shift = 4 * (c // 2 + 4 * (c % 2))
        ones = gl.full([16 * W, _BLOCK_K // KSPLIT], 1.0, DTYPE, layout=_operand_layout(W, 0))
        OUT_L: gl.constexpr = _out_layout(W, _BLOCK_T)

        g = 0  # tiles this program has consumed: the next is in stage g % 2, phase (g // 2) & 1
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
            nxt = item * 0 + ITEMS  # none yet (a tensor, as the claims are)
            if n_k < 2:
                nxt = gl.atomic_add(counters_ptr + CLAIM, 1, sem="relaxed", scope="gpu")
            z_next = gl.load(zeros_ptr + (k_lo // group) * (n_cols // 8) + word)
            s_next = _load_scales(scales_ptr, (k_lo // group) * n_cols + 8 * w0, W, MMA)
            if item >= GU_ITEMS:  # down: the first tile's activations once they are formed
                _request_features(act_desc, counters_ptr + READY, k_lo, bars.index(g % 2), x_smem.index(g % 2))
            acc = gl.zeros([64 * W, _BLOCK_T], gl.float32, layout=MMA)
            for t in range(n_k):
                slot = (g + 1) % 2
                fence_async_shared()  # this slot's last reads (a step ago) before the async write
                if t + 1 < n_k:
                    _request(is_gu, is_gu, k_lo + (t + 1) * _BLOCK_K, w0, bars.index(slot), w_smem.index(slot),
                             x_smem.index(slot), x_desc, act_desc, wg_desc, wd_desc, True)
                    if item >= GU_ITEMS:
                        _request_features(act_desc, counters_ptr + READY, k_lo + (t + 1) * _BLOCK_K, bars.index(slot),
                                          x_smem.index(slot))
                else:
                    nx_gu, nx_n, nx_s, nx_k, nx_nk = _item(nxt, HIDDEN, INTER, N_OUT, GU_KPS, GU_SPLIT, D_KPS)
                    _request(nx_gu, nx_gu, nx_k, nx_n * 8 * W, bars.index(slot), w_smem.index(slot),
                             x_smem.index(slot), x_desc, act_desc, wg_desc, wd_desc, nxt < ITEMS)
                if t + 2 == n_k:
                    nxt = gl.atomic_add(counters_ptr + CLAIM, 1, sem="relaxed", scope="gpu")
                z_cur, s_cur = z_next, s_next
                k_ahead = k_lo + gl.minimum(t + 1, n_k - 1) * _BLOCK_K  # in bounds; unused after the last
                z_next = gl.load(zeros_ptr + (k_ahead // group) * (n_cols // 8) + word)
                s_next = _load_scales(scales_ptr, (k_ahead // group) * n_cols + 8 * w0, W, MMA)

                mbarrier.wait(bars.index(g % 2), (g // 2) & 1)
                acc = _group(acc, w_smem.index(g % 2), x_smem.index(g % 2), z_cur, s_cur, zero_shift, ones, DTYPE, W,
                             _BLOCK_T, MMA, KSPLIT)
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
                _store_split_k(out, out_ptr, d_partial_ptr, counters_ptr, GU_TILES + n, 0, n * 64 * W, M, N_OUT, s,
                               D_SPLIT, OUT_L, _BLOCK_T, OUT_L, FEW_TOKENS=True)
            item = nxt

        for i in gl.static_range(2):
            mbarrier.invalidate(bars.index(i))
        exited = gl.atomic_add(counters_ptr + EXIT, 1, sem="acq_rel", scope="gpu")
        if exited == gl.num_programs(0) - 1:  # every program is done with the counters: zero them
            ZL: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
            for z0 in range(PAIR, EXIT + 1, 32 * W):
                slot = z0 + gl.arange(0, 32 * W, layout=ZL)
                gl.store(counters_ptr + slot, gl.zeros([32 * W], gl.int32, layout=ZL), mask=slot <= EXIT)
