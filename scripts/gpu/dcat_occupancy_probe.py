"""GPU probe (session 4): does more work in flight per SM speed up the Gluon DCAT forward?

The plain Gluon kernel runs one warpgroup of 64 candidate rows per CTA, and at BN128 x 3
stages (106.5 KB of shared memory, 180+ registers) only 2 CTAs fit an SM: one warpgroup's
softmax can only hide behind one other warpgroup's MMAs. Candidates here put 3 or 4 CTAs
on an SM (2 stages, a register cap, 64-key blocks), or 2 warpgroups per CTA sharing K/V, or
the warp-specialised kernel with 3 consumer warpgroups (FA3's Dh=64 tile), each with the
number of history splits that fills those slots.

Prints per config: max |o - tl kernel| on ragged bf16 inputs (and NaN-poisoned outputs),
then CUDA-graph GPU time at (1,16384,1024) over interleaved rounds (min / median) and once
at every benchmark shape. Writes $OUT/occupancy.json when OUT is set. Results:
docs/benchmarks/raw/dcat_probes_2026-11-23_s4.json.

The kernel options behind some configs were reverted after their probe (none was faster):
``maxnreg`` and ``pingpong`` (commit 0067548), ``rowsum`` (b2bcfc5), ``tree`` (28b99d5).
On later code those keys are ignored, so "B", "P", "R" and "T" rows only mean something at
those commits; likewise the session-5 "S5" rows (separate K/V rings and ``maxnreg``: commit
01ce17e, reverted in e16fbb6).

Usage: python3 scripts/gpu/dcat_occupancy_probe.py [--rounds N] [--only NAME,NAME] [--ab]
       [--ab-only NAME,NAME]   (name prefixes; default: every config)
"""

import json
import os
import statistics
import sys
import time

import torch

from pinfm_rec.kernels.dcat import triton_fwd
from pinfm_rec.kernels.dcat.bench import (
    SHAPES, _graph_bench, flops_fwd, geomean, make, ramp_keys,
)
from pinfm_rec.kernels.dcat.tune import fwd_candidate

dev = torch.device("cuda")
t0 = time.time()
rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
TL = dict(triton_fwd.FWD_CONFIG, impl="tl")
# every key explicit (dcat_fwd_triton merges a config over FWD_CONFIG)
G = fwd_candidate()  # every key explicit
# name -> config; waves = CTAs per SM targeted (splits = ceil(waves * SMs / tiles))
CFGS = {
    "A default 2cta": dict(G),
    "A +poly+ovl": dict(G, poly=True, overlap=True),
    "B bn128 s2 r168 3cta": dict(G, num_stages=2, maxnreg=168, waves=2.9),
    "B +poly": dict(G, num_stages=2, maxnreg=168, waves=2.9, poly=True),
    "B +ovl": dict(G, num_stages=2, maxnreg=168, waves=2.9, overlap=True),
    "B +fuse": dict(G, num_stages=2, maxnreg=168, waves=2.9, fuse_combine=True),
    "C bn64 s2 4cta": dict(G, BLOCK_N=64, num_stages=2, waves=3.85),
    "C +poly": dict(G, BLOCK_N=64, num_stages=2, waves=3.85, poly=True),
    "C +ovl": dict(G, BLOCK_N=64, num_stages=2, waves=3.85, overlap=True),
    "C bn64 s3 3cta": dict(G, BLOCK_N=64, num_stages=3, waves=2.9),
    "E bm128 w8 bn64 s3 2cta": dict(G, BLOCK_M=128, num_warps=8, BLOCK_N=64, waves=1.9),
    "E +poly": dict(G, BLOCK_M=128, num_warps=8, BLOCK_N=64, waves=1.9, poly=True),
    "W ws bm128": dict(G, ws=True, BLOCK_M=128, waves=0.95),
    "W ws bm192 s2 w2.9": dict(G, ws=True, BLOCK_M=192, num_stages=2, waves=2.9),
    "W ws bm192 s3 w2.9": dict(G, ws=True, BLOCK_M=192, num_stages=3, waves=2.9),
    "W ws bm192 s2 w4": dict(G, ws=True, BLOCK_M=192, num_stages=2, waves=3.95),
    # row sums of p on the tensor cores (p @ ones): no FADD chain in the softmax (reverted
    # after this probe; git history)
    "R rowsum": dict(G, rowsum=True),
    "R rowsum ovl": dict(G, rowsum=True, overlap=True),
    "R rowsum poly": dict(G, rowsum=True, poly=True),
    "R rowsum ovl poly": dict(G, rowsum=True, overlap=True, poly=True),
    "R rowsum fuse": dict(G, rowsum=True, fuse_combine=True),
    # row max / sum as trees instead of one dependent chain per row
    "T tree": dict(G, tree=True),
    "T tree ovl": dict(G, tree=True, overlap=True),
    "T tree poly": dict(G, tree=True, poly=True),
    "T tree fuse": dict(G, tree=True, fuse_combine=True),
    "A +ovl": dict(G, overlap=True),
    # FA3's ping-pong of the consumer warpgroups (mbarrier turns around the MMA issue)
    "P ws bm128 pp": dict(G, ws=True, BLOCK_M=128, waves=0.95, pingpong=True),
    "P pp ovl": dict(G, ws=True, BLOCK_M=128, waves=0.95, pingpong=True, overlap=True),
    "P pp qreg": dict(G, ws=True, BLOCK_M=128, waves=0.95, pingpong=True, q_reg=True),
    "P pp poly": dict(G, ws=True, BLOCK_M=128, waves=0.95, pingpong=True, poly=True),
    "P pp ovl qreg poly": dict(G, ws=True, BLOCK_M=128, waves=0.95, pingpong=True,
                               overlap=True, q_reg=True, poly=True),
    "P pp s2": dict(G, ws=True, BLOCK_M=128, num_stages=2, waves=0.95, pingpong=True),
    "P pp s4": dict(G, ws=True, BLOCK_M=128, num_stages=4, waves=0.95, pingpong=True),
    "P pp bm192 s2 w2.9": dict(G, ws=True, BLOCK_M=192, num_stages=2, waves=2.9,
                               pingpong=True),
    # session 5: separate key and value rings (a group brings K(j+S) and V(j+S-1)), so 2
    # slots each keep one block of lead: 73.7 KB at BN128 (3 CTAs/SM with a 168 cap), 41 KB
    # at BN64 (4 CTAs/SM at 128 registers)
    "S5 s2 2cta": dict(G, num_stages=2),
    "S5 s2 r168 3cta": dict(G, num_stages=2, maxnreg=168, waves=2.9),
    "S5 s2 r168 3cta ovl": dict(G, num_stages=2, maxnreg=168, waves=2.9, overlap=True),
    "S5 s2 r168 3cta fuse": dict(G, num_stages=2, maxnreg=168, waves=2.9, fuse_combine=True),
    "S5 s2 r168 3cta ovl fuse": dict(G, num_stages=2, maxnreg=168, waves=2.9, overlap=True,
                                     fuse_combine=True),
    "S5 bn64 s2 4cta": dict(G, BLOCK_N=64, num_stages=2, waves=3.85),
    "S5 bn64 s2 4cta ovl": dict(G, BLOCK_N=64, num_stages=2, waves=3.85, overlap=True),
    "S5 bn64 s3 4cta": dict(G, BLOCK_N=64, num_stages=3, waves=3.85),
    # session 5: fixed reference max (the max of a split's first block; no row max and no
    # rescale of acc in later blocks: 324 instead of 450 instructions per block; kept)
    "F fixed": dict(G, fixed_max=True),
    "F fixed ovl": dict(G, fixed_max=True, overlap=True),
    "F fixed poly": dict(G, fixed_max=True, poly=True),
    "F fixed poly ovl": dict(G, fixed_max=True, poly=True, overlap=True),
    "F fixed qreg": dict(G, fixed_max=True, q_reg=True),
    "F fixed fuse": dict(G, fixed_max=True, fuse_combine=True),
    "F fixed ovl fuse": dict(G, fixed_max=True, overlap=True, fuse_combine=True),
    "F fixed ovl qreg": dict(G, fixed_max=True, overlap=True, q_reg=True),
    "F fixed ovl w1": dict(G, fixed_max=True, overlap=True, waves=1.0),
    "F fixed ovl w2": dict(G, fixed_max=True, overlap=True, waves=2.0),
}
# --ab: each config also run by the previous commit's kernels (scripts/gpu/dcat_head/, a copy
# of triton_fwd/gluon_fwd/gluon_ws_fwd at HEAD made before the run), as "old <name>"
OLD = None
if "--ab" in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dcat_head import triton_fwd as OLD  # noqa: E402
if "--only" in sys.argv:
    keep = sys.argv[sys.argv.index("--only") + 1].split(",")
    CFGS = {k: v for k, v in CFGS.items() if any(k.startswith(x) for x in keep)}
out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
           date=time.strftime("%Y-%m-%d"), configs=CFGS, check={}, long={}, shapes={})


def save():
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "occupancy.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)


# 1. agreement with the tl kernel on ragged inputs, every output element written
ragged = []
# the third case ramps the keys up along each history (bench.ramp_keys): later scores
# overflow a fixed first-block reference, so fixed_max must redo those splits exactly
for cl, xl, ramp in [([1, 37, 200, 5, 130, 0], [700, 33, 1500, 1, 0, 64], False),
                     ([70, 130], [13000, 2500], False), ([1, 70, 130], [700, 300, 2500], True)]:
    co = torch.tensor([0] + torch.tensor(cl).cumsum(0).tolist(), device=dev)
    xo = torch.tensor([0] + torch.tensor(xl).cumsum(0).tolist(), device=dev)
    q, k, v = (torch.randn(sum(cl), 8, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (torch.randn(sum(xl), 8, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
    if ramp:
        kc = ramp_keys(kc, xo)
    ref = triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, max(cl), max(xl), TL)
    ragged.append(((q, k, v, kc, vc, co, xo, max(cl), max(xl)), ref))
bad = set()
for name, cfg in CFGS.items():
    errs = []
    try:
        for (q, k, v, kc, vc, co, xo, mc, mx), (ro, rl) in ragged:
            junk = torch.full((1 << 26,), float("nan"), device=dev)
            del junk
            o, lse = triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, mc, mx, cfg)
            errs.append(max((o.float() - ro.float()).abs().max().item(),
                            (lse - rl).abs().max().item()))
    except Exception as e:  # noqa: BLE001
        errs.append(f"{type(e).__name__}: {str(e)[:200]}")
    ok = all(isinstance(e, float) and e < 5e-2 for e in errs)
    if not ok:
        bad.add(name)
    out["check"][name] = errs
    print(f"check {name}: {errs} {'ok' if ok else 'BAD'}", flush=True)
print(f"checks done {time.time()-t0:.0f}s", flush=True)
save()

# 2. (1,16384,1024): interleaved rounds, then every shape once
sc = 64 ** -0.5
data = {s: make(*s, torch.bfloat16, dev) for s in SHAPES}


def timed(name, shape):
    R, L, C = shape
    q, k, v, qc, kc, vc, co, xo = data[shape]
    fwd, cfg = fwd_of[name], cfg_of[name]
    return _graph_bench(lambda: fwd(q, k, v, kc, vc, co, xo, 0, sc, C, L, cfg), rep=20)


names = [n for n in CFGS if n not in bad] + ["tl"]
cfg_of = dict(CFGS, tl=TL)
fwd_of = {n: triton_fwd.dcat_fwd_triton for n in names}
AB_ONLY = sys.argv[sys.argv.index("--ab-only") + 1].split(",") if "--ab-only" in sys.argv else None
if OLD is not None:
    for n in list(CFGS):
        if n not in bad and (AB_ONLY is None or any(n.startswith(x) for x in AB_ONLY)):
            names.append("old " + n)
            cfg_of["old " + n] = CFGS[n]
            fwd_of["old " + n] = OLD.dcat_fwd_triton
long = (1, 16384, 1024)
for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
        t = timed(n, long)
        out["long"].setdefault(n, []).append(None if t is None else t * 1e3)
    print(f"round {r} done {time.time()-t0:.0f}s", flush=True)
    save()
for n in names:
    out["shapes"][n] = [None if (t := timed(n, s)) is None else t * 1e3 for s in SHAPES]
save()
best = [min(out["shapes"][n][i] for n in names if out["shapes"][n][i]) for i in range(len(SHAPES))]
print(f"{'config':28s} | L16384 min / med us (TF/s) | score | " + " | ".join(map(str, SHAPES)))
for n in names:
    ts = [t for t in out["long"][n] if t]
    row = out["shapes"][n]
    score = geomean([t / b for t, b in zip(row, best)]) if all(row) else float("nan")
    print(f"{n:28s} | {min(ts):6.1f} / {statistics.median(ts):6.1f} "
          f"({flops_fwd(*long) / min(ts) / 1e6:.0f}) | {score:.3f} | "
          + " | ".join("-" if t is None else f"{t:.1f}" for t in row), flush=True)
print(f"total {time.time()-t0:.0f}s")
