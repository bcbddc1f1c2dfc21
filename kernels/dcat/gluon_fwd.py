"""Hopper forward for DCAT crossing attention in Gluon, Triton's tile-level dialect.

Same contract and launch grid as ``triton_fwd._dcat_fwd_kernel`` (a program owns BLOCK_M
candidates of one request, one head and one split of that request's history; it writes o
and LSE, or a partial merged by ``triton_fwd._dcat_combine_kernel``). What Gluon adds is
explicit control of the Hopper pipeline, which the ``tl`` compiler does not give:

* K/V history blocks arrive by TMA into a STAGES-deep shared-memory ring (one mbarrier per
  slot); a slot is refilled as soon as the MMAs reading it have retired.
* QK^T of block j and PV of block j-1 are issued together as async ``warpgroup_mma``; P
  stays in registers as the A operand of the PV MMA (no shared-memory round trip).

Always on: FA3's intra-warpgroup overlap (wait only for QK^T and run block j's softmax while
block j-1's PV is still on the tensor cores; ``tl.dot`` always waits. ptxas reuses PV(j-1)'s
A-operand registers for the exp2 and waits for PV(j-1) before the first that does, so only a
few exp2 overlap; docs/dcat-history.md). Constexpr options, set by the config's variant
(``config.py``): ``FUSE_COMBINE`` (the last split merges the partials: no combine launch) and
``FIXED_MAX`` (variant GLUON_FIXED_MAX, bf16, Dh <= 64: after a split's first block the
softmax keeps that block's row max as its reference, so later blocks compute no row max and
never rescale acc: 324 instead of 450 instructions per 64x128 block; p may then exceed 1,
which bf16 holds up to 2^127, and an overflow past that makes l or acc non-finite, upon
which the program redoes its split with the online softmax).

The ragged tail block of a split is loaded with masked pointer loads into ring slot 0 (all
TMA loads are retired by then), so no row of another request is read into a softmax.

Only for CUDA compute capability 9.x (wgmma), bf16/fp16 inputs, Dh in {32, 64, 128},
outside the interpreter; everything else keeps the ``tl`` kernel (fp32: IEEE dot). The host
side (launch, which inputs it takes, the sm_90 compile for CI) is ``gluon_launch.py``.
Notation: Cn candidates, Lc history tokens, H heads, Dh head dim.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)


# CTA-wide barrier: gl.thread_barrier in Triton 3.6 (the GPU image's), gl.barrier in 3.8
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier


@gluon.constexpr_function
def _load_layout(cols, num_warps):
    # 16-byte vectors along the head dim; the rest of a warp along rows
    vec = 8
    tpw_c = min(32, max(1, cols // vec))
    return gl.BlockedLayout([1, vec], [32 // tpw_c, tpw_c], [num_warps, 1], [1, 0])


@gluon.jit
def _softmax_block(s_acc, m_i, l_i, qk_scale, p_layout: gl.constexpr, dtype: gl.constexpr):
    # qk_scale > 0 (the launcher flips q's sign otherwise): max before scaling, then one
    # FMA per score. Returns p (A operand of the PV MMA), alpha (rescale of acc), m, l.
    pf, alpha, m_new, l_i = _softmax_f32(s_acc, m_i, l_i, qk_scale)
    return gl.convert_layout(pf.to(dtype), p_layout), alpha, m_new, l_i


@gluon.jit
def _softmax_f32(s_acc, m_i, l_i, qk_scale):
    # _softmax_block with p left in fp32 in the score layout
    m_new = gl.maximum(m_i, gl.max(s_acc, 1) * qk_scale)
    p = gl.exp2(s_acc * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _program_tile(CO, XO, n_mtiles, max_ctx, split_size, BLOCK_M: gl.constexpr):
    """This program's work (same grid as the tl kernel): pid = request * n_mtiles + tile,
    head h, split s; candidate rows m0..min(m0 + BLOCK_M, c1), history keys x0..x1 (the last
    max_ctx if set), and the request's number of splits."""
    pid = gl.program_id(0)
    h = gl.program_id(1)
    s = gl.program_id(2)
    r = pid // n_mtiles
    mt = pid - r * n_mtiles
    c0 = gl.load(CO + r).to(gl.int64)
    c1 = gl.load(CO + r + 1).to(gl.int64)
    m0 = c0 + mt * BLOCK_M
    x0 = gl.load(XO + r).to(gl.int64)
    x1 = gl.load(XO + r + 1).to(gl.int64)
    if max_ctx > 0:
        x0 = gl.maximum(x0, x1 - max_ctx)
    n_split_r = gl.maximum(gl.cdiv(x1 - x0, split_size), 1)
    return pid, h, s, m0, c1, x0, x1, n_split_r


@gluon.jit
def _open_rows(Q, K, V, r0, c1, h, s, H, s_in, qk_scale, ROWS: gl.constexpr,
               HEAD_DIM: gl.constexpr, ld: gl.constexpr, s_layout: gl.constexpr,
               o_layout: gl.constexpr):
    """Candidate rows r0..r0+ROWS of head h: q [ROWS, Dh] (layout ld), the rows' offsets in
    the accumulator layout (o is stored from there and v_self loaded there, so no layout
    change needs scratch shared memory, which would cost the second CTA per SM), and the
    online-softmax state (m, l, acc), opened by the self term on split 0. s_in: the row stride
    of q, k, v (elements); o's rows are H * HEAD_DIM apart."""
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_qm = H * HEAD_DIM
    offs_m = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld))
    mask_m = offs_m < c1
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    row_off = offs_m[:, None] * s_in + h * HEAD_DIM + offs_d[None, :]
    offs_m_o = r0 + gl.arange(0, ROWS, layout=row_o)
    mask_m_o = offs_m_o < c1
    offs_d_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    row_off_o = offs_m_o[:, None] * s_qm + h * HEAD_DIM + offs_d_o[None, :]
    q = gl.load(Q + row_off, mask=mask_m[:, None], other=0.0)
    if s == 0:  # self term: the candidate's own key/value opens the online softmax
        ks = gl.load(K + row_off, mask=mask_m[:, None], other=0.0)
        m_self = gl.sum(q.to(gl.float32) * ks.to(gl.float32), 1) * qk_scale
        m_i = gl.convert_layout(m_self, row_s)
        l_i = gl.full([ROWS], 1.0, gl.float32, row_s)
        v_off = offs_m_o[:, None] * s_in + h * HEAD_DIM + offs_d_o[None, :]
        acc = gl.load(V + v_off, mask=mask_m_o[:, None], other=0.0).to(gl.float32)
    else:
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
        l_i = gl.full([ROWS], 0.0, gl.float32, row_s)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    return q, m_i, l_i, acc, offs_d, offs_m_o, mask_m_o, offs_d_o, row_off_o


@gluon.jit
def _issue_qk_pv(qa, k_buf, v_prev, p, acc, zero_s):
    # QK^T(j) and PV(j-1) as async wgmma; returns S(j) (retired) and PV's token: PV(j-1)
    # may still run
    s_tok = warpgroup_mma(qa, k_buf.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    o_tok = warpgroup_mma(p, v_prev, acc, is_async=True)
    s_acc = warpgroup_mma_wait(1, deps=(s_tok, ))
    return s_acc, o_tok


@gluon.jit
def _kv_step(qa, k_buf, v_prev, p, acc, m_i, l_i, zero_s, qk_scale, p_layout: gl.constexpr,
             row_o: gl.constexpr, dtype: gl.constexpr):
    """One history block j: QK^T(j) and PV(j-1) issued together; the softmax of j may start
    while PV(j-1) is still on the tensor cores (FA3's intra-warpgroup overlap; ptxas cuts it
    short, see the module docstring).
    Returns block j's p and the state rescaled to its max; k_buf and v_prev are free."""
    s_acc, o_tok = _issue_qk_pv(qa, k_buf, v_prev, p, acc, zero_s)
    pf, alpha, m_i, l_i = _softmax_f32(s_acc, m_i, l_i, qk_scale)
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    p = gl.convert_layout(pf.to(dtype), p_layout)
    return p, acc, m_i, l_i


@gluon.jit
def _part_rowsum(x):
    # [M, N] -> [M, 8]: sums over the columns of x congruent mod 8. In the wgmma
    # accumulator layout a thread holds two of those 8 residues for all N/8 column groups,
    # so this is a sum within each thread (no shuffles)
    M: gl.constexpr = x.shape[0]
    N: gl.constexpr = x.shape[1]
    return gl.sum(gl.reshape(x, [M, N // 8, 8]), 1)


@gluon.jit
def _kv_step_fixed(qa, k_buf, v_prev, p, acc, m_i, l_i, zero_s, qk_scale,
                   p_layout: gl.constexpr, dtype: gl.constexpr):
    """_kv_step against a fixed reference m_i (FIXED_MAX): no row max, no rescale of acc.
    p = exp2(x - m_i) may exceed 1; bf16 (and fp32) hold it up to 2^127, and an overflow
    shows up as a non-finite l or acc, which the caller checks. l_i here: the per-thread
    partial row sums of _part_rowsum."""
    s_acc, o_tok = _issue_qk_pv(qa, k_buf, v_prev, p, acc, zero_s)
    pf = gl.exp2(s_acc * qk_scale - m_i[:, None])
    l_i = l_i + _part_rowsum(pf)
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    p = gl.convert_layout(pf.to(dtype), p_layout)
    return p, acc, l_i


@gluon.jit
def _write_rows(acc, m_i, l_i, O, LSE, PO, PL, s, h, H, Cn, offs_m_o, mask_m_o, offs_d_o,
                row_off_o, HEAD_DIM: gl.constexpr, SPLIT: gl.constexpr,
                row_o: gl.constexpr, dtype: gl.constexpr):
    """o = acc / l and the LSE: final (natural log) or, with SPLIT, this split's fp32
    partial (log2) for the merge."""
    o = acc / gl.convert_layout(l_i, row_o)[:, None]
    lse2 = gl.convert_layout(m_i + gl.log2(l_i), row_o)
    if SPLIT:
        prow = (s * Cn + offs_m_o) * H + h
        gl.store(PO + prow[:, None] * HEAD_DIM + offs_d_o[None, :], o, mask=mask_m_o[:, None])
        gl.store(PL + prow, lse2, mask=mask_m_o)
    else:
        gl.store(O + row_off_o, o.to(dtype), mask=mask_m_o[:, None])
        gl.store(LSE + offs_m_o * H + h, lse2 * 0.6931471805599453, mask=mask_m_o)


@gluon.jit
def _load_block(kc_desc, vc_desc, bars, k_bufs, v_bufs, slot, row, col, go):
    # K and V rows row.. of one history block into ring slot `slot` by TMA, on that slot's
    # mbarrier; nothing if not go
    nbytes: gl.constexpr = (2 * k_bufs.shape[1] * k_bufs.shape[2]
                            * k_bufs.dtype.primitive_bitwidth // 8)
    mbarrier.expect(bars.index(slot), nbytes, pred=go)
    tma.async_copy_global_to_shared(kc_desc, [row, col], bars.index(slot), k_bufs.index(slot),
                                    pred=go)
    tma.async_copy_global_to_shared(vc_desc, [row, col], bars.index(slot), v_bufs.index(slot),
                                    pred=go)


@gluon.jit
def _ring_step(j, slot, prev, phase, qa, k_bufs, v_bufs, bars, kc_desc, vc_desc, row0, col,
               n_full, p, acc, m_i, l_i, zero_s, qk_scale, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, p_layout: gl.constexpr, row_o: gl.constexpr,
               dtype: gl.constexpr, FIXED_MAX: gl.constexpr):
    """History block j (1 <= j < n_full) from the TMA ring: wait for its slot (j % STAGES,
    phase (j // STAGES) & 1; prev = slot of block j-1), QK^T(j) and PV(j-1), block j's
    softmax, then refill slot prev with block j-1+STAGES. Returns the state and the next
    block's (slot, prev, phase)."""
    mbarrier.wait(bars.index(slot), phase)
    if FIXED_MAX:
        p, acc, l_i = _kv_step_fixed(qa, k_bufs.index(slot), v_bufs.index(prev), p, acc, m_i,
                                     l_i, zero_s, qk_scale, p_layout, dtype)
    else:
        p, acc, m_i, l_i = _kv_step(qa, k_bufs.index(slot), v_bufs.index(prev), p, acc, m_i,
                                    l_i, zero_s, qk_scale, p_layout, row_o, dtype)
    nb = j - 1 + STAGES
    _load_block(kc_desc, vc_desc, bars, k_bufs, v_bufs, prev, row0 + nb * BLOCK_N, col,
                nb < n_full)
    wrap = (slot == STAGES - 1).to(gl.int32)  # no division by STAGES per block
    return p, acc, m_i, l_i, (slot + 1) * (1 - wrap), slot, phase ^ wrap


@gluon.jit
def _run_split(q_smem, k_bufs, v_bufs, bars, kc_desc, vc_desc, KC, VC, m_i, l_i, acc, kstart,
               kend, h, s_kv, offs_d, qk_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr,
               row_o: gl.constexpr, ld: gl.constexpr, dtype: gl.constexpr,
               FIXED_MAX: gl.constexpr):
    """The program's history keys kstart..kend (one split) against its candidate rows
    (q in q_smem, online-softmax state m_i, l_i, acc): full blocks through the TMA ring,
    the ragged tail by masked loads. Returns the updated (m_i, l_i, acc).

    FIXED_MAX: blocks after the first keep the first block's row max as the reference
    (p = exp2(x - m) may exceed 1, no rescale of acc): no row max and no rescale per block,
    and row sums kept per thread: 324 instead of 450 instructions per 128 keys. bf16 p holds
    up to 2^127; past that l or acc turns non-finite and the caller redoes the split without
    FIXED_MAX. The first block's max is a score of the split itself, so the largest p is
    >= 1: nothing that matters underflows."""
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    n_full = ((kend - kstart) // BLOCK_N).to(gl.int32)
    row0 = kstart.to(gl.int32)
    col = (h * HEAD_DIM).to(gl.int32)
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    for i in gl.static_range(STAGES - 1):  # prologue: blocks 0..STAGES-2
        _load_block(kc_desc, vc_desc, bars, k_bufs, v_bufs, i, row0 + i * BLOCK_N, col,
                    i < n_full)
    fence_async_shared()  # q_smem (generic-proxy store) before the MMAs read it
    _cta_barrier()
    qa = q_smem

    if n_full > 0:
        # block 0: nothing to overlap with yet
        mbarrier.wait(bars.index(0), 0)
        s_acc = warpgroup_mma(qa, k_bufs.index(0).permute((1, 0)), zero_s,
                              use_acc=False)
        p, alpha, m_i, l_i = _softmax_block(s_acc, m_i, l_i, qk_scale, p_layout, dtype)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        nb = STAGES - 1  # slot STAGES-1 has never been used
        _load_block(kc_desc, vc_desc, bars, k_bufs, v_bufs, nb, row0 + nb * BLOCK_N, col,
                    nb < n_full)
        slot = gl.to_tensor(1 % STAGES)  # block 1's slot, block 0's slot, block 1's phase
        prev = gl.to_tensor(0)
        phase = gl.to_tensor(0)
        if FIXED_MAX:
            # row sums kept per thread ([BLOCK_M, 8]: a thread's columns mod 8) and summed
            # across the threads of a row once, after the loop: no shuffles per block
            l2 = _part_rowsum(zero_s)
            for j in range(1, n_full):
                p, acc, m_i, l2, slot, prev, phase = _ring_step(
                    j, slot, prev, phase, qa, k_bufs, v_bufs, bars, kc_desc, vc_desc, row0,
                    col, n_full, p, acc, m_i, l2, zero_s, qk_scale, BLOCK_N, STAGES, p_layout,
                    row_o, dtype, FIXED_MAX)
            l_i = l_i + gl.convert_layout(gl.sum(l2, 1), gl.SliceLayout(1, s_layout))
        else:
            for j in range(1, n_full):
                p, acc, m_i, l_i, slot, prev, phase = _ring_step(
                    j, slot, prev, phase, qa, k_bufs, v_bufs, bars, kc_desc, vc_desc, row0,
                    col, n_full, p, acc, m_i, l_i, zero_s, qk_scale, BLOCK_N, STAGES, p_layout,
                    row_o, dtype, FIXED_MAX)
        acc = warpgroup_mma(p, v_bufs.index((n_full - 1) % STAGES), acc)

    tail = kstart + n_full * BLOCK_N
    if tail < kend:
        # every TMA load was waited for and every MMA retired: slot 0 is free
        offs_n = tail + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
        kmask = offs_n < kend
        kv_off = offs_n[:, None] * s_kv + h * HEAD_DIM + offs_d[None, :]
        kb = gl.load(KC + kv_off, mask=kmask[:, None], other=0.0)
        vb = gl.load(VC + kv_off, mask=kmask[:, None], other=0.0)
        _cta_barrier()
        k_bufs.index(0).store(kb)
        v_bufs.index(0).store(vb)
        fence_async_shared()
        _cta_barrier()
        s_acc = warpgroup_mma(qa, k_bufs.index(0).permute((1, 0)), zero_s,
                              use_acc=False)
        cols = tail + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s_acc = gl.where((cols < kend)[None, :], s_acc, float("-inf"))
        p, alpha, m_i, l_i = _softmax_block(s_acc, m_i, l_i, qk_scale, p_layout, dtype)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        acc = warpgroup_mma(p, v_bufs.index(0), acc)

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    return m_i, l_i, acc


@gluon.jit(do_not_specialize=["Cn", "H", "n_mtiles", "max_ctx", "split_size", "SQ", "SKV"])
def _dcat_fwd_gluon_kernel(
    Q, K, V, KC, VC, CO, XO, O, LSE, PO, PL, kc_desc, vc_desc, CNT,
    Cn, H, n_mtiles, max_ctx, split_size, qk_scale, SQ, SKV,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, SPLIT: gl.constexpr, FUSE_COMBINE: gl.constexpr,
    FIXED_MAX: gl.constexpr,
    num_warps: gl.constexpr,
):
    dtype: gl.constexpr = kc_desc.dtype
    smem_layout: gl.constexpr = kc_desc.layout  # [*, HEAD_DIM] rows: same swizzle for q
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    ld: gl.constexpr = _load_layout(HEAD_DIM, num_warps)

    pid, h, s, m0, c1, x0, x1, n_split_r = _program_tile(CO, XO, n_mtiles, max_ctx,
                                                          split_size, BLOCK_M)
    # row strides (units of HEAD_DIM, see the tl kernel): q, k, v SQ, k_ctx, v_ctx SKV (the
    # descriptors carry it too), outputs H
    s_in = SQ * HEAD_DIM
    s_kv = SKV * HEAD_DIM
    if (m0 < c1) & (s < n_split_r):
        q, m_i, l_i, acc, offs_d, offs_m_o, mask_m_o, offs_d_o, row_off_o = _open_rows(
            Q, K, V, m0, c1, h, s, H, s_in, qk_scale, BLOCK_M, HEAD_DIM, ld, s_layout, o_layout)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], smem_layout, q)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kstart = x0 + s * split_size
        kend = gl.minimum(kstart + split_size, x1)
        m_i, l_i, acc = _run_split(q_smem, k_bufs, v_bufs, bars, kc_desc, vc_desc, KC, VC,
                                   m_i, l_i, acc, kstart, kend, h, s_kv, offs_d, qk_scale,
                                   HEAD_DIM, BLOCK_N, STAGES, s_layout, p_layout, row_o, ld,
                                   dtype, FIXED_MAX)
        if FIXED_MAX:
            # p overflowed for some row (a later key scored more than ~127 (log2) above the
            # first block's max): l or acc is not finite. Rare; this split is redone with
            # the online softmax
            fin = (gl.convert_layout(l_i, row_o) + gl.sum(gl.abs(acc), 1)) < float("inf")
            if gl.sum(gl.where(fin, 0, 1), 0) > 0:
                _cta_barrier()
                q, m_i, l_i, acc, offs_d, offs_m_o, mask_m_o, offs_d_o, row_off_o = _open_rows(
                    Q, K, V, m0, c1, h, s, H, s_in, qk_scale, BLOCK_M, HEAD_DIM, ld, s_layout,
                    o_layout)
                m_i, l_i, acc = _run_split(q_smem, k_bufs, v_bufs, bars, kc_desc, vc_desc, KC,
                                           VC, m_i, l_i, acc, kstart, kend, h, s_kv, offs_d,
                                           qk_scale, HEAD_DIM, BLOCK_N, STAGES, s_layout,
                                           p_layout, row_o, ld, dtype, False)
        _write_rows(acc, m_i, l_i, O, LSE, PO, PL, s, h, H, Cn, offs_m_o, mask_m_o, offs_d_o,
                    row_off_o, HEAD_DIM, SPLIT, row_o, dtype)
        if SPLIT and FUSE_COMBINE:
            # split-K merge without a second kernel: the last split of this (tile, head)
            # to finish (atomic ticket) merges all partials and re-arms the counter
            _cta_barrier()
            tile = pid * H + h
            ticket = gl.atomic_add(CNT + tile, 1, sem="acq_rel")
            if ticket == n_split_r - 1:
                m_c = gl.full([BLOCK_M], float("-inf"), gl.float32, row_o)
                l_c = gl.full([BLOCK_M], 0.0, gl.float32, row_o)
                acc_c = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
                for t in range(n_split_r):
                    prow_t = (t * Cn + offs_m_o) * H + h
                    lse_t = gl.load(PL + prow_t, mask=mask_m_o, other=0.0,
                                    cache_modifier=".cg")
                    o_t = gl.load(PO + prow_t[:, None] * HEAD_DIM + offs_d_o[None, :],
                                  mask=mask_m_o[:, None], other=0.0, cache_modifier=".cg")
                    m_new = gl.maximum(m_c, lse_t)
                    a_c = gl.exp2(m_c - m_new)
                    w_t = gl.exp2(lse_t - m_new)
                    l_c = l_c * a_c + w_t
                    acc_c = acc_c * a_c[:, None] + w_t[:, None] * o_t
                    m_c = m_new
                gl.store(O + row_off_o, (acc_c / l_c[:, None]).to(dtype),
                         mask=mask_m_o[:, None])
                gl.store(LSE + offs_m_o * H + h, (m_c + gl.log2(l_c)) * 0.6931471805599453,
                         mask=mask_m_o)
                gl.store(CNT + tile, 0)
