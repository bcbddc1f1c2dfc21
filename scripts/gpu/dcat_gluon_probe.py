"""Quick GPU probe of the Gluon DCAT forward (session 3's tool; its runs are in
docs/benchmarks/raw/dcat_gluon_probes_2026-11-23.json): correctness against the fp64
reference (bf16/fp16; quick cases, or CASES_FULL incl. Dh 32/128 with --full), NaN-poisoned
outputs, and CUDA-graph forward time per config at the benchmark shapes against the ``tl``
kernel.

Usage: python3 scripts/gpu/dcat_gluon_probe.py [--ws] [--poly] [--qreg] [--full]
       [--configs default] | --check-only   (fp64 check of three configs, no timing)"""

import sys
import time

import torch

from pinfm_rec.kernels.dcat import bench, triton_fwd
from pinfm_rec.kernels.dcat.bench import SHAPES, _graph_bench, flops_fwd, make

dev = torch.device("cuda")
t0 = time.time()
base = dict(triton_fwd.FWD_CONFIG, impl="tl")  # the tl kernel: reference and baseline
WS = "--ws" in sys.argv
gl_cfg = dict(base, impl="gluon", num_stages=3, fuse_combine=True, q_reg="--qreg" in sys.argv,
              poly="--poly" in sys.argv)
if WS:
    gl_cfg.update(ws=True, BLOCK_M=128, num_warps=4, waves=0.95, q_reg=True, overlap=True)

if "--check-only" in sys.argv:
    # the fp64-reference check (bench.correctness, quick cases incl. the long ragged one)
    # for the checked-in default, the all-options config and the warp-specialised kernel
    for name, extra in [("default", {}),
                        ("poly ovl qreg fuse", dict(poly=True, overlap=True, q_reg=True,
                                                    fuse_combine=True)),
                        ("ws >= 12288, poly ovl qreg", dict(poly=True, overlap=True, q_reg=True,
                                                            ws_min_ctx=12288))]:
        triton_fwd.FWD_CONFIG.clear()
        triton_fwd.FWD_CONFIG.update(dict(base, impl="gluon", **extra))
        res = bench.correctness(dev, bench.CASES_QUICK, (torch.bfloat16, torch.float16),
                                kernels=("triton",))
        print(f"check-only {name}: {res} {time.time()-t0:.0f}s", flush=True)
    sys.exit(0)

# 1. correctness through the public op (forward by Gluon, backward by the tl kernels)
triton_fwd.FWD_CONFIG.update(gl_cfg)
cases = bench.CASES_FULL if "--full" in sys.argv else bench.CASES_QUICK
res = bench.correctness(dev, cases, (torch.bfloat16, torch.float16), kernels=("triton",))
print("correctness (worst rel err)", res, f"{time.time()-t0:.0f}s", flush=True)

# 2. poisoned outputs: every element written, equal to the tl kernel
for R, L, C in [(3, 700, 37), (2, 1500, 130), (1, 0, 5)]:
    q, k, v, qc, kc, vc, co, xo = make(R, L, C, torch.bfloat16, dev)
    ref_o, ref_l = triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, C, L, base)
    for _ in range(3):
        junk = torch.full((1 << 26,), float("nan"), device=dev)
        del junk
        o, lse = triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, C, L, gl_cfg)
    print(f"poison R={R} L={L} C={C}: nan o {o.isnan().sum().item()} lse "
          f"{lse.isnan().sum().item()}; "
          f"max |o - tl| {(o.float() - ref_o.float()).abs().max().item():.2e}"
          f" max |lse - tl| {(lse-ref_l).abs().max().item():.2e}", flush=True)

# 3. timing
cfgs = [("tl default", base)]
G = dict(base, impl="gluon", BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, waves=1.5)
variants = [dict(), dict(poly=True), dict(fuse_combine=True, poly=True),
            dict(fuse_combine=True, poly=True, overlap=True), dict(fuse_combine=True),
            dict(poly=True, q_reg=True), dict(poly=True, overlap=True)]
if WS:
    W = dict(G, ws=True, BLOCK_M=128, waves=0.95, poly=True)
    variants = [dict(poly=True, overlap=True, q_reg=True, fuse_combine=True),
                dict(W), dict(W, q_reg=True), dict(W, q_reg=True, overlap=True),
                dict(W, overlap=True), dict(W, BLOCK_M=192, waves=0.95),
                dict(W, BLOCK_M=192, waves=1.9), dict(W, BLOCK_M=192, q_reg=True, waves=0.95)]
if "--configs" in sys.argv and sys.argv[sys.argv.index("--configs") + 1] == "default":
    variants = variants[:1]
for v in variants:
    cfgs.append(("gluon " + (" ".join(f"{k}={x}" for k, x in v.items()) or "sync"), dict(G, **v)))
data = [(R, L, C, make(R, L, C, torch.bfloat16, dev)) for R, L, C in SHAPES]
sc = 64 ** -0.5
print("config | " + " | ".join(f"{s}" for s in SHAPES), flush=True)
chk = make(3, 1500, 200, torch.bfloat16, dev)
q, k, v, qc, kc, vc, co, xo = chk
ref_o, _ = triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, 200, 1500, base)
for name, cfg in cfgs:
    o, _ = triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, 200, 1500, cfg)
    print(f"  {name}: max |o - tl| {(o.float() - ref_o.float()).abs().max().item():.2e}",
          flush=True)
for name, cfg in cfgs:
    row = []
    for R, L, C, (q, k, v, qc, kc, vc, co, xo) in data:
        try:
            t = _graph_bench(lambda: triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, sc,
                                                                C, L, cfg), rep=20)
        except Exception as e:  # noqa: BLE001
            print("  failed", name, type(e).__name__, str(e)[:300], flush=True)
            t = None
        row.append("fail" if t is None else f"{t*1e3:.1f}us {flops_fwd(R, L, C)/t/1e9:.0f}TF/s")
    print(name + " | " + " | ".join(row), flush=True)
print(f"total {time.time()-t0:.0f}s")
