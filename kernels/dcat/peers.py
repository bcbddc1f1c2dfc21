"""Peers and host timing for the DCAT benchmark (``bench.py``): the same crossing attention
with ``torch.nn.attention.flex_attention`` (issue 15's nearest peer), and the host time per
eager call. Notation: R requests, L history tokens and C candidates per request (equal
lengths), H heads, Dh head dim.
"""

from __future__ import annotations

import torch


def flex_dcat(R, L, C, device="cuda", compile=True):
    """The same crossing attention with ``torch.nn.attention.flex_attention`` (compiled), the
    nearest peer: per request, the C candidates attend over [history (L); candidates (C)] with
    the block mask ``kv < L or kv - L == q``. Returns fn(q4, k4, v4) on [R, H, C or L+C, Dh]
    (``flex_inputs``: history and candidates concatenated outside the timing) -> [R, H, C, Dh],
    or None without flex_attention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < L) | (kv_idx - L == q_idx)
    bm = create_block_mask(mask_mod, R, None, C, L + C, device=device)
    if compile:
        _allow_recompiles(64)
    fa = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
    return lambda q4, k4, v4: fa(q4, k4, v4, block_mask=bm)


def _allow_recompiles(n: int) -> None:
    """Let dynamo keep ``n`` compiled versions of one function (default 8). Every
    ``flex_dcat`` shape is a static-shape recompile of ``flex_attention``: past the limit dynamo
    silently runs it uncompiled (the serving bench's 9th (L, C) timed eager flex, ~4x slower, and
    its CUDA graph capture failed on a host copy), which would flatter ours against this peer."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))


def flex_inputs(q, k, v, kc, vc, R, L, C):
    """[R*C, H, Dh] candidates and [R*L, H, Dh] histories (equal lengths per request) ->
    flex_attention's q [R, H, C, Dh] and k, v [R, H, L+C, Dh]."""
    h, dh = q.shape[1:]

    def cat(ctx, cand):
        return torch.cat([ctx.view(R, L, h, dh), cand.view(R, C, h, dh)], 1).transpose(1, 2)
    return (q.view(R, C, h, dh).transpose(1, 2).contiguous(), cat(kc, k).contiguous(),
            cat(vc, v).contiguous())


def host_us(fn, n=200):
    """Host (CPU) time per call of fn in eager mode, GPU queue not waited for: the launch
    overhead a caller pays when the GPU keeps up."""
    import time
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def host_us_median(fn, n=200, repeats=5):
    """Median of ``repeats`` ``host_us`` runs of n calls each, after 3 warm-up calls: a single
    run swings by 1.5-2x on the shared GPU hosts (a preempted run, a GC pass)."""
    import statistics
    for _ in range(3):
        fn()
    return statistics.median(host_us(fn, n) for _ in range(repeats))
