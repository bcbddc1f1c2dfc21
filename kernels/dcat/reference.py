"""PyTorch reference and stock (SDPA) paths for DCAT crossing attention.

Notation: R requests, Cn candidates in total, Lc context (history) tokens in
total, H heads, Dh head dim. Candidate j of request r attends over the
(optionally last ``max_ctx``) history tokens of r plus itself; candidates never
see each other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dcat_reference", "dcat_sdpa", "pad_index"]


def _lengths(offsets: Tensor) -> Tensor:
    return (offsets[1:] - offsets[:-1]).long()


def pad_index(offsets: Tensor, max_len: int | None = None, total: int | None = None):
    """Request id and in-request position of every row of a jagged tensor.

    offsets: [R+1]; max_len / total (N): host-side sizes when known (else read from the device).
    Returns (req [N] int64, pos [N] int64, max_len int).
    """
    offsets = offsets.long()
    lens = _lengths(offsets)
    n = total if total is not None else (int(offsets[-1].item()) if offsets.numel() > 0 else 0)
    r = lens.numel()
    req = torch.repeat_interleave(torch.arange(r, device=offsets.device), lens, output_size=n)
    pos = torch.arange(n, device=offsets.device) - offsets[:-1][req]
    if max_len is None:
        max_len = int(lens.max().item()) if r > 0 else 0
    return req, pos, max_len


def _ctx_valid(ctx_offsets: Tensor, nmax: int, max_ctx: int) -> Tensor:
    """Bool [R, nmax]: padded history position n of request r is attended."""
    lens = _lengths(ctx_offsets)
    ar = torch.arange(nmax, device=ctx_offsets.device)
    valid = ar[None, :] < lens[:, None]
    if max_ctx > 0:
        valid = valid & (ar[None, :] >= (lens[:, None] - max_ctx))
    return valid


def dcat_reference(q: Tensor, k: Tensor, v: Tensor, k_ctx: Tensor, v_ctx: Tensor,
                   cand_offsets: Tensor, ctx_offsets: Tensor, *, max_ctx: int = 0,
                   scale: float | None = None, return_lse: bool = False,
                   max_cands: int | None = None, max_ctx_len: int | None = None):
    """Dense padded reference (fp32 accumulation, fully differentiable).

    q, k, v: [Cn, H, Dh]; k_ctx, v_ctx: [Lc, H, Dh]; cand_offsets, ctx_offsets:
    [R+1]. Returns o [Cn, H, Dh] in q's dtype (and lse [Cn, H] fp32 if
    ``return_lse``). Computation is done in fp32 (fp64 if inputs are fp64).
    """
    Cn, H, Dh = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(Dh)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    R = cand_offsets.numel() - 1
    # sizes from shapes / the caller (no sync): max_cands / max_ctx_len must be upper bounds of
    # the true maxima (an under-estimate indexes out of range: a device-side assert on CUDA)
    creq, cpos, cmax = pad_index(cand_offsets, max_cands, Cn)
    xreq, xpos, nmax = pad_index(ctx_offsets, max_ctx_len, k_ctx.shape[0])
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    kc = k_ctx.to(acc).new_zeros(R, nmax, H, Dh).index_put((xreq, xpos), k_ctx.to(acc))
    vc = v_ctx.to(acc).new_zeros(R, nmax, H, Dh).index_put((xreq, xpos), v_ctx.to(acc))
    qp = qf.new_zeros(R, cmax, H, Dh).index_put((creq, cpos), qf)
    s_ctx = torch.einsum("rchd,rnhd->rhcn", qp, kc) * scale  # [R, H, Cmax, Nmax]
    valid = _ctx_valid(ctx_offsets, nmax, max_ctx)
    s_ctx = s_ctx.masked_fill(~valid[:, None, None, :], float("-inf"))
    s_self = (qf * kf).sum(-1) * scale  # [Cn, H]
    s_ctx_c = s_ctx.permute(0, 2, 1, 3)[creq, cpos]  # [Cn, H, Nmax]
    s_all = torch.cat([s_ctx_c, s_self[..., None]], dim=-1)
    lse = torch.logsumexp(s_all, dim=-1)  # [Cn, H]
    p = torch.exp(s_all - lse[..., None])
    p_ctx = p[..., :nmax]
    o = torch.einsum("chn,cnhd->chd", p_ctx, vc[creq]) + p[..., nmax:] * vf
    o = o.to(q.dtype)
    if return_lse:
        return o, lse.float() if acc == torch.float32 else lse
    return o


# ----------------------------------------------------------------------------
# Stock path: SDPA kernels (flash where possible) + self term merged by LSE.
# ----------------------------------------------------------------------------

def _attn_fwd(qp, kp, vp, bias, scale):
    """qp [R,H,C,Dh], kp/vp [R,H,N,Dh]; bias None or additive [R,H,C,N].

    Returns (o [R,H,C,Dh], lse [R,H,C] fp32, saved-state tuple)."""
    if qp.is_cuda:
        if bias is None and qp.dtype in (torch.float16, torch.bfloat16):
            res = torch.ops.aten._scaled_dot_product_flash_attention(
                qp, kp, vp, 0.0, False, False, scale=scale)
            o, lse = res[0], res[1]
            return o, lse, ("flash", res[2], res[3], res[4], res[5], res[6], res[7])
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            qp, kp, vp, bias, True, 0.0, False, scale=scale)
        o, lse = res[0], res[1][..., : qp.shape[2]]
        return o, lse, ("eff", res[2], res[3])
    mask = None if bias is None else bias.to(qp.dtype)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qp, kp, vp, 0.0, False, attn_mask=mask, scale=scale)
    return o, lse, ("cpu",)


def _attn_bwd(state, do, qp, kp, vp, bias, out, lse, scale):
    kind = state[0]
    if kind == "flash":
        _, csq, csk, mq, mk, seed, off = state
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, qp, kp, vp, out, lse, csq, csk, mq, mk, 0.0, False, seed, off, scale=scale)
    if kind == "eff":
        _, seed, off = state
        c = qp.shape[2]
        lse_p = lse.new_full(lse.shape[:-1] + (((c + 31) // 32) * 32,), float("inf"))
        lse_p[..., :c] = lse
        g = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            do, qp, kp, vp, bias, out, lse_p, seed, off, 0.0, [True, True, True, False],
            False, scale=scale)
        return g[0], g[1], g[2]
    mask = None if bias is None else bias.to(qp.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, qp, kp, vp, out, lse, 0.0, False, attn_mask=mask, scale=scale)


class _CtxAttnMerged(torch.autograd.Function):
    """Context attention by a stock SDPA kernel, self term merged by LSE.

    The backward runs the stock SDPA backward with the *merged* output and
    LSE (D = rowsum(dO * O_final), P = exp(S - lse_final)), which is exactly
    the gradient including the dependence of the merge weights on lse_ctx.
    """

    @staticmethod
    def forward(ctx, qp, kp, vp, ks, vs, bias, has_ctx, scale):
        # qp,ks,vs [R,H,C,Dh]; kp,vp [R,H,N,Dh]; has_ctx [R] bool.
        s_self = (qp.float() * ks.float()).sum(-1) * scale  # [R,H,C]
        if kp.shape[2] > 0:
            o_c, lse_c, state = _attn_fwd(qp, kp, vp, bias, scale)
            lse_c = lse_c.float()
            lse_c = torch.where(has_ctx[:, None, None], lse_c, float("-inf"))
            lse = torch.logaddexp(lse_c, s_self)
            w = torch.exp(lse_c - lse)[..., None]
            o = (w * torch.nan_to_num(o_c.float()) + torch.exp(s_self - lse)[..., None] * vs.float())
        else:
            state = None
            lse = s_self
            o = vs.float()
        o = o.to(qp.dtype)
        ctx.state, ctx.scale = state, scale
        ctx.save_for_backward(qp, kp, vp, ks, vs, bias, o, lse, s_self)
        return o

    @staticmethod
    def backward(ctx, do):
        qp, kp, vp, ks, vs, bias, o, lse, s_self = ctx.saved_tensors
        scale = ctx.scale
        do = do.contiguous() if do.stride(-1) != 1 else do
        if ctx.state is not None:
            dq, dk, dv = _attn_bwd(ctx.state, do, qp, kp, vp, bias, o, lse.to(torch.float32), scale)
            dq = dq.float()
        else:
            dq = torch.zeros_like(qp, dtype=torch.float32)
            dk = dv = None
        p_self = torch.exp(s_self - lse)[..., None]
        dof = do.float()
        delta = (dof * o.float()).sum(-1, keepdim=True)
        ds = p_self * ((dof * vs.float()).sum(-1, keepdim=True) - delta)
        dq = (dq + ds * ks.float() * scale).to(qp.dtype)
        dks = (ds * qp.float() * scale).to(qp.dtype)
        dvs = (p_self * dof).to(qp.dtype)
        return dq, dk, dv, dks, dvs, None, None, None


def dcat_sdpa(q: Tensor, k: Tensor, v: Tensor, k_ctx: Tensor, v_ctx: Tensor,
              cand_offsets: Tensor, ctx_offsets: Tensor, *, max_ctx: int = 0,
              scale: float | None = None, max_cands: int | None = None,
              max_ctx_len: int | None = None) -> Tensor:
    """Stock PyTorch path: SDPA cross-attention over the padded history plus the
    self term merged by log-sum-exp in separate ops (differentiable).

    q, k, v: [Cn, H, Dh]; k_ctx, v_ctx: [Lc, H, Dh]; offsets [R+1].
    Returns o [Cn, H, Dh]. Equal-length requests (no max_ctx) use pure views
    and FlashAttention on CUDA; ragged batches pad to [R, H, Cmax, Dh] /
    [R, H, Nmax, Dh] with an additive mask (memory-efficient kernel on CUDA).
    """
    Cn, H, Dh = q.shape
    Lc = k_ctx.shape[0]
    R = cand_offsets.numel() - 1
    if scale is None:
        scale = 1.0 / math.sqrt(Dh)
    if Cn == 0 or R == 0:
        return q.clone()
    if max_cands is None:
        max_cands = int(_lengths(cand_offsets).max().item())
    if max_ctx_len is None:
        max_ctx_len = int(_lengths(ctx_offsets).max().item()) if Lc > 0 else 0
    dense = (R * max_cands == Cn and R * max_ctx_len == Lc
             and (max_ctx <= 0 or max_ctx >= max_ctx_len)
             and not (q.is_cuda and q.dtype == torch.float32))  # eff. kernel needs a bias
    if dense:
        def cview(t, n):
            return t.view(R, n, H, Dh).transpose(1, 2)
        qp, ks, vs = cview(q, max_cands), cview(k, max_cands), cview(v, max_cands)
        kp, vp = cview(k_ctx, max_ctx_len), cview(v_ctx, max_ctx_len)
        bias = None
        has_ctx = torch.full((R,), max_ctx_len > 0, device=q.device, dtype=torch.bool)
        o = _CtxAttnMerged.apply(qp, kp, vp, ks, vs, bias, has_ctx, scale)
        return o.transpose(1, 2).reshape(Cn, H, Dh)
    odt = q.dtype
    if q.is_cuda and odt != torch.float32:
        # the memory-efficient kernel's half-precision backward with a padding mask
        # gave wrong dq/dk (NaN) on H100 with torch 2.11: run the ragged case in fp32.
        q, k, v, k_ctx, v_ctx = (t.float() for t in (q, k, v, k_ctx, v_ctx))
    creq, cpos, cmax = pad_index(cand_offsets, max_cands)
    xreq, xpos, nmax = pad_index(ctx_offsets, max_ctx_len)
    if max_ctx > 0:
        nmax = min(nmax, max_ctx)
        lens = _lengths(ctx_offsets)
        shift = (lens - max_ctx).clamp(min=0)[xreq]
        xpos = xpos - shift
        keep = xpos >= 0
        xreq, xpos = xreq[keep], xpos[keep]
        k_ctx, v_ctx = k_ctx[keep], v_ctx[keep]
        lens = lens.clamp(max=max_ctx)
    else:
        lens = _lengths(ctx_offsets)

    def pad(t, req, pos, n):
        return t.new_zeros(R, n, H, Dh).index_put((req, pos), t).transpose(1, 2)

    qp, ks, vs = pad(q, creq, cpos, cmax), pad(k, creq, cpos, cmax), pad(v, creq, cpos, cmax)
    kp, vp = pad(k_ctx, xreq, xpos, nmax), pad(v_ctx, xreq, xpos, nmax)
    nal = ((nmax + 15) // 16) * 16
    valid = torch.arange(nal, device=q.device)[None, :] < lens[:, None]
    bias_dtype = q.dtype if q.is_cuda else torch.float32
    bias = torch.zeros(R, 1, 1, nal, device=q.device, dtype=bias_dtype)
    bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
    bias = bias.expand(R, H, cmax, nal).contiguous()[..., :nmax]
    o = _CtxAttnMerged.apply(qp, kp, vp, ks, vs, bias, lens > 0, scale)
    return o.transpose(1, 2)[creq, cpos].to(odt)
