"""GPU probe (session 4): the 3-consumer warp-specialised tile (BM192, FA3's Dh=64 tile) with
FA3's intra-warpgroup overlap, and its shared-rows path (a tile of at most 64 rows, e.g. the
last of 1024 = 5 x 192 + 64, splits its history blocks among the 3 consumers), against the
plain and BM128 kernels. Checks each config against the fp64 reference (bench.correctness,
quick cases, bf16 + fp16) and the tl kernel on ragged inputs with NaN-poisoned outputs, then
CUDA-graph GPU time over interleaved rounds at C=960 (five whole 192-row tiles per head) and
C=1024, L=16384, and once at every benchmark shape. Usage:
python3 scripts/gpu/dcat_bm192_probe.py   (writes $OUT/bm192.json when OUT is set)

The shared-rows path and the longest-first 1-D grid it measures are at commit 401b7e4
(reverted after this probe: not faster); later code runs BM192 without them. Results:
docs/benchmarks/raw/dcat_probes_2026-11-23_s4.json ("S4-11", "S4-12")."""

import json
import os
import statistics
import time

import torch

from pinfm_rec.kernels.dcat import bench, triton_fwd
from pinfm_rec.kernels.dcat.bench import SHAPES, _graph_bench, flops_fwd, make
from pinfm_rec.kernels.dcat.tune import fwd_candidate

dev = torch.device("cuda")
t0 = time.time()
G = fwd_candidate()  # every key explicit
# 3 splits of the 16384-key history (split_size 5504): 5 full 192-row tiles x 8 heads x 3 =
# 120 CTAs, plus, at C=1024, 24 shared-rows CTAs of 1/3 the time on the 12 other SMs
W3 = dict(G, ws=True, BLOCK_M=192, num_stages=3, split_size=5504)
CFGS = {"plain": G, "ws128": dict(G, ws=True, BLOCK_M=128, waves=0.95),
        "ws192 ovl s3": dict(W3, overlap=True),
        "ws192 ovl s4": dict(W3, overlap=True, num_stages=4),
        "ws192 s3": dict(W3)}
out = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), configs=CFGS,
           fp64_check={}, tl_check={}, long={}, shapes={})


def save():
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bm192.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)


TL = dict(G, impl="tl")
bad = set()
for name, cfg in CFGS.items():
    if name == "plain":  # run 11's kernel, checked there
        continue
    triton_fwd.FWD_CONFIG.clear()
    triton_fwd.FWD_CONFIG.update(cfg)
    try:
        res = bench.correctness(dev, bench.CASES_QUICK, (torch.bfloat16, torch.float16),
                                kernels=("triton",))
        errs = []
        for cl, xl in [([1, 37, 200, 5, 130, 0, 64, 65, 191, 193], [700, 33, 1500, 1, 0, 64,
                                                                    3000, 129, 2000, 4100]),
                       ([70, 130, 1024], [13000, 2500, 16384])]:
            co = torch.tensor([0] + torch.tensor(cl).cumsum(0).tolist(), device=dev)
            xo = torch.tensor([0] + torch.tensor(xl).cumsum(0).tolist(), device=dev)
            q, k, v = (torch.randn(sum(cl), 8, 64, device=dev, dtype=torch.bfloat16)
                       for _ in range(3))
            kc, vc = (torch.randn(sum(xl), 8, 64, device=dev, dtype=torch.bfloat16)
                      for _ in range(2))
            ro, rl = triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, max(cl),
                                                max(xl), TL)
            junk = torch.full((1 << 26,), float("nan"), device=dev)
            del junk
            o, lse = triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, max(cl),
                                                max(xl), cfg)
            errs.append(max((o.float() - ro.float()).abs().max().item(),
                            (lse - rl).abs().max().item()))
    except Exception as e:  # noqa: BLE001
        res, errs = {}, [f"{type(e).__name__}: {str(e)[:300]}"]
    ok = (all(isinstance(e, float) and e < 5e-2 for e in errs)
          and all(v.get("triton", 1) < 2e-2 for v in res.values()) and bool(res))
    if not ok:
        bad.add(name)
    out["fp64_check"][name], out["tl_check"][name] = res, errs
    print(f"check {name}: fp64 {res} vs tl {errs} {'ok' if ok else 'BAD'}", flush=True)
triton_fwd.FWD_CONFIG.clear()
triton_fwd.FWD_CONFIG.update(G)
save()
names = [n for n in CFGS if n not in bad]
for C in (960, 1024):
    q, k, v, qc, kc, vc, co, xo = make(1, 16384, C, torch.bfloat16, dev)
    res = {n: [] for n in names}
    for r in range(5):
        for n in (names if r % 2 == 0 else names[::-1]):
            c = CFGS[n]
            t = _graph_bench(lambda: triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125,
                                                                C, 16384, c), rep=20)
            res[n].append(None if t is None else t * 1e3)
    out["long"][C] = res
    for n, ts in res.items():
        ts = [t for t in ts if t]
        print(f"C={C} {n:20s} min {min(ts):6.1f} med {statistics.median(ts):6.1f} us "
              f"{flops_fwd(1, 16384, C) / min(ts) / 1e6:5.0f} TF/s", flush=True)
    save()
data = {sh: make(*sh, torch.bfloat16, dev) for sh in SHAPES}
for n in names:
    row = []
    for sh in SHAPES:
        R, L, C = sh
        q, k, v, qc, kc, vc, co, xo = data[sh]
        t = _graph_bench(lambda: triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125,
                                                            C, L, CFGS[n]), rep=20)
        row.append(None if t is None else round(t * 1e3, 1))
    out["shapes"][n] = row
    print(f"shapes {n:20s} " + " | ".join(map(str, row)), flush=True)
save()
print(f"total {time.time() - t0:.0f}s")
