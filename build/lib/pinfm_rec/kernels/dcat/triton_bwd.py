"""Triton backward kernels for DCAT crossing attention.

Notation: R requests, Cn candidates total, Lc context tokens total, H heads,
Dh head dim. Two kernels:

* ``_dcat_bwd_dq_kernel``: one program per (candidate tile, head, history
  split). Computes delta = rowsum(dO * O) for its rows, streams the split's
  context K/V to accumulate dq, and (split 0) the self term: dq_self,
  dk_self, dv_self. With several splits, fp32 partial dq are summed after.
* ``_dcat_bwd_dkdv_kernel``: one program per (context tile, head); iterates
  over all candidate tiles of the request and accumulates dK_ctx, dV_ctx
  (tokens outside the ``max_ctx`` window get zeros). Reads delta from the
  first kernel.

Import lazily (after TRITON_INTERPRET is settled), as for triton_fwd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import DcatConfig, select
from .triton_fwd import cdiv, fit_smem, split_size_for


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with the MMA accumulating into acc."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["Cn", "H", "n_mtiles", "max_ctx", "split_size"])
def _dcat_bwd_dq_kernel(
    Q, K, V, KC, VC, O, DO, LSE, CO, XO, DQ, DK, DV, DELTA, PDQ,
    Cn, H, n_mtiles, max_ctx, split_size, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    s_qm = H * HEAD_DIM  # all tensors contiguous [rows, H, HEAD_DIM]
    s_qh = HEAD_DIM
    s = tl.program_id(2)
    r = pid // n_mtiles
    mt = pid - r * n_mtiles
    c0 = tl.load(CO + r).to(tl.int64)
    c1 = tl.load(CO + r + 1).to(tl.int64)
    m0 = c0 + mt * BLOCK_M
    x0 = tl.load(XO + r).to(tl.int64)
    x1 = tl.load(XO + r + 1).to(tl.int64)
    if max_ctx > 0:
        x0 = tl.maximum(x0, x1 - max_ctx)
    n_split_r = tl.maximum(tl.cdiv(x1 - x0, split_size), 1)
    qk_scale = scale * 1.4426950408889634
    if SPLIT:
        # splits past this request's history: zero partials (PDQ is not pre-zeroed)
        if (m0 < c1) & (s >= n_split_r):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, HEAD_DIM)
            prow = (s * Cn + offs_m) * H + h
            tl.store(PDQ + prow[:, None] * HEAD_DIM + offs_d[None, :],
                     tl.zeros([BLOCK_M, HEAD_DIM], tl.float32), mask=(offs_m < c1)[:, None])
    if (m0 < c1) & (s < n_split_r):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < c1
        offs_d = tl.arange(0, HEAD_DIM)
        rmask = mask_m[:, None]
        q = tl.load(Q + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :], mask=rmask, other=0.0)
        do = tl.load(DO + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :], mask=rmask,
                     other=0.0)
        o = tl.load(O + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :], mask=rmask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse2 = tl.load(LSE + offs_m * H + h, mask=mask_m, other=0.0) * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if s == 0:
            ks = tl.load(K + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :], mask=rmask,
                         other=0.0).to(tl.float32)
            vs = tl.load(V + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :], mask=rmask,
                         other=0.0).to(tl.float32)
            qf = q.to(tl.float32)
            dof = do.to(tl.float32)
            p_self = tl.math.exp2(tl.sum(qf * ks, 1) * qk_scale - lse2)
            ds_self = p_self * (tl.sum(dof * vs, 1) - delta)
            dq = ds_self[:, None] * ks
            tl.store(DK + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :],
                     (ds_self[:, None] * qf * scale).to(DK.dtype.element_ty), mask=rmask)
            tl.store(DV + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :],
                     (p_self[:, None] * dof).to(DV.dtype.element_ty), mask=rmask)
            tl.store(DELTA + offs_m * H + h, delta, mask=mask_m)
        kstart = x0 + s * split_size
        kend = tl.minimum(kstart + split_size, x1)
        offs_n0 = tl.arange(0, BLOCK_N)
        for n in range(kstart, kend, BLOCK_N):
            offs_n = n + offs_n0
            kmask = offs_n < kend
            kb = tl.load(KC + offs_n[:, None] * s_qm + h * s_qh + offs_d[None, :],
                         mask=kmask[:, None], other=0.0)
            vb = tl.load(VC + offs_n[:, None] * s_qm + h * s_qh + offs_d[None, :],
                         mask=kmask[:, None], other=0.0)
            qk = _dot(q, tl.trans(kb), IEEE)
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            p = tl.where(kmask[None, :], p, 0.0)
            dp = _dot(do, tl.trans(vb), IEEE)
            ds = p * (dp - delta[:, None])
            dq = _dot_acc(ds.to(kb.dtype), kb, dq, IEEE)
        dq = dq * scale
        if SPLIT:
            prow = (s * Cn + offs_m) * H + h
            tl.store(PDQ + prow[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=rmask)
        else:
            tl.store(DQ + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=rmask)


@triton.jit(do_not_specialize=["H", "n_ntiles", "max_ctx"])
def _dcat_bwd_dkdv_kernel(
    Q, KC, VC, DO, LSE, DELTA, CO, XO, DKC, DVC,
    H, n_ntiles, max_ctx, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    s_qm = H * HEAD_DIM  # all tensors contiguous [rows, H, HEAD_DIM]
    s_qh = HEAD_DIM
    r = pid // n_ntiles
    nt = pid - r * n_ntiles
    x0 = tl.load(XO + r).to(tl.int64)
    x1 = tl.load(XO + r + 1).to(tl.int64)
    n0 = x0 + nt * BLOCK_N
    qk_scale = scale * 1.4426950408889634
    if n0 < x1:
        w0 = x0
        if max_ctx > 0:
            w0 = tl.maximum(x0, x1 - max_ctx)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        nmask = offs_n < x1
        in_win = nmask & (offs_n >= w0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        if n0 + BLOCK_N > w0:
            c0 = tl.load(CO + r).to(tl.int64)
            c1 = tl.load(CO + r + 1).to(tl.int64)
            kb = tl.load(KC + offs_n[:, None] * s_qm + h * s_qh + offs_d[None, :],
                         mask=nmask[:, None], other=0.0)
            vb = tl.load(VC + offs_n[:, None] * s_qm + h * s_qh + offs_d[None, :],
                         mask=nmask[:, None], other=0.0)
            offs_m0 = tl.arange(0, BLOCK_M)
            for m in range(c0, c1, BLOCK_M):
                offs_m = m + offs_m0
                mask_m = offs_m < c1
                q = tl.load(Q + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :],
                            mask=mask_m[:, None], other=0.0)
                do = tl.load(DO + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :],
                             mask=mask_m[:, None], other=0.0)
                lse2 = tl.load(LSE + offs_m * H + h, mask=mask_m,
                               other=float("inf")) * 1.4426950408889634
                delta = tl.load(DELTA + offs_m * H + h, mask=mask_m, other=0.0)
                qkT = _dot(kb, tl.trans(q), IEEE)
                pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
                dv = _dot_acc(pT.to(do.dtype), do, dv, IEEE)
                dpT = _dot(vb, tl.trans(do), IEEE)
                dsT = pT * (dpT - delta[None, :])
                dk = _dot_acc(dsT.to(q.dtype), q, dk, IEEE)
            dk = tl.where(in_win[:, None], dk * scale, 0.0)
            dv = tl.where(in_win[:, None], dv, 0.0)
        tl.store(DKC + offs_n[:, None] * s_qm + h * s_qh + offs_d[None, :],
                 dk.to(DKC.dtype.element_ty), mask=nmask[:, None])
        tl.store(DVC + offs_n[:, None] * s_qm + h * s_qh + offs_d[None, :],
                 dv.to(DVC.dtype.element_ty), mask=nmask[:, None])


def dcat_bwd_triton(do, q, k, v, k_ctx, v_ctx, o, lse, cand_offsets, ctx_offsets,
                    max_ctx: int, scale: float, max_cands: int, max_ctx_len: int,
                    cfg: DcatConfig | None = None):
    """Backward. do, q, k, v, o: [Cn, H, Dh]; k_ctx, v_ctx: [Lc, H, Dh];
    lse: [Cn, H] fp32 (natural log, from the forward); offsets [R+1].

    Returns (dq, dk, dv [Cn, H, Dh], dk_ctx, dv_ctx [Lc, H, Dh]) in input dtype.
    k_ctx rows must all belong to some request (ctx_offsets[0] == 0,
    ctx_offsets[-1] == Lc), likewise candidates. cfg: the launch config (default:
    ``config.select`` for q's device, dtype and Dh; its ``bwd`` tiles, and whether it runs
    under the interpreter); fit_smem shrinks tiles where fp32 at Dh=128 would not fit.
    """
    Cn, H, Dh = q.shape
    if cfg is None:
        cfg = select(q.device, q.dtype, Dh)
    interp, cfg = cfg.interpret, cfg.bwd
    Lc = k_ctx.shape[0]
    R = cand_offsets.numel() - 1
    # all inputs must be contiguous; grads are contiguous too.
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    dkc, dvc = (torch.empty(k_ctx.shape, device=q.device, dtype=q.dtype) for _ in range(2))
    if R == 0:
        return dq, dk, dv, dkc, dvc
    ieee = q.dtype == torch.float32
    delta = torch.empty((Cn, H), device=q.device, dtype=torch.float32)
    if Cn > 0 and max_cands > 0:
        dqt = cfg.dq
        bm = dqt.rows
        n_mtiles = cdiv(max_cands, bm)
        n_eff = min(max_ctx_len, max_ctx) if max_ctx > 0 else max_ctx_len
        split_size = split_size_for(R * n_mtiles * H, n_eff, dqt.cols, cfg.waves,
                                    cfg.min_split, cfg.split_size, q.device)
        n_split = max(1, cdiv(n_eff, split_size))
        pdq = (torch.empty((n_split, Cn, H, Dh), device=q.device, dtype=torch.float32)
               if n_split > 1 else dq)
        # K/V blocks streamed, q and do resident (fp32 at Dh=128 must shrink to fit)
        dbn, dst = fit_smem(dqt.cols, bm, dqt.stages, 2, 2, Dh, q.element_size())
        kw = {} if interp else dict(num_warps=dqt.warps, num_stages=dst)
        _dcat_bwd_dq_kernel[(R * n_mtiles, H, n_split)](
            q, k, v, k_ctx, v_ctx, o, do, lse, cand_offsets, ctx_offsets, dq, dk, dv, delta, pdq,
            Cn, H, n_mtiles, max_ctx, split_size, scale,
            HEAD_DIM=Dh, BLOCK_M=bm, BLOCK_N=dbn, SPLIT=n_split > 1, IEEE=ieee,
            **kw)
        if n_split > 1:
            torch.sum(pdq, dim=0, out=dq) if q.dtype == torch.float32 else dq.copy_(pdq.sum(0))
    if Lc > 0 and max_ctx_len > 0:
        kvt = cfg.kv
        bn = kvt.rows
        n_ntiles = cdiv(max_ctx_len, bn)
        # q/do blocks streamed, the K/V tile resident
        kbm, kst = fit_smem(kvt.cols, bn, kvt.stages, 2, 2, Dh,
                            q.element_size(), min_rows=16)
        kw = {} if interp else dict(num_warps=kvt.warps, num_stages=kst)
        _dcat_bwd_dkdv_kernel[(R * n_ntiles, H)](
            q, k_ctx, v_ctx, do, lse, delta, cand_offsets, ctx_offsets, dkc, dvc,
            H, n_ntiles, max_ctx, scale,
            HEAD_DIM=Dh, BLOCK_M=kbm, BLOCK_N=bn, IEEE=ieee, **kw)
    return dq, dk, dv, dkc, dvc
