"""GPU kernels of one scoring request, per serving-bench method (where a method's time goes).

    python -m pinfm_rec.serve.kernelprof --L 512 --C 64 --methods dcat,flex [--compile] [--json out.json]

Builds the serving bench's model (``bench.build``, bf16 autocast, pre-cast Linear weights), runs
each method eagerly under ``torch.profiler`` (CUDA activity) for ``--iters`` requests after a
warm-up, and prints per method: kernels per request, summed GPU kernel time per request, and the
top kernels by time. Kernel time is what a CUDA graph replays; the graph removes the launch gaps
between kernels, not the kernels, so this splits a graphed request's time into its kernels.
"""
from __future__ import annotations

import argparse
import collections
import json

import torch


def profile_method(model, name: str, batch, L: int, C: int, device, iters: int, amp, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from pinfm_rec.serve.bench import method

    with method(model, name, 1, L, C, device), torch.no_grad(), torch.autocast(device.type, dtype=amp):
        for _ in range(3):
            model.logits(batch)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                model.logits(batch)
            torch.cuda.synchronize()
    time_us: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in prof.key_averages():  # kernel rows: device type CUDA (their time is their own)
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0.0) if t is None else t
        time_us[e.key] += t
        count[e.key] += e.count
    total = sum(time_us.values()) / iters
    top = [{"kernel": k[:120], "us_per_request": v / iters, "per_request": count[k] / iters}
           for k, v in time_us.most_common(top)]
    return {"method": name, "kernels_per_request": sum(count.values()) / iters,
            "gpu_us_per_request": total, "top": top}


def main(argv=None) -> list:
    from pinfm_rec.data.ranking_batch import random_ranking_batch
    from pinfm_rec.serve import bench
    from pinfm_rec.serve.precision import precast_linears
    from pinfm_rec.serve.scorer import Scorer, compile_hot_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--L", type=int, default=512)
    p.add_argument("--C", type=int, default=64)
    p.add_argument("--methods", default="dcat,flex")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--top", type=int, default=15, help="kernels listed per method (by GPU time)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernelprof needs a CUDA device")
    device, amp = torch.device("cuda"), torch.bfloat16
    cfg = dict(bench.GPU)
    model = bench.build(cfg, a.L, device)
    precast_linears(model, amp)
    if a.compile:
        compile_hot_path(model)
    gen = torch.Generator().manual_seed(0)
    batch = random_ranking_batch(gen, [a.L], [a.C], num_items=cfg["num_items"], num_dense=3)
    batch = Scorer(model, a.L, device, buckets=False).prepare(batch)
    out = []
    for name in a.methods.split(","):
        r = profile_method(model, name, batch, a.L, a.C, device, a.iters, amp, a.top)
        out.append(r)
        print(f"{name}: {r['kernels_per_request']:.0f} kernels, {r['gpu_us_per_request']:.1f} us GPU per request")
        for t in r["top"]:
            print(f"   {t['us_per_request']:8.2f} us  x{t['per_request']:.0f}  {t['kernel']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"L": a.L, "C": a.C, "device": torch.cuda.get_device_name(), "methods": out}, f, indent=1)
    return out


if __name__ == "__main__":
    main()
