"""GPU benchmark + correctness check for DCAT crossing attention.

Run: ``python -m pinfm_rec.kernels.dcat.bench --correctness quick --sweep --out dcat.json``
(CUDA needed; about 3 minutes on an H100). ``--correctness`` off|quick|full: the GPU
check against an fp64 reference (quick: 4 cases at Dh=64 per dtype; full: 6 cases
incl. Dh 32/128, many more compiles). The JSON at --out is rewritten after every phase
and shape, so a run cut short still leaves its numbers. Headline times are CUDA-graph
replays (GPU time); eager op-level times (host overhead included) are reported too.
Shapes (R requests, L history per request, C candidates per request), H=8,
Dh=64, bf16. Kernels: ours (``kernel="triton"``: the Gluon forward on Hopper, else the tl
kernel; tl backward) vs stock (``dcat_sdpa``: SDPA + LSE
merge) vs duplicating the history for every candidate (causal SDPA over
[history; candidate], measured on a subset of candidates and scaled).
``--sweep`` also times launch-config variants of the Triton kernels (``tune.py``) and runs the
rest with the chosen config, passed explicitly. Peer column: ``torch.nn.attention.
flex_attention`` (compiled, block mask ``kv < L or kv - L == q``), GPU time and eager;
``*_host_us``: host time per eager no-grad forward call, the median of 5 runs of 200 calls
(``eager_host_overhead_us``: the max over shapes); ``--profile-host`` adds a cProfile of the eager op's host side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from pinfm_rec.kernels.dcat import dcat_attention
from pinfm_rec.kernels.dcat.check import (
    CASES_FULL, CASES_QUICK, correctness, offsets, ramp_check,
)
from pinfm_rec.kernels.dcat.peers import flex_dcat, flex_inputs, host_us_median

SHAPES = [(8, 512, 256), (4, 2048, 256), (2, 2048, 1024), (1, 8192, 512), (1, 16384, 1024)]
H, DH, D = 8, 64, 512
DUP_BYTES = 1 << 30  # cap on one duplicated [B, H, L+1, Dh] tensor


def _do_bench(fn, grad_to_none=None, rep=100):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none,
                                   return_mode="median")


def _slow_bench(fn, n=3, grad_to_none=None):
    """For the slow duplicate-history paths: 1 warm-up, median of n event timings."""
    fn()
    ts = []
    for _ in range(n):
        for t in grad_to_none or []:
            t.grad = None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[n // 2]


def _graph_bench(fn, grad_to_none=None, rep=50):
    """GPU time per call: fn captured in a CUDA graph, replayed (median)."""
    import triton
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none,
                                                 return_mode="median")
    except Exception as e:  # noqa: BLE001
        print("  graph timing failed:", type(e).__name__, str(e)[:200], flush=True)
        return None


def make(R, L, C, dtype, dev, grad=False):
    g = dict(device=dev, dtype=dtype, requires_grad=grad)
    q, k, v = (torch.randn(R * C, H, DH, **g) for _ in range(3))
    qc, kc, vc = (torch.randn(R * L, H, DH, **g) for _ in range(3))
    return q, k, v, qc, kc, vc, offsets([C] * R, dev), offsets([L] * R, dev)


def flops_fwd(R, L, C):
    return 4 * R * C * (L + 1) * H * DH


# --------------------------------------------------------------- paths
def dup_inputs(q, k, v, qc, kc, vc, R, L, C, nsub):
    """[nsub, H, L+1, Dh]: history of the candidate's request + the candidate."""
    idx = torch.arange(nsub, device=q.device)
    req = idx // C

    def cat(ctx, cand):
        return torch.cat([ctx.view(R, L, H, DH)[req], cand[idx, None]], 1).transpose(1, 2)
    return cat(qc, q), cat(kc, k), cat(vc, v)


def dup_attn(q, k, v, qc, kc, vc, R, L, C, nsub):
    qd, kd, vd = dup_inputs(q, k, v, qc, kc, vc, R, L, C, nsub)
    return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)[:, :, -1]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))


def model_crossing(blocks, x, ctx_kv, co, xo, C, L, kernel, config=None):
    n = x.shape[0]
    for blk, (kc, vc) in zip(blocks, ctx_kv):
        q, k, v = blk.qkv(blk.ln1(x)).view(n, 3, H, DH).unbind(1)
        o = dcat_attention(q, k, v, kc, vc, co, xo, max_cands=C, max_ctx_len=L, kernel=kernel,
                           config=config if kernel == "triton" else None)
        x = x + blk.out(o.reshape(n, D))
        x = x + blk.mlp(blk.ln2(x))
    return x


def model_dup(blocks, x_hist, x, R, L, C, nsub):
    idx = torch.arange(nsub, device=x.device)
    xs = torch.cat([x_hist.view(R, L, D)[idx // C], x[idx, None]], 1)
    b, t = xs.shape[:2]
    for blk in blocks:
        qkv = blk.qkv(blk.ln1(xs)).view(b, t, 3, H, DH).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        xs = xs + blk.out(o.transpose(1, 2).reshape(b, t, D))
        xs = xs + blk.mlp(blk.ln2(xs))
    return xs[:, -1]


def nsub_for(R, L, C, per_tok_bytes):
    return max(1, min(R * C, DUP_BYTES // ((L + 1) * per_tok_bytes)))


# --------------------------------------------------------------- timing
def profile_host(dev, config=None, n=300, top=25):
    """Where the eager op's host time goes: cProfile over n no-grad forward calls at the
    smallest shape (GPU time there is ~10 us, so the host is the bound). Returns the top
    entries by own time, as text lines."""
    from pinfm_rec.kernels.dcat.hostgpu import profile_calls

    R, L, C = SHAPES[0]
    q, k, v, qc, kc, vc, co, xo = make(R, L, C, torch.bfloat16, dev)

    def call():
        return dcat_attention(q, k, v, kc, vc, co, xo, max_cands=C, max_ctx_len=L,
                              kernel="triton", config=config)
    with torch.no_grad():
        for _ in range(10):
            call()
        torch.cuda.synchronize()
        return profile_calls(call, n, top)


def bench_shape(R, L, C, dev, dup_bwd=True, config=None):
    out = {}
    fl = flops_fwd(R, L, C)
    q, k, v, qc, kc, vc, co, xo = make(R, L, C, torch.bfloat16, dev, grad=True)
    g = torch.randn_like(q)
    leaves = [q, k, v, kc, vc]
    for kern in ("triton", "sdpa"):
        def f(kern=kern):
            return dcat_attention(q, k, v, kc, vc, co, xo, max_cands=C, max_ctx_len=L,
                                  kernel=kern, config=config if kern == "triton" else None)
        def fb(f=f):
            f().backward(g)
        with torch.no_grad():
            out[f"{kern}_fwd_eager_ms"] = _do_bench(f)
            out[f"{kern}_fwd_ms"] = _graph_bench(f)
        out[f"{kern}_fwdbwd_eager_ms"] = _do_bench(fb, grad_to_none=leaves)
        out[f"{kern}_fwdbwd_ms"] = _graph_bench(fb, grad_to_none=leaves)
        for key in ("fwd", "fwdbwd"):  # graph capture failed: eager time, flagged
            if out[f"{kern}_{key}_ms"] is None:
                out[f"{kern}_{key}_ms"] = out[f"{kern}_{key}_eager_ms"]
                out.setdefault("graph_failed", []).append(f"{kern}_{key}")
        for key, mult in (("fwd", 1.0), ("fwdbwd", 3.5)):
            out[f"{kern}_{key}_tflops"] = mult * fl / out[f"{kern}_{key}_ms"] / 1e9
            out[f"{kern}_{key}_eager_tflops"] = mult * fl / out[f"{kern}_{key}_eager_ms"] / 1e9
    with torch.no_grad():
        out["triton_fwd_host_us"] = host_us_median(lambda: dcat_attention(
            q, k, v, kc, vc, co, xo, max_cands=C, max_ctx_len=L, kernel="triton",
            config=config))
        try:  # the peer: compiled flex_attention on the same inputs (issue 15)
            flex = flex_dcat(R, L, C)
            if flex is not None:
                fins = flex_inputs(q.detach(), k.detach(), v.detach(), kc.detach(),
                                   vc.detach(), R, L, C)
                flex(*fins)  # compile outside the timing
                out["flex_fwd_eager_ms"] = _do_bench(lambda: flex(*fins))
                out["flex_fwd_ms"] = (_graph_bench(lambda: flex(*fins))
                                      or out["flex_fwd_eager_ms"])
                out["flex_fwd_host_us"] = host_us_median(lambda: flex(*fins))
                out["fwd_speedup_vs_flex"] = out["flex_fwd_ms"] / out["triton_fwd_ms"]
                out["eager_fwd_speedup_vs_flex"] = (out["flex_fwd_eager_ms"]
                                                    / out["triton_fwd_eager_ms"])
        except Exception as e:  # noqa: BLE001  (report, keep the rest of the run)
            out["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("  flex_attention failed:", out["flex_error"], flush=True)
    # kernel launchers alone (no autograd / op dispatch), CUDA-graph GPU time
    from pinfm_rec.kernels.dcat import triton_bwd, triton_fwd
    sc = DH ** -0.5
    with torch.no_grad():
        args = (q.detach(), k.detach(), v.detach(), kc.detach(), vc.detach(), co, xo, 0, sc, C, L)
        fcfg = None if config is None else config.fwd
        o_, lse_ = triton_fwd.dcat_fwd_triton(*args, fcfg)
        t = _graph_bench(lambda: triton_fwd.dcat_fwd_triton(*args, fcfg))
        out["kern_fwd_ms"] = t
        out["kern_fwd_tflops"] = None if t is None else fl / t / 1e9
        bargs = (g, q.detach(), k.detach(), v.detach(), kc.detach(), vc.detach(), o_, lse_, co,
                 xo, 0, sc, C, L, config)
        t = _graph_bench(lambda: triton_bwd.dcat_bwd_triton(*bargs))
        out["kern_bwd_ms"] = t
        out["kern_bwd_tflops"] = None if t is None else 2.5 * fl / t / 1e9
    nsub = nsub_for(R, L, C, H * DH * 2)
    scale = R * C / nsub
    with torch.no_grad():
        t = _slow_bench(lambda: dup_attn(q, k, v, qc, kc, vc, R, L, C, nsub))
    out["dup_fwd_ms"] = t * scale
    out["dup_subset"] = nsub
    if dup_bwd:
        gs = torch.randn(nsub, H, DH, device=dev, dtype=q.dtype)
        t = _slow_bench(lambda: dup_attn(q, k, v, qc, kc, vc, R, L, C, nsub).backward(gs),
                        grad_to_none=leaves + [qc])
        out["dup_fwdbwd_ms"] = t * scale
    else:
        out["dup_fwdbwd_ms"] = None
    for key in ("fwd", "fwdbwd"):
        out[f"{key}_speedup_vs_stock"] = out[f"sdpa_{key}_ms"] / out[f"triton_{key}_ms"]
        out[f"eager_{key}_speedup_vs_stock"] = (out[f"sdpa_{key}_eager_ms"]
                                                / out[f"triton_{key}_eager_ms"])
        d = out[f"dup_{key}_ms"]
        out[f"{key}_speedup_vs_dup"] = None if d is None else d / out[f"triton_{key}_ms"]
    for kern in ("triton", "sdpa", "dup"):
        out[f"{kern}_fwd_cands_per_s"] = R * C / (out[f"{kern}_fwd_ms"] * 1e-3)
    return out


def bench_model(R, L, C, dev, config=None):
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(), Block()]).to(dev, torch.bfloat16)
    x = torch.randn(R * C, D, device=dev, dtype=torch.bfloat16)
    x_hist = torch.randn(R * L, D, device=dev, dtype=torch.bfloat16)
    ctx_kv = [(torch.randn(R * L, H, DH, device=dev, dtype=torch.bfloat16),
               torch.randn(R * L, H, DH, device=dev, dtype=torch.bfloat16)) for _ in range(2)]
    co, xo = offsets([C] * R, dev), offsets([L] * R, dev)
    res = {}
    with torch.no_grad():
        for kern in ("triton", "sdpa"):
            def f(kern=kern):
                return model_crossing(blocks, x, ctx_kv, co, xo, C, L, kern, config)
            te = _do_bench(f)
            t = _graph_bench(f) or te
            res[f"model_{kern}_eager_ms"] = te
            res[f"model_{kern}_eager_cands_per_s"] = R * C / (te * 1e-3)
            res[f"model_{kern}_ms"] = t
            res[f"model_{kern}_cands_per_s"] = R * C / (t * 1e-3)
        nsub = nsub_for(R, L, C, D * 2 * 32)
        t = _slow_bench(lambda: model_dup(blocks, x_hist, x, R, L, C, nsub))
        res["model_dup_ms"] = t * R * C / nsub
        res["model_dup_subset"] = nsub
        res["model_dup_cands_per_s"] = nsub / (t * 1e-3)
    res["model_speedup_vs_stock"] = res["model_sdpa_ms"] / res["model_triton_ms"]
    res["model_speedup_vs_dup"] = res["model_dup_ms"] / res["model_triton_ms"]
    return res


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def summary(shapes):
    """The issue's headline keys, from whatever shapes are done so far."""
    if not shapes:
        return {}
    fs = {k_: s["fwd_speedup_vs_stock"] for k_, s in shapes.items()}
    fbs = {k_: s["fwdbwd_speedup_vs_stock"] for k_, s in shapes.items()}
    res = dict(fwd_speedup_vs_stock=fs,
               geomean_fwd_speedup_vs_stock=geomean(list(fs.values())),
               min_fwd_speedup_vs_stock=min(fs.values()),
               fwdbwd_speedup_vs_stock=fbs,
               geomean_fwdbwd_speedup_vs_stock=geomean(list(fbs.values())),
               eager_geomean_fwd_speedup_vs_stock=geomean(
                   [s["eager_fwd_speedup_vs_stock"] for s in shapes.values()]),
               eager_geomean_fwdbwd_speedup_vs_stock=geomean(
                   [s["eager_fwdbwd_speedup_vs_stock"] for s in shapes.values()]),
               shapes_done=len(shapes), shapes_total=len(SHAPES))
    if all("fwd_speedup_vs_flex" in s for s in shapes.values()):
        res["geomean_fwd_speedup_vs_flex"] = geomean(
            [s["fwd_speedup_vs_flex"] for s in shapes.values()])
        res["min_eager_fwd_speedup_vs_flex"] = min(
            s["eager_fwd_speedup_vs_flex"] for s in shapes.values())
    res["eager_host_overhead_us"] = max(s["triton_fwd_host_us"] for s in shapes.values())
    if "1,16384,1024" in shapes:
        res["crossing_tflops_L16384_C1024"] = shapes["1,16384,1024"]["triton_fwd_tflops"]
        res["kernel_only_tflops_L16384_C1024"] = shapes["1,16384,1024"]["kern_fwd_tflops"]
    if "4,2048,256" in shapes:
        res["speedup_vs_dup_L2048_C256"] = shapes["4,2048,256"]["fwd_speedup_vs_dup"]
    return res


def main(argv=None):
    import time
    t_start = time.time()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="dcat_bench.json")
    ap.add_argument("--correctness", choices=("off", "quick", "full"), default="quick",
                    help="GPU check vs an fp64 reference: quick = 3 ragged/dense cases at "
                         "H=8, Dh=64 per dtype; full = 5 cases incl. Dh 32/128 (many compiles)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-seconds", type=float, default=60.0)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--profile-host", action="store_true",
                    help="also cProfile the eager op's host side (top functions by own time)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA device required", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    torch.manual_seed(0)
    import triton
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, date=datetime.date.today().isoformat(),
               command=" ".join(["python -m pinfm_rec.kernels.dcat.bench"] + sys.argv[1:]),
               H=H, Dh=DH, dtype="bfloat16", phase_seconds={},
               timing=("*_ms / speedups / TFLOP/s: GPU time, fn captured in a CUDA graph and "
                       "replayed (triton.testing.do_bench_cudagraph, median; no L2 flush); "
                       "*_eager_*: triton.testing.do_bench(return_mode='median') in eager mode, "
                       "includes host overhead; kern_*: the Triton launchers alone, CUDA graph; "
                       "dup_*: eager, on a subset of candidates, scaled; FLOPs fwd = "
                       "4*R*C*(L+1)*H*Dh, fwd+bwd = 3.5x that"))
    shapes: dict = {}
    config = None  # the selected default unless --sweep finds a better one

    def save(final=False):
        with open(a.out, "w") as fh:
            json.dump({**res, **summary(shapes), "shapes": shapes, "complete": final}, fh,
                      indent=1)

    def phase(name, t0):
        res["phase_seconds"][name] = round(time.time() - t0, 1)
        print(f"[{time.time() - t_start:6.1f}s] {name} done in {time.time() - t0:.1f}s",
              flush=True)
        save()

    if a.sweep:
        t0 = time.time()
        from pinfm_rec.kernels.dcat.tune import sweep  # imports this module: here, not at the top

        config, res["sweep"] = sweep(dev, a.sweep_seconds)
        phase("sweep", t0)
    if a.correctness != "off":
        t0 = time.time()
        # after the sweep: the check covers the configs the timings below use
        print(f"== GPU correctness ({a.correctness}; rel. Frobenius error vs fp64 reference)",
              flush=True)
        res["correctness_mode"] = a.correctness
        res["gpu_max_rel_err"] = correctness(
            dev, CASES_QUICK if a.correctness == "quick" else CASES_FULL, config=config)
        print(json.dumps(res["gpu_max_rel_err"]), flush=True)
        res["gpu_ramp_fwd_rel_err"] = ramp_check(
            dev, CASES_QUICK if a.correctness == "quick" else CASES_FULL)
        print(json.dumps(res["gpu_ramp_fwd_rel_err"]), flush=True)
        phase("correctness", t0)
    from pinfm_rec.kernels.dcat.config import as_json, select
    res["config"] = as_json(config or select(dev, torch.bfloat16, DH))
    if a.profile_host:
        res["host_profile"] = profile_host(dev, config)
        print("\n".join(res["host_profile"]), flush=True)
        save()
    for R, L, C in SHAPES:
        t0 = time.time()
        key = f"{R},{L},{C}"
        s = bench_shape(R, L, C, dev, dup_bwd=L * R * C <= 2048 * 1024, config=config)
        if not a.no_model:
            s.update(bench_model(R, L, C, dev, config))
        shapes[key] = s
        print(key, json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_)
                               for k_, v_ in s.items()}), flush=True)
        phase(f"shape {key}", t0)
    res["total_seconds"] = round(time.time() - t_start, 1)
    save(final=True)
    res.update(summary(shapes))
    hdr = (f"{'R,L,C':>14} | {'ours fwd us':>11} {'TF/s':>5} {'kern':>5} | {'stock us':>9} "
           f"{'TF/s':>5} | {'x stock':>7} | {'fwdbwd ours':>11} {'stock':>9} {'x':>5} | "
           f"{'x dup':>7} | {'model cand/s ours':>17} {'stock':>9} {'dup':>9}")
    print(hdr)
    for key, s in shapes.items():
        kt = s["kern_fwd_tflops"] or float("nan")
        print(f"{key:>14} | {s['triton_fwd_ms']*1e3:11.1f} {s['triton_fwd_tflops']:5.0f} "
              f"{kt:5.0f} | {s['sdpa_fwd_ms']*1e3:9.1f} {s['sdpa_fwd_tflops']:5.0f} | "
              f"{s['fwd_speedup_vs_stock']:7.2f} | {s['triton_fwdbwd_ms']*1e3:11.1f} "
              f"{s['sdpa_fwdbwd_ms']*1e3:9.1f} {s['fwdbwd_speedup_vs_stock']:5.2f} | "
              f"{s['fwd_speedup_vs_dup']:7.0f} | "
              + (f"{s['model_triton_cands_per_s']:17.3e} {s['model_sdpa_cands_per_s']:9.2e} "
                 f"{s['model_dup_cands_per_s']:9.2e}" if "model_triton_ms" in s else ""))
    if "geomean_fwd_speedup_vs_flex" in res:
        print(f"vs flex_attention (compiled): GPU time geomean fwd "
              f"{res['geomean_fwd_speedup_vs_flex']:.2f}, eager min "
              f"{res['min_eager_fwd_speedup_vs_flex']:.2f}")
    print(f"host time per eager fwd call (max over shapes): "
          f"{res['eager_host_overhead_us']:.1f} us")
    print(f"eager (host overhead incl.): geomean fwd x stock "
          f"{res['eager_geomean_fwd_speedup_vs_stock']:.2f}, fwd+bwd "
          f"{res['eager_geomean_fwdbwd_speedup_vs_stock']:.2f}")
    print(f"GPU time: geomean fwd x stock {res['geomean_fwd_speedup_vs_stock']:.2f} (min "
          f"{res['min_fwd_speedup_vs_stock']:.2f}); geomean fwd+bwd x stock "
          f"{res['geomean_fwdbwd_speedup_vs_stock']:.2f}; TF/s at L16384,C1024 "
          f"{res['crossing_tflops_L16384_C1024']:.0f}; x dup at L2048,C256 "
          f"{res['speedup_vs_dup_L2048_C256']:.0f}; total {res['total_seconds']:.0f}s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
