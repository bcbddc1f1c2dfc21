"""Launch-config sweep of the DCAT Triton kernels (``bench.py --sweep``).

Times candidate configs by CUDA-graph GPU time over the benchmark shapes and returns the best
(by geomean of time / per-shape best) as a new :class:`~config.DcatConfig`, after checking it
against the fp64 reference (the selected default is returned if it fails). Nothing global
changes: the caller passes the result on (``dcat_attention(..., config=...)``). History of
what was tried and why: docs/dcat-history.md.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from pinfm_rec.kernels.dcat.bench import DH, SHAPES, _graph_bench, geomean, make
from pinfm_rec.kernels.dcat.check import CASES_QUICK, correctness
from pinfm_rec.kernels.dcat.config import DcatConfig, Tile, as_json, select


def candidates(base: DcatConfig):
    """Forward, dq and dkdv candidates around ``base`` (most promising first: the time share
    may cut the list). Run 12 chose the defaults; runs 2-6 and sessions 3-5 tried the rest
    (docs/dcat-history.md)."""
    f = base.fwd
    fwd = [f, replace(f, fuse_combine=False), replace(f, waves=1.0), replace(f, waves=2.0),
           replace(f, num_stages=2), replace(f, block_m=128, block_n=64),
           replace(f, tma=not f.tma)]
    b = base.bwd
    dqs = [replace(b, dq=Tile(bm, bn, w, st), waves=wv)
           for bm, bn, w, st in ((64, 32, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 32, 4, 3),
                                 (64, 32, 4, 4)) for wv in (2.0, 3.8)]
    kvs = [dict(kv=Tile(bn, bm, w, st))
           for bn, bm, w, st in ((128, 32, 4, 2), (64, 64, 4, 1), (128, 32, 4, 3), (64, 64, 4, 2),
                                 (128, 64, 8, 2), (64, 32, 4, 2))]
    return fwd, dqs, kvs


def sweep(dev, budget_s=120.0) -> tuple[DcatConfig, dict]:
    """Tune launch configs by CUDA-graph GPU time over all SHAPES (bf16). Returns (the best
    config, a JSON-able report); the default config if the best fails the fp64 check."""
    import time

    from pinfm_rec.kernels.dcat import triton_bwd, triton_fwd
    t0 = time.time()
    default = select(dev, torch.bfloat16, DH)
    fwd, dqs, kvs = candidates(default)
    sc = DH ** -0.5
    data = [(R, L, C, make(R, L, C, torch.bfloat16, dev)) for R, L, C in SHAPES]

    def run(cands, mk, share):
        times, t1 = [], time.time()
        for cfg in cands:
            if time.time() - t1 > share * budget_s:
                print("  sweep time share used up", flush=True)
                break
            row = []
            for R, L, C, ins in data:
                try:
                    row.append(_graph_bench(mk(cfg, R, L, C, ins), rep=5))
                except Exception as e:  # noqa: BLE001
                    print("  cfg failed", cfg, type(e).__name__, flush=True)
                    row.append(None)
            if all(t is not None for t in row):
                times.append((cfg, row))
        if not times:
            return [dict(score=None, cfg={}, us=[])]
        best = [min(r[i] for _, r in times) for i in range(len(SHAPES))]
        scored = sorted(((geomean([t / b for t, b in zip(r, best)]), c, r) for c, r in times),
                        key=lambda x: x[0])
        for sco, c, r in scored[:5]:
            print(f"  {sco:.3f} {c} " + " ".join(f"{t*1e3:.1f}" for t in r), flush=True)
        print("  per-shape best us: " + " ".join(f"{b*1e3:.1f}" for b in best), flush=True)
        out = [dict(score=sco, cfg=c, us=[t * 1e3 for t in r]) for sco, c, r in scored]
        out[0]["per_shape_best"] = [
            dict(us=best[i] * 1e3, cfg=min(times, key=lambda x: x[1][i])[0])
            for i in range(len(SHAPES))]
        return out

    def mk_fwd(cfg, R, L, C, ins):
        q, k, v, qc, kc, vc, co, xo = ins
        return lambda: triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, sc, C, L, cfg)

    def mk_bwd(cfg, R, L, C, ins):
        q, k, v, qc, kc, vc, co, xo = ins
        o, lse = triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, sc, C, L, default.fwd)
        do = torch.randn_like(o)
        full = DcatConfig(default.fwd, cfg)
        return lambda: triton_bwd.dcat_bwd_triton(do, q, k, v, kc, vc, o, lse, co, xo, 0, sc,
                                                  C, L, full)
    print("== sweep fwd (score, cfg, GPU us per shape)", flush=True)
    rf = run(fwd, mk_fwd, 0.55)
    best_fwd = rf[0]["cfg"] or default.fwd
    print("== sweep bwd dq", flush=True)
    rq = run(dqs, mk_bwd, 0.25)
    best_dq = rq[0]["cfg"] or default.bwd
    print("== sweep bwd dkdv", flush=True)
    rk = run([replace(best_dq, **kv) for kv in kvs], mk_bwd, 0.2)
    chosen = DcatConfig(best_fwd, rk[0]["cfg"] or best_dq)
    print("chosen", chosen, flush=True)
    # the chosen config against the fp64 reference; the default if it fails
    chk = correctness(dev, CASES_QUICK[:2], (torch.bfloat16,), kernels=("triton",),
                      config=chosen)
    errs = [v["triton"] for v in chk.values()]
    worst = float("nan") if any(math.isnan(e) for e in errs) else max(errs)
    if not worst < 2e-2:
        print("  chosen config FAILED the check, back to the default", flush=True)
        chosen = default

    def js(rows):
        out = [dict(r, cfg=as_json(r["cfg"])) for r in rows]
        if out and "per_shape_best" in out[0]:
            out[0]["per_shape_best"] = [dict(b, cfg=as_json(b["cfg"]))
                                        for b in out[0]["per_shape_best"]]
        return out
    return chosen, dict(fwd=js(rf[:8]), dq=js(rq[:5]), dkdv=js(rk[:5]),
                        config=as_json(chosen), chosen_config_check=chk,
                        chosen_config_reverted=not worst < 2e-2, seconds=time.time() - t0)
