"""Warp-specialised Hopper forward for DCAT crossing attention in Gluon (``ws_min_ctx``).

Same contract, grid and partials as ``gluon_fwd._dcat_fwd_gluon_kernel``, launched by
``gluon_launch.launch`` and sharing ``gluon_fwd``'s helpers; see ``gluon_fwd`` for the notation and the
shared pieces, and docs/benchmarks/dcat.md for what it measured.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
)

from .gluon_fwd import (
    _cta_barrier,
    _kv_step,
    _load_layout,
    _open_rows,
    _program_tile,
    _softmax_block,
    _write_rows,
)


# One CTA = NC consumer warpgroups (64 candidate rows each, BLOCK_M = 64*NC) + 1 producer
# warp issuing the K/V TMA loads into a STAGES-deep ring (FA3's layout; FA3 uses NC = 3 at
# Dh = 64). The consumers share every K/V block (1/NC of the L2->SM traffic of 64-row CTAs)
# and synchronise only through mbarriers (no CTA-wide bar.sync), so their softmax and MMA
# phases drift apart and overlap on the SM. The ragged tail block comes through TMA too; its
# columns past the split end are masked to -inf (those rows are the next split's or another
# request's keys, or TMA's zero fill: finite, multiplied by p = 0).
@gluon.jit
def _ws_consumer(a, HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, SPLIT: gl.constexpr, POLY: gl.constexpr,
                 Q_REG: gl.constexpr, OVERLAP: gl.constexpr):
    (Q, K, V, O, LSE, PO, PL, q_bufs, k_bufs, v_bufs, ready, empty,
     m0, c1, h, s, H, Cn, kstart, kend, n_full, qk_scale) = a
    WG_M: gl.constexpr = 64
    dtype: gl.constexpr = k_bufs.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    ld: gl.constexpr = _load_layout(HEAD_DIM, 4)
    q_smem = q_bufs.index(HALF)
    q, m_i, l_i, acc, offs_d, offs_m_o, mask_m_o, offs_d_o, row_off_o = _open_rows(
        Q, K, V, m0 + HALF * WG_M, c1, h, s, H, qk_scale, WG_M, HEAD_DIM, ld, s_layout,
        o_layout)
    q_smem.store(q)
    fence_async_shared()
    _cta_barrier()
    if Q_REG:
        qa = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    else:
        qa = q_smem
    zero_s = gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout)

    if n_full > 0:
        mbarrier.wait(ready.index(0), 0)
        s_acc = warpgroup_mma(qa, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False)
        p, alpha, m_i, l_i = _softmax_block(s_acc, m_i, l_i, qk_scale, p_layout, dtype, POLY)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        for j in range(1, n_full):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
            p, acc, m_i, l_i = _kv_step(qa, k_bufs.index(slot), v_bufs.index(prev), p, acc,
                                        m_i, l_i, zero_s, qk_scale, p_layout, row_o, dtype,
                                        POLY, OVERLAP)
            mbarrier.arrive(empty.index(prev), count=1)
        last = (n_full - 1) % STAGES
        acc = warpgroup_mma(p, v_bufs.index(last), acc)
        mbarrier.arrive(empty.index(last), count=1)

    tail = kstart + n_full * BLOCK_N
    if tail < kend:
        slot = n_full % STAGES
        mbarrier.wait(ready.index(slot), (n_full // STAGES) & 1)
        s_acc = warpgroup_mma(qa, k_bufs.index(slot).permute((1, 0)), zero_s, use_acc=False)
        cols = tail + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s_acc = gl.where((cols < kend)[None, :], s_acc, float("-inf"))
        p, alpha, m_i, l_i = _softmax_block(s_acc, m_i, l_i, qk_scale, p_layout, dtype)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        acc = warpgroup_mma(p, v_bufs.index(slot), acc)

    _write_rows(acc, m_i, l_i, O, LSE, PO, PL, s, h, H, Cn, offs_m_o, mask_m_o, offs_d_o,
                row_off_o, HEAD_DIM, SPLIT, row_o, dtype)


@gluon.jit
def _ws_producer(a, HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, SPLIT: gl.constexpr, POLY: gl.constexpr,
                 Q_REG: gl.constexpr, OVERLAP: gl.constexpr):
    kc_desc, vc_desc, k_bufs, v_bufs, ready, empty, row0, col, n_blocks = a
    nbytes: gl.constexpr = 2 * kc_desc.block_type.nbytes
    for j in range(n_blocks):
        slot = j % STAGES
        # a fresh mbarrier counts as phase 1 complete: the first round passes at once
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), nbytes)
        tma.async_copy_global_to_shared(kc_desc, [row0 + j * BLOCK_N, col], ready.index(slot),
                                        k_bufs.index(slot))
        tma.async_copy_global_to_shared(vc_desc, [row0 + j * BLOCK_N, col], ready.index(slot),
                                        v_bufs.index(slot))


@gluon.jit(do_not_specialize=["Cn", "H", "n_mtiles", "max_ctx", "split_size"])
def _dcat_fwd_gluon_ws_kernel(
    Q, K, V, KC, VC, CO, XO, O, LSE, PO, PL, kc_desc, vc_desc,
    Cn, H, n_mtiles, max_ctx, split_size, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, SPLIT: gl.constexpr, POLY: gl.constexpr, Q_REG: gl.constexpr,
    OVERLAP: gl.constexpr, num_warps: gl.constexpr,
):
    NC: gl.constexpr = BLOCK_M // 64
    gl.static_assert((NC == 2) or (NC == 3), "2 or 3 consumer warpgroups x 64 rows")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    dtype: gl.constexpr = kc_desc.dtype
    smem_layout: gl.constexpr = kc_desc.layout
    pid, h, s, m0, c1, x0, x1, n_split_r = _program_tile(CO, XO, n_mtiles, max_ctx,
                                                          split_size, BLOCK_M)
    if (m0 < c1) & (s < n_split_r):
        kstart = x0 + s * split_size
        kend = gl.minimum(kstart + split_size, x1)
        n_full = ((kend - kstart) // BLOCK_N).to(gl.int32)
        n_blocks = gl.cdiv(kend - kstart, BLOCK_N).to(gl.int32)
        q_bufs = gl.allocate_shared_memory(dtype, [NC, 64, HEAD_DIM], smem_layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NC)  # every consumer releases a slot
        cons = (Q, K, V, O, LSE, PO, PL, q_bufs, k_bufs, v_bufs, ready, empty,
                m0, c1, h, s, H, Cn, kstart, kend, n_full, qk_scale)
        prod = (kc_desc, vc_desc, k_bufs, v_bufs, ready, empty, kstart.to(gl.int32),
                (h * HEAD_DIM).to(gl.int32), n_blocks)
        # every partition gets the same constexprs; the ints as gl.constexpr (Triton 3.8
        # refuses plain ints, and a constexpr tuple appended with +, as partition args)
        if NC == 2:
            gl.warp_specialize([
                (_ws_consumer, (cons, gl.constexpr(0), HEAD_DIM, BLOCK_N, STAGES, SPLIT, POLY,
                                Q_REG, OVERLAP)),
                (_ws_consumer, (cons, gl.constexpr(1), HEAD_DIM, BLOCK_N, STAGES, SPLIT, POLY,
                                Q_REG, OVERLAP)),
                (_ws_producer, (prod, gl.constexpr(0), HEAD_DIM, BLOCK_N, STAGES, SPLIT, POLY,
                                Q_REG, OVERLAP)),
            ], [4, 1], [232, 24])
        else:
            gl.warp_specialize([
                (_ws_consumer, (cons, gl.constexpr(0), HEAD_DIM, BLOCK_N, STAGES, SPLIT, POLY,
                                Q_REG, OVERLAP)),
                (_ws_consumer, (cons, gl.constexpr(1), HEAD_DIM, BLOCK_N, STAGES, SPLIT, POLY,
                                Q_REG, OVERLAP)),
                (_ws_consumer, (cons, gl.constexpr(2), HEAD_DIM, BLOCK_N, STAGES, SPLIT, POLY,
                                Q_REG, OVERLAP)),
                (_ws_producer, (prod, gl.constexpr(0), HEAD_DIM, BLOCK_N, STAGES, SPLIT, POLY,
                                Q_REG, OVERLAP)),
            ], [4, 4, 1], [160, 160, 24])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))
