"""GPU correctness of the DCAT op against an fp64 reference (``bench.py --correctness``):
ragged cases with empty requests and histories, max_ctx windows, split histories, and the
"ramp" case whose logits span past 2^127 (the fixed-max forward's overflow fallback).
Notation: H heads, Dh head dim.
"""

from __future__ import annotations

import math

import torch

from pinfm_rec.kernels.dcat import dcat_attention, dcat_reference


def offsets(lens, dev):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), device=dev)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CASES_FULL = [  # (cand lens, ctx lens, max_ctx, heads, Dh)
    ([0, 1, 37, 200, 5, 130], [0, 700, 33, 1500, 1, 64], 0, 4, 64),
    ([0, 1, 37, 200, 5, 130], [0, 700, 33, 1500, 1, 64], 100, 4, 64),
    ([256] * 2, [1024] * 2, 0, 8, 64),
    ([3, 70], [90, 300], 0, 2, 32),
    ([3, 70], [90, 300], 50, 2, 128),
    ([1, 70, 130], [13000, 0, 12500], 0, 2, 64),
    ([1, 70, 130], [700, 300, 2500], 0, 8, 64, "ramp"),
]
# quick: the benchmark's H=8, Dh=64 (kernels shared with the timed part, so few compiles);
# ragged with empty requests and histories, one case with a split history (1500 tokens),
# one with a max_ctx window, one dense (the stock path's flash case in half precision).
CASES_QUICK = [
    ([0, 1, 37, 200, 5, 130], [0, 700, 33, 1500, 1, 64], 0, 8, 64),
    ([0, 1, 37, 200, 5, 130], [0, 700, 33, 1500, 1, 64], 100, 8, 64),
    ([256] * 2, [1024] * 2, 0, 8, 64),
    # long ragged histories (one empty): many splits per request, one request without any
    ([1, 70, 130], [13000, 0, 12500], 0, 2, 64),
    # "ramp": history keys scaled up along each history (x40 at its end), so later scores
    # exceed a split's first-block max by far more than 2^127 allows: the fixed_max forward
    # must detect the overflow and redo the split exactly
    ([1, 70, 130], [700, 300, 2500], 0, 8, 64, "ramp"),
]


def ramp_keys(k_ctx, ctx_offsets, top=40.0):
    """k_ctx [Lc, H, Dh] with each request's keys scaled from 1 (first) to top (last)."""
    xo = ctx_offsets.tolist()
    f = torch.ones(k_ctx.shape[0], device=k_ctx.device)
    for a, b in zip(xo[:-1], xo[1:]):
        if b > a:
            f[a:b] = torch.linspace(1.0, top, b - a, device=k_ctx.device)
    return (k_ctx.float() * f[:, None, None]).to(k_ctx.dtype)


def correctness(dev, cases=CASES_FULL, dtypes=(torch.bfloat16, torch.float16, torch.float32),
                kernels=("triton", "sdpa"), config=None):
    """Worst relative error (output and all gradients) against fp64 per dtype and kernel;
    config: the triton kernels' DcatConfig (None: the selected one per dtype)."""
    res = {}
    for dtype in dtypes:
        worst = {kern: 0.0 for kern in kernels}
        for case in cases:
            if case[5:] == ("ramp",):  # forward only: ramp_check
                continue
            cl, xl, mc, h, dh = case
            co, xo = offsets(cl, dev), offsets(xl, dev)
            ins = [torch.randn(n, h, dh, device=dev, dtype=dtype)
                   for n in (sum(cl),) * 3 + (sum(xl),) * 2]
            ref_in = [t.double().requires_grad_() for t in ins]
            ref = dcat_reference(*ref_in, co, xo, max_ctx=mc)
            g = torch.randn_like(ref)
            ref_g = torch.autograd.grad(ref, ref_in, g)
            for kern in kernels:
                if kern == "sdpa" and dh != 64 and dtype == torch.float32:
                    continue
                xs = [t.clone().requires_grad_() for t in ins]
                try:
                    out = dcat_attention(*xs, co, xo, max_ctx=mc, kernel=kern,
                                         config=config if kern == "triton" else None)
                    grads = torch.autograd.grad(out, xs, g.to(dtype))
                except Exception as e:  # noqa: BLE001  (report, keep going)
                    print(f"  check {dtype} {kern} FAILED: {type(e).__name__}: {e}"[:400])
                    worst[kern] = float("nan")
                    continue
                errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_g)]
                bad = not all(torch.isfinite(t).all() for t in (out,) + grads)
                e = float("nan") if bad else max(errs)
                worst[kern] = e if math.isnan(e) else max(worst[kern], e)
                print(f"  check {str(dtype):15s} {kern:6s} cands={cl} ctx={xl} max_ctx={mc} "
                      f"H={h} Dh={dh}: out/dq/dk/dv/dkc/dvc rel err "
                      + " ".join(f"{x:.1e}" for x in errs), flush=True)
        res[str(dtype).replace("torch.", "")] = worst
    return res


def ramp_check(dev, cases=CASES_FULL, dtypes=(torch.bfloat16, torch.float16),
               kernels=("triton", "sdpa")):
    """Forward on the "ramp" cases (keys scaled up along each history, logits spanning more
    than 2^127): relative error of the output against fp64 per dtype and kernel, and for the
    triton kernel also against itself with fixed_max off ("fixed_vs_exact"): the overflow
    fallback must reproduce the online softmax. Gradients are not compared: at these logits
    every non-maximal probability, and with it most of the gradient, underflows."""
    from dataclasses import replace

    from pinfm_rec.kernels.dcat.config import Variant, select
    res = {}
    for dtype in dtypes:
        worst = {kern: 0.0 for kern in kernels + ("fixed_vs_exact",)}
        for case in cases:
            if case[5:] != ("ramp",):
                continue
            cl, xl, mc, h, dh = case[:5]
            co, xo = offsets(cl, dev), offsets(xl, dev)
            ins = [torch.randn(n, h, dh, device=dev, dtype=dtype)
                   for n in (sum(cl),) * 3 + (sum(xl),) * 2]
            ins[3] = ramp_keys(ins[3], xo)
            ref = dcat_reference(*[t.double() for t in ins], co, xo, max_ctx=mc)
            outs = {}
            for kern in kernels:
                outs[kern] = dcat_attention(*ins, co, xo, max_ctx=mc, kernel=kern)
                worst[kern] = max(worst[kern], rel(outs[kern], ref))
            sel = select(ins[0].device, dtype, dh)
            online = (replace(sel, fwd=replace(sel.fwd, variant=Variant.GLUON_ONLINE))
                      if sel.variant is Variant.GLUON_FIXED_MAX else sel)
            exact = dcat_attention(*ins, co, xo, max_ctx=mc, kernel="triton", config=online)
            worst["fixed_vs_exact"] = max(worst["fixed_vs_exact"], rel(outs["triton"], exact))
            print(f"  ramp {str(dtype):15s} cands={cl} ctx={xl}: out rel err "
                  + " ".join(f"{k} {worst[k]:.1e}" for k in worst), flush=True)
        res[str(dtype).replace("torch.", "")] = {
            k: (float("nan") if not math.isfinite(v) else v) for k, v in worst.items()}
    return res
