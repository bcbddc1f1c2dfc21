"""GPU probe (session 4): what bounds the DCAT forward at (1,16384,1024)?

Every design tried (plain Gluon with 2-4 CTAs per SM, warp-specialised with and without
FA3's ping-pong, q in registers) lands at 79-82 us, so this probe looks at the machine:
SM clock, power and throttle reasons (nvidia-smi sampled every 50 ms) while each kernel
runs back to back for ~2 s, and, as a yardstick of what this GPU does at Dh=64, the stock
SDPA backends (cuDNN, flash) on full attention shapes and a bf16 GEMM.

Usage: python3 scripts/gpu/dcat_power_probe.py [--quick]   (writes $OUT/power.json when OUT is
set; --quick: only the checked-in default and session 4's default, no yardsticks)
"""

import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pinfm_rec.kernels.dcat import triton_fwd
from pinfm_rec.kernels.dcat.bench import flops_fwd, make
from pinfm_rec.kernels.dcat.tune import fwd_candidate

dev = torch.device("cuda")
# the throttle-reason field was renamed in recent drivers; use whichever this one knows
REASONS = next((f for f in ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
                if subprocess.run(["nvidia-smi", f"--query-gpu={f}", "--format=csv"],
                                  capture_output=True).returncode == 0), "power.limit")
out = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), rows={})


def sustained(fn, seconds=2.0):
    """fn captured in a CUDA graph of 20 calls, replayed for ~seconds while nvidia-smi
    samples the SM clock and power; returns (us per call, median MHz, median W, reasons)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            for _ in range(20):
                fn()
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    t = time.time()
    g.replay()
    torch.cuda.synchronize()
    per = time.time() - t
    n = max(1, int(seconds / per))
    smi = subprocess.Popen(
        ["nvidia-smi", f"--query-gpu=clocks.sm,power.draw,{REASONS}",
         "--format=csv,noheader,nounits", "-lms", "50"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    smi.terminate()
    lines = smi.communicate()[0].strip().splitlines()
    samp = [ln.split(", ") for ln in lines if ln.count(",") == 2]
    busy = samp[len(samp) // 4: -2] or samp  # skip the idle start and the tail
    mhz = statistics.median(float(x[0]) for x in busy)
    watts = statistics.median(float(x[1]) for x in busy)
    reasons = sorted({x[2] for x in busy})
    return e0.elapsed_time(e1) * 1e3 / (n * 20), mhz, watts, reasons


def row(name, fn, flops):
    us, mhz, w, why = sustained(fn)
    out["rows"][name] = dict(us=us, tflops=flops / us / 1e6, mhz=mhz, watts=w, reasons=why)
    print(f"{name:34s} {us:8.1f} us {flops / us / 1e6:6.0f} TF/s  {mhz:5.0f} MHz "
          f"{w:5.0f} W  {why}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "power.json"), "w") as f:
            json.dump(out, f, indent=1)


R, L, C = 1, 16384, 1024
q, k, v, qc, kc, vc, co, xo = make(R, L, C, torch.bfloat16, dev)
sc = 64 ** -0.5
G = fwd_candidate()  # every key explicit: session 4's default (online softmax, no options)
CFGS = [("dcat checked-in FWD_CONFIG", dict(triton_fwd.FWD_CONFIG)), ("dcat gluon default", G)]
if "--quick" not in sys.argv:
    CFGS += [("dcat gluon poly", dict(G, poly=True)),
             ("dcat gluon ws bm128", dict(G, ws=True, BLOCK_M=128, waves=0.95)),
             ("dcat tl", dict(G, impl="tl"))]
for name, cfg in CFGS:
    row(name, lambda cfg=cfg: triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, sc, C, L,
                                                         cfg), flops_fwd(R, L, C))
if "--quick" in sys.argv:
    sys.exit(0)
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
row("bf16 gemm 8192^3", lambda: a @ b, 2 * 8192 ** 3)
for B_, Hh, Lq, Lk in [(1, 8, 1024, 16384), (1, 8, 16384, 16384), (4, 16, 8192, 8192)]:
    qq = torch.randn(B_, Hh, Lq, 64, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(B_, Hh, Lk, 64, device=dev, dtype=torch.bfloat16)
    vv = torch.randn(B_, Hh, Lk, 64, device=dev, dtype=torch.bfloat16)
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def f(be=be, qq=qq, kk=kk, vv=vv):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qq, kk, vv)
        try:
            row(f"sdpa {be.name.split('_')[0].lower()} {B_}x{Hh}x{Lq}x{Lk}", f,
                4 * B_ * Hh * Lq * Lk * 64)
        except Exception as e:  # noqa: BLE001
            print("failed", be, type(e).__name__, str(e)[:200], flush=True)
