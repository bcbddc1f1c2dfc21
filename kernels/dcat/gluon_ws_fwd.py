"""Warp-specialised Hopper forward for DCAT crossing attention in Gluon (``ws_min_ctx``).

Same contract, grid and partials as ``gluon_fwd._dcat_fwd_gluon_kernel``, launched by
``gluon_fwd.launch`` and sharing its helpers; see ``gluon_fwd`` for the notation and the
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
    (Q, K, V, O, LSE, PO, PL, q_bufs, k_bufs, v_bufs, ready, empty, mrg_acc, mrg_ml, done,
     m0, c1, h, s, H, Cn, kstart, kend, n_full, qk_scale) = a
    WG_M: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld: gl.constexpr = _load_layout(HEAD_DIM, 4)
    if c1 - m0 <= WG_M:
        # at most 64 candidate rows (a request's last, partial tile): every consumer takes
        # them and a 1/NC share of the history blocks, merged at the end (_ws_shared_rows)
        _ws_shared_rows(a, HALF, HEAD_DIM, BLOCK_N, STAGES, SPLIT, POLY, Q_REG, OVERLAP,
                        s_layout, o_layout, p_layout, ld)
    else:
        _ws_own_rows(a, HALF, HEAD_DIM, BLOCK_N, STAGES, SPLIT, POLY, Q_REG, OVERLAP,
                     s_layout, o_layout, p_layout, ld)


@gluon.jit
def _ws_own_rows(a, HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, SPLIT: gl.constexpr, POLY: gl.constexpr,
                 Q_REG: gl.constexpr, OVERLAP: gl.constexpr, s_layout: gl.constexpr,
                 o_layout: gl.constexpr, p_layout: gl.constexpr, ld: gl.constexpr):
    """Consumer HALF's own 64 rows, m0 + 64*HALF.., over every history block of the split."""
    (Q, K, V, O, LSE, PO, PL, q_bufs, k_bufs, v_bufs, ready, empty, mrg_acc, mrg_ml, done,
     m0, c1, h, s, H, Cn, kstart, kend, n_full, qk_scale) = a
    WG_M: gl.constexpr = 64
    dtype: gl.constexpr = k_bufs.dtype
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
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
def _ws_skip(ready, empty, j0, j1, STAGES: gl.constexpr):
    """Blocks j0..j1-1 of another consumer (shared-rows tile): wait for each to land, then
    release its slot at once, so the producer's count of NC releases per slot holds."""
    for j in range(j0, j1):
        mbarrier.wait(ready.index(j % STAGES), (j // STAGES) & 1)
        mbarrier.arrive(empty.index(j % STAGES), count=1)


@gluon.jit
def _ws_shared_rows(a, HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, SPLIT: gl.constexpr, POLY: gl.constexpr,
                    Q_REG: gl.constexpr, OVERLAP: gl.constexpr, s_layout: gl.constexpr,
                    o_layout: gl.constexpr, p_layout: gl.constexpr, ld: gl.constexpr):
    """A tile of at most 64 rows (e.g. 1024 = 5 x 192 + 64): every consumer takes rows
    m0..m0+64 and history blocks j with j % NC == HALF, and consumer 0 merges the NC online-
    softmax states through shared memory, so the CTA takes ~1/NC of a full tile's time
    instead of leaving NC-1 warpgroups idle. Every consumer still waits for every block and
    releases the ones it skips at once. Its own blocks are not pipelined (QK^T, softmax, PV,
    release): these tiles take 1/NC of the time of the full ones they run beside. The self
    term opens consumer 0 only.""" 
    (Q, K, V, O, LSE, PO, PL, q_bufs, k_bufs, v_bufs, ready, empty, mrg_acc, mrg_ml, done,
     m0, c1, h, s, H, Cn, kstart, kend, n_full, qk_scale) = a
    NC: gl.constexpr = q_bufs.shape[0]
    WG_M: gl.constexpr = 64
    dtype: gl.constexpr = k_bufs.dtype
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    q_smem = q_bufs.index(HALF)
    q, m_i, l_i, acc, offs_d, offs_m_o, mask_m_o, offs_d_o, row_off_o = _open_rows(
        Q, K, V, m0, c1, h, s + HALF, H, qk_scale, WG_M, HEAD_DIM, ld, s_layout, o_layout)
    q_smem.store(q)
    fence_async_shared()
    _cta_barrier()
    if Q_REG:
        qa = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    else:
        qa = q_smem
    zero_s = gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout)
    # own blocks HALF, HALF + NC, ..., each finished (PV included) and released before the
    # next wait, so no slot is held across waits (any STAGES); the blocks between them are
    # waited for and released at once (_ws_skip): every slot still gets NC releases, in order
    n_own = gl.maximum(n_full - HALF + NC - 1, 0) // NC
    last = -1
    for i in range(n_own):
        j = HALF + i * NC
        _ws_skip(ready, empty, last + 1, j, STAGES)
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        s_acc = warpgroup_mma(qa, k_bufs.index(slot).permute((1, 0)), zero_s, use_acc=False)
        p, alpha, m_i, l_i = _softmax_block(s_acc, m_i, l_i, qk_scale, p_layout, dtype, POLY)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        acc = warpgroup_mma(p, v_bufs.index(slot), acc)
        mbarrier.arrive(empty.index(slot), count=1)
        last = j
    _ws_skip(ready, empty, last + 1, n_full, STAGES)

    tail = kstart + n_full * BLOCK_N
    if (tail < kend) & (n_full % NC == HALF):
        slot = n_full % STAGES
        mbarrier.wait(ready.index(slot), (n_full // STAGES) & 1)
        s_acc = warpgroup_mma(qa, k_bufs.index(slot).permute((1, 0)), zero_s, use_acc=False)
        cols = tail + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s_acc = gl.where((cols < kend)[None, :], s_acc, float("-inf"))
        p, alpha, m_i, l_i = _softmax_block(s_acc, m_i, l_i, qk_scale, p_layout, dtype)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        acc = warpgroup_mma(p, v_bufs.index(slot), acc)

    if HALF > 0:  # hand (m, l, acc) to consumer 0; arrive releases the stores (partition bar)
        mrg_acc.index(HALF - 1).store(acc)
        mrg_ml.slice((2 * HALF - 2) * WG_M, WG_M).store(m_i)
        mrg_ml.slice((2 * HALF - 1) * WG_M, WG_M).store(l_i)
        mbarrier.arrive(done.index(0), count=1)
    else:
        mbarrier.wait(done.index(0), 0)
        for c in gl.static_range(1, NC):
            m_c = mrg_ml.slice((2 * c - 2) * WG_M, WG_M).load(row_s)
            l_c = mrg_ml.slice((2 * c - 1) * WG_M, WG_M).load(row_s)
            acc_c = mrg_acc.index(c - 1).load(o_layout)
            m_new = gl.maximum(m_i, m_c)
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # no block, no self term
            a_i = gl.exp2(m_i - m_safe)
            a_c = gl.exp2(m_c - m_safe)
            l_i = l_i * a_i + l_c * a_c
            acc = (acc * gl.convert_layout(a_i, row_o)[:, None]
                   + acc_c * gl.convert_layout(a_c, row_o)[:, None])
            m_i = m_new
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


@gluon.jit(do_not_specialize=["NSPLIT", "Cn", "H", "n_mtiles", "max_ctx", "split_size"])
def _dcat_fwd_gluon_ws_kernel(
    Q, K, V, KC, VC, CO, XO, O, LSE, PO, PL, kc_desc, vc_desc, NSPLIT,
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
                                                          split_size, BLOCK_M, NSPLIT, H, True)
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
        # merge scratch of a shared-rows tile (_ws_shared_rows): consumers 1..NC-1's acc, m, l
        mrg_acc = gl.allocate_shared_memory(
            gl.float32, [NC - 1, 64, HEAD_DIM],
            gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
        mrg_ml = gl.allocate_shared_memory(
            gl.float32, [(2 * NC - 2) * 64],
            gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
        done = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(done.index(0), count=NC - 1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NC)  # every consumer releases a slot
        cons = (Q, K, V, O, LSE, PO, PL, q_bufs, k_bufs, v_bufs, ready, empty, mrg_acc, mrg_ml,
                done,
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
        mbarrier.invalidate(done.index(0))
