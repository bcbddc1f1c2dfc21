"""Triton forward kernel for DCAT crossing attention.

Notation: R requests, Cn candidates total, Lc context tokens total, H heads,
Dh head dim. A program owns one tile of BLOCK_M candidates of one request, one
head, and one split (a contiguous chunk) of that request's history; it streams
the chunk's K/V once with an online softmax (exp2 domain). The candidate's own
key/value (the self term) is folded into split 0 of the same kernel. With more
than one split (flash-decoding style, to fill the GPU at long histories with
few candidates) each program writes a partial (normalised o, log2-LSE) and a
small combine kernel merges them.

On Hopper, for bf16/fp16 and outside the interpreter, ``dcat_fwd_triton`` runs the Gluon
kernel of ``gluon_fwd.py`` instead (same grid, partials and combine; the config's variant,
``config.py``); this module's ``tl`` kernel covers fp32, the interpreter (CI) and other GPUs.

Import this module only after TRITON_INTERPRET is settled (op.py imports it
lazily): triton.jit picks interpreter vs compiler at decoration time.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from .config import FwdConfig, Variant, select

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _attn_block(q, kc_ptrs, vc_ptrs, m_i, l_i, acc, qk_scale, kmask,
                MASKED: tl.constexpr, IEEE: tl.constexpr):
    if MASKED:
        kb = tl.load(kc_ptrs, mask=kmask[:, None], other=0.0)
        vb = tl.load(vc_ptrs, mask=kmask[:, None], other=0.0)
    else:
        kb = tl.load(kc_ptrs)
        vb = tl.load(vc_ptrs)
    return _attn_update(q, kb, vb, m_i, l_i, acc, qk_scale, kmask, MASKED, IEEE)


@triton.jit
def _attn_update(q, kb, vb, m_i, l_i, acc, qk_scale, kmask,
                 MASKED: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:
        qk = tl.dot(q, tl.trans(kb), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(kb))
    if MASKED:
        qk = tl.where(kmask[None, :], qk, float("-inf"))
    # qk_scale > 0 (the launcher flips q's sign otherwise): max before scaling, then one
    # FMA per element (qk * scale - m) instead of a multiply and a subtract.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # accumulate in place (the MMA adds into acc: no separate product tile + add)
    if IEEE:
        acc = tl.dot(p.to(vb.dtype), vb, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(vb.dtype), vb, acc)
    return m_new, l_i, acc


# Integer arguments are not specialised (value 1 / divisibility by 16): every ragged batch
# would otherwise compile its own variant (the GPU correctness phase compiled ~100).
@triton.jit(do_not_specialize=["Cn", "H", "n_mtiles", "max_ctx", "split_size", "SQ", "SKV"])
def _dcat_fwd_kernel(
    Q, K, V, KC, VC, CO, XO, O, LSE, PO, PL, KC_DESC, VC_DESC,
    Cn, H, n_mtiles, max_ctx, split_size, qk_scale, SQ, SKV,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, USE_TMA: tl.constexpr,
):
    # USE_TMA: full history blocks come through host tensor descriptors over the
    # [Lc, H*HEAD_DIM] view (bulk tensor copies on Hopper); the ragged tail block keeps
    # masked pointer loads, so no row of another request enters the softmax.
    pid = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    # [rows, H, HEAD_DIM] with a dense (H, HEAD_DIM) part; row strides: q, k, v SQ * HEAD_DIM
    # (e.g. views of a [rows, 3, H, HEAD_DIM] projection), k_ctx, v_ctx SKV * HEAD_DIM, the
    # outputs H * HEAD_DIM (contiguous). Strides in units of HEAD_DIM: the compiler knows each
    # row starts HEAD_DIM-aligned (vector loads) without specialising on their values
    s_qm = H * HEAD_DIM
    s_in = SQ * HEAD_DIM
    s_kv = SKV * HEAD_DIM
    s_qh = HEAD_DIM
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
    if (m0 < c1) & (s < n_split_r):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < c1
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + offs_m[:, None] * s_in + h * s_qh + offs_d[None, :],
                    mask=mask_m[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if s == 0:
            ks = tl.load(K + offs_m[:, None] * s_in + h * s_qh + offs_d[None, :],
                         mask=mask_m[:, None], other=0.0)
            vs = tl.load(V + offs_m[:, None] * s_in + h * s_qh + offs_d[None, :],
                         mask=mask_m[:, None], other=0.0)
            m_i = tl.sum(q.to(tl.float32) * ks.to(tl.float32), 1) * qk_scale
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
            acc = vs.to(tl.float32)
        kstart = x0 + s * split_size
        kend = tl.minimum(kstart + split_size, x1)
        n_full = (kend - kstart) // BLOCK_N
        offs_n = kstart + tl.arange(0, BLOCK_N)
        kc_ptrs = KC + offs_n[:, None] * s_kv + h * s_qh + offs_d[None, :]
        vc_ptrs = VC + offs_n[:, None] * s_kv + h * s_qh + offs_d[None, :]
        if USE_TMA:
            row = kstart.to(tl.int32)
            col = (h * HEAD_DIM).to(tl.int32)
            for _ in range(0, n_full):
                kb = KC_DESC.load([row, col])
                vb = VC_DESC.load([row, col])
                m_i, l_i, acc = _attn_update(q, kb, vb, m_i, l_i, acc, qk_scale, offs_n,
                                             False, IEEE)
                row += BLOCK_N
            kc_ptrs += n_full * BLOCK_N * s_kv
            vc_ptrs += n_full * BLOCK_N * s_kv
        else:
            for _ in range(0, n_full):
                m_i, l_i, acc = _attn_block(q, kc_ptrs, vc_ptrs, m_i, l_i, acc, qk_scale,
                                            offs_n, False, IEEE)
                kc_ptrs += BLOCK_N * s_kv
                vc_ptrs += BLOCK_N * s_kv
        tail = kstart + n_full * BLOCK_N
        if tail < kend:
            kmask = (tail + tl.arange(0, BLOCK_N)) < kend
            m_i, l_i, acc = _attn_block(q, kc_ptrs, vc_ptrs, m_i, l_i, acc, qk_scale,
                                        kmask, True, IEEE)
        o = acc / l_i[:, None]
        lse2 = m_i + tl.math.log2(l_i)
        if SPLIT:
            prow = (s * Cn + offs_m) * H + h
            tl.store(PO + prow[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask_m[:, None])
            tl.store(PL + prow, lse2, mask=mask_m)
        else:
            tl.store(O + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :],
                     o.to(O.dtype.element_ty), mask=mask_m[:, None])
            tl.store(LSE + offs_m * H + h, lse2 * 0.6931471805599453, mask=mask_m)


@triton.jit(do_not_specialize=["Cn", "H", "n_mtiles", "max_ctx", "split_size"])
def _dcat_combine_kernel(
    CO, XO, O, LSE, PO, PL, Cn, H, n_mtiles, max_ctx, split_size,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    s_qm = H * HEAD_DIM
    s_qh = HEAD_DIM
    r = pid // n_mtiles
    mt = pid - r * n_mtiles
    c0 = tl.load(CO + r).to(tl.int64)
    c1 = tl.load(CO + r + 1).to(tl.int64)
    m0 = c0 + mt * BLOCK_M
    if m0 < c1:
        x0 = tl.load(XO + r).to(tl.int64)
        x1 = tl.load(XO + r + 1).to(tl.int64)
        if max_ctx > 0:
            x0 = tl.maximum(x0, x1 - max_ctx)
        n_split_r = tl.maximum(tl.cdiv(x1 - x0, split_size), 1)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < c1
        offs_d = tl.arange(0, HEAD_DIM)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for s in range(0, n_split_r):
            prow = (s * Cn + offs_m) * H + h
            lse_s = tl.load(PL + prow, mask=mask_m, other=0.0)
            o_s = tl.load(PO + prow[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_m[:, None],
                          other=0.0)
            m_new = tl.maximum(m_i, lse_s)
            alpha = tl.math.exp2(m_i - m_new)
            w = tl.math.exp2(lse_s - m_new)
            l_i = l_i * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * o_s
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(O + offs_m[:, None] * s_qm + h * s_qh + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=mask_m[:, None])
        tl.store(LSE + offs_m * H + h, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
                 mask=mask_m)


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# Shared memory a tl kernel may take (the H100/H200 limit is 227 KB per block); the estimate
# below over-counts Triton's real use a little, which keeps the margin on the safe side.
SMEM_BUDGET = 220 * 1024


def fit_smem(stream_rows: int, resident_rows: int, stages: int, n_stream: int,
             n_resident: int, dh: int, elem: int, min_rows: int = 32):
    """Shrink a tl kernel's streamed tile (rows, then pipeline stages) until its shared memory
    estimate fits SMEM_BUDGET: n_stream [stream_rows, dh] tiles per stage plus n_resident
    [resident_rows, dh] tiles. The bf16/fp16 defaults fit unchanged; fp32 at Dh=128 does not
    (a 128-key fp32 K/V block pipelined 3 deep asks for 360 KB)."""
    def est(rows, st):
        return (st * n_stream * rows + n_resident * resident_rows) * dh * elem
    while est(stream_rows, stages) > SMEM_BUDGET and stream_rows > min_rows:
        stream_rows //= 2
    while est(stream_rows, stages) > SMEM_BUDGET and stages > 1:
        stages -= 1
    return stream_rows, stages


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints (``triton.cdiv`` is a JIT callable: ~4 us per host call)."""
    return -(-a // b)


_GLUON_FAILED: list = []  # the error, once the Gluon kernel failed to build in this process

# Row-strided q/k/v and K/V cache (``rows_stride``) are read in place by both kernels: the tl
# kernel (CI, through the interpreter) and the Gluon (Hopper) kernel, checked on an H100 on
# 2026-12-07 (scripts/gpu/dcat_strided_check.py: bit-equal to contiguous inputs at 7 anchor
# shapes, GPU time per call 21.6 -> 9.6 us at (1, 512, 64); the GPU suite passed with it on).
# PINFM_DCAT_GLUON_STRIDED=0 makes the Gluon kernel's inputs contiguous first, as before.
GLUON_STRIDED = os.environ.get("PINFM_DCAT_GLUON_STRIDED", "1") != "0"


def _gluon_module():
    """gluon_launch, imported on first use (it needs Triton's Gluon; CPU runs never get here
    unless a test asks)."""
    global _gluon
    if _gluon is None:
        from . import gluon_launch
        _gluon = gluon_launch
    return _gluon


_gluon = None


def _gluon_usable(q, k_ctx, v_ctx, cfg: FwdConfig) -> bool:
    if not cfg.variant.gluon or _GLUON_FAILED:
        return False
    return _gluon_module().usable(q, k_ctx, v_ctx, cfg)


def split_size_for(base: int, n_eff_max: int, block_n: int, waves: float, min_split: int,
                   split_size: int | None, device) -> int:
    """History keys per split: enough splits that base x splits programs fill ``waves`` x SMs,
    none shorter than min_split keys, a multiple of block_n (split_size forces it)."""
    if n_eff_max <= 0:
        return block_n
    if split_size:
        return int(split_size)
    want = math.ceil(waves * sm_count(device) / max(base, 1))
    s = max(1, min(want, n_eff_max // min_split))
    return cdiv(cdiv(n_eff_max, s), block_n) * block_n


def _tl_descriptors(k_ctx, v_ctx, Lc, H, Dh, bn, row_stride):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return (TensorDescriptor(k_ctx, [Lc, H * Dh], [row_stride, 1], [bn, Dh]),
            TensorDescriptor(v_ctx, [Lc, H * Dh], [row_stride, 1], [bn, Dh]))


def _launch_tl(grid, args, k_ctx, v_ctx, Cn, H, Dh, n_mtiles, max_ctx, split_size, qk_scale,
               cfg: FwdConfig, split: bool, ieee: bool, elem: int, tile=None, sq=None, skv=None):
    """sq, skv: row strides of q/k/v and of k_ctx/v_ctx in units of Dh (None: contiguous, H)."""
    sq = H if sq is None else sq
    skv = H if skv is None else skv
    # TMA needs a 16-byte aligned history base (a view into a buffer may not have one)
    use_tma = cfg.tma and k_ctx.shape[0] > 0 and not (k_ctx.data_ptr() | v_ctx.data_ptr()) & 15
    # split_size stays a multiple of the (possibly halved) key block; tile: the plan's
    bn, stages = tile or fit_smem(cfg.block_n, cfg.block_m, cfg.num_stages, 2, 1, Dh, elem)
    if use_tma and bn == cfg.block_n:
        kd, vd = _tl_descriptors(k_ctx, v_ctx, k_ctx.shape[0], H, Dh, bn, skv * Dh)
    else:
        use_tma, kd, vd = False, k_ctx, v_ctx
    interp = cfg.variant is Variant.INTERPRET
    _dcat_fwd_kernel[grid](
        *args, kd, vd, Cn, H, n_mtiles, max_ctx, split_size, qk_scale, sq, skv,
        HEAD_DIM=Dh, BLOCK_M=cfg.block_m, BLOCK_N=bn, SPLIT=split, IEEE=ieee, USE_TMA=use_tma,
        **({} if interp else dict(num_warps=cfg.num_warps, num_stages=stages)))


def rows_stride(a, b, c=None) -> int:
    """The common row stride, in units of Dh, of [rows, H, Dh] tensors a, b (and c) whose
    (H, Dh) part is dense (strides (Dh, 1)): e.g. q, k, v sliced from one [rows, 3, H, Dh]
    projection, or a KV cache kept as such slices; 0 when they differ or are not of that kind
    (the caller then makes them contiguous)."""
    dh, h = a.shape[2], a.shape[1]
    if a.shape[0] <= 1:  # one row: its stride is never used (and may be anything): H
        dense = all(t.stride()[1:] == (dh, 1) for t in (a, b, c) if t is not None)
        return h if dense or h * dh == 0 else 0
    st = a.stride()
    if b.stride() != st or (c is not None and c.stride() != st):
        return 0
    if st[1] != dh or st[2] != 1 or st[0] % dh or st[0] < h * dh or st[0] // dh >= 2 ** 31:
        return 0
    return st[0] // dh


class _Plan:
    """The per-shape decisions of a forward call (``plan_for``): made once per key, reused by
    every call with the same (config, device, dtypes, R, H, Dh, max_cands, max_ctx_len,
    max_ctx)."""
    __slots__ = ("cfg", "n_mtiles", "split_size", "n_split", "split", "grid", "gluon",
                 "tl_tile", "combine_grid", "combine_kw")


_PLANS: dict = {}
_MAX_PLANS = 512  # distinct shape keys kept (a ragged serving load has a few per bucket)


def plan_for(key, q, cfg: FwdConfig | None, R: int, H: int, Dh: int, max_cands: int,
             max_ctx_len: int, max_ctx: int) -> _Plan:
    """The cached plan of ``key`` (see ``dcat_fwd_triton``), made on a miss: the config
    (``config.select`` when cfg is None), the split size and count, the launch grids, and
    whether the Gluon kernel can take inputs of this device, dtype, H and Dh (the per-call
    part, a non-empty and 16-byte aligned history, is checked per call)."""
    p = _PLANS.get(key)
    if p is not None:
        return p
    if cfg is None:
        cfg = select(q.device, q.dtype, Dh).fwd
    p = _Plan()
    p.cfg = cfg
    n_eff = min(max_ctx_len, max_ctx) if max_ctx > 0 else max_ctx_len
    p.n_mtiles = cdiv(max_cands, cfg.block_m) if max_cands > 0 else 0
    p.split_size = split_size_for(R * p.n_mtiles * H, n_eff, cfg.block_n, cfg.waves,
                                  cfg.min_split, cfg.split_size, q.device)
    p.n_split = max(1, cdiv(n_eff, p.split_size))
    p.split = p.n_split > 1
    p.grid = (R * p.n_mtiles, H, p.n_split)
    p.tl_tile = fit_smem(cfg.block_n, cfg.block_m, cfg.num_stages, 2, 1, Dh, q.element_size())
    cm = cdiv(max_cands, 64) if max_cands > 0 else 0
    p.combine_grid = (R * cm, H)
    p.combine_kw = dict(HEAD_DIM=Dh, BLOCK_M=64, **({} if cfg.variant is Variant.INTERPRET
                                                    else dict(num_warps=4)))
    p.gluon = None
    if cfg.variant.gluon and _gluon_module().usable_for(q.is_cuda, q.dtype, Dh, H, cfg):
        # key[5]: k_ctx's dtype (the descriptors' dtype decides the fixed-max softmax)
        p.gluon = _gluon.GluonPlan(cfg, key[5], Dh, p.split,
                                   (H, p.n_mtiles, max_ctx, p.split_size), key[1:9])
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = p
    return p


def dcat_fwd_triton(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, max_ctx: int,
                    scale: float, max_cands: int, max_ctx_len: int,
                    cfg: FwdConfig | None = None, need_lse: bool = True):
    """Forward. q, k, v: [Cn, H, Dh]; k_ctx, v_ctx: [Lc, H, Dh]; offsets [R+1]. q, k, v (and
    k_ctx, v_ctx) are read in place when they share one row stride over a dense (H, Dh) part
    (``rows_stride``: slices of a qkv projection), else made contiguous first.

    max_cands / max_ctx_len: max candidates / history tokens per request. cfg: the launch
    config (default: ``config.select`` for q's device, dtype and Dh).
    need_lse=False (inference, no backward): lse may be scratch that the next call on the
    stream overwrites (``gluon_launch.lse_scratch``; one allocation less per call).
    Returns (o [Cn, H, Dh] in q's dtype, lse [Cn, H] fp32, natural log).
    Host side: the per-shape decisions are cached (``plan_for``); a call does one dict lookup,
    allocates its outputs and launches.
    """
    Cn, H, Dh = q.shape
    R = cand_offsets.shape[0] - 1
    if scale < 0:  # the kernel takes the row max before scaling: needs scale > 0
        q, scale = -q, -scale
    # row strides (units of Dh): q, k, v and k_ctx, v_ctx may be row-strided views with a
    # dense (H, Dh) part (slices of the layer's qkv projection): read in place, no copies
    sq = rows_stride(q, k, v)
    if not sq:
        q, k, v, sq = q.contiguous(), k.contiguous(), v.contiguous(), H
    skv = rows_stride(k_ctx, v_ctx)
    if not skv:
        k_ctx, v_ctx, skv = k_ctx.contiguous(), v_ctx.contiguous(), H
    o = q.new_empty((Cn, H, Dh))
    if Cn == 0 or R <= 0 or max_cands <= 0:
        return o, q.new_empty((Cn, H), dtype=torch.float32)
    key = (id(cfg), q.get_device(), q.dtype, k.dtype, v.dtype, k_ctx.dtype, v_ctx.dtype,
           cand_offsets.dtype, ctx_offsets.dtype, R, H, Dh, max_cands, max_ctx_len, max_ctx)
    p = _PLANS.get(key) or plan_for(key, q, cfg, R, H, Dh, max_cands, max_ctx_len, max_ctx)
    if p.gluon is not None and not GLUON_STRIDED and (sq != H or skv != H):
        # PINFM_DCAT_GLUON_STRIDED=0: the Gluon kernel gets contiguous inputs
        q, k, v, sq = q.contiguous(), k.contiguous(), v.contiguous(), H
        k_ctx, v_ctx, skv = k_ctx.contiguous(), v_ctx.contiguous(), H
    if need_lse or p.gluon is None:
        lse = q.new_empty((Cn, H), dtype=torch.float32)
    else:  # inference on the Hopper path: nobody reads lse after the call
        lse = _gluon.lse_scratch(q, Cn, H)
    cfg = p.cfg
    split = p.split
    if split and p.gluon is not None:  # scratch shared by the calls on one stream
        po, pl = _gluon.split_scratch(q, p.n_split, Cn, H, Dh)
    elif split:
        po = q.new_empty((p.n_split, Cn, H, Dh), dtype=torch.float32)
        pl = q.new_empty((p.n_split, Cn, H), dtype=torch.float32)
    else:
        po, pl = o, lse
    grid = p.grid
    qk_scale = scale * LOG2E
    combined, ran = False, False
    gp = p.gluon
    if gp is not None and not _GLUON_FAILED and k_ctx.shape[0] > 0:
        kv_bits = k_ctx.data_ptr() | v_ctx.data_ptr()
        if not kv_bits & 15:  # TMA: a 16-byte aligned history
            ptr_bits = (kv_bits | q.data_ptr() | k.data_ptr() | v.data_ptr()
                        | cand_offsets.data_ptr() | ctx_offsets.data_ptr())
            try:
                combined = _gluon.launch(grid, q, k, v, k_ctx, v_ctx, cand_offsets,
                                         ctx_offsets, o, lse, po, pl, Cn, H, p.n_mtiles,
                                         max_ctx, p.split_size, qk_scale, cfg, split, gp,
                                         not ptr_bits & 15, sq, skv)
                ran = True
            except (CompilationError, OutOfResources) as e:
                # Gluon's API still moves between Triton releases: the tl kernel computes
                # the same
                _GLUON_FAILED.append(repr(e)[:500])
                warnings.warn(f"DCAT Gluon forward unavailable ({type(e).__name__}); using "
                              f"the tl kernel from now on: {str(e)[:300]}", RuntimeWarning,
                              stacklevel=2)
    if not ran:
        _launch_tl(grid, (q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, o, lse, po, pl),
                   k_ctx, v_ctx, Cn, H, Dh, p.n_mtiles, max_ctx, p.split_size, qk_scale, cfg,
                   split, q.dtype == torch.float32, q.element_size(), p.tl_tile, sq, skv)
    if split and not combined:
        _dcat_combine_kernel[p.combine_grid](
            cand_offsets, ctx_offsets, o, lse, po, pl,
            Cn, H, p.combine_grid[0] // R, max_ctx, p.split_size, **p.combine_kw)
    return o, lse
