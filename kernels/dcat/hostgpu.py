"""GPU host time of the eager DCAT op with the cached-descriptor launch off and on (issue 15).

Run (CUDA needed, about a minute): ``python -m pinfm_rec.kernels.dcat.hostgpu --out dcat_host.json``

Per anchor shape (R, L, C), H=8, Dh=64, bf16: host µs per eager call (``peers.host_us``: the
GPU queue not waited for, median of ``--repeats`` runs of ``--n`` calls) of the no-grad forward
(serving) and of the forward with inputs that require grad (training; the autograd node, no
backward), each with ``gluon_launch.CACHED_LAUNCH`` off (Triton's launcher re-encodes both TMA
descriptors per call; ``PINFM_DCAT_CACHED_LAUNCH=0``) and on (the default: encoded once per
K/V pair); whether both settings give bit-identical outputs; and a cProfile of each setting at
the smallest shape. The CPU proxy of the same host path is ``hostbench.py`` (no GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from pinfm_rec.kernels.dcat import dcat_attention
from pinfm_rec.kernels.dcat.peers import host_us

SHAPES = [(8, 512, 256), (4, 2048, 256), (2, 2048, 1024), (1, 8192, 512), (1, 16384, 1024)]
H, DH = 8, 64


def _inputs(R, L, C, dev, grad):
    g = dict(device=dev, dtype=torch.bfloat16, requires_grad=grad)
    q, k, v = (torch.randn(R * C, H, DH, **g) for _ in range(3))
    kc, vc = (torch.randn(R * L, H, DH, **g) for _ in range(2))
    co = torch.arange(0, R * C + 1, C, device=dev)
    xo = torch.arange(0, R * L + 1, L, device=dev)
    return q, k, v, kc, vc, co, xo


def _call(ins, C, L):
    q, k, v, kc, vc, co, xo = ins
    return dcat_attention(q, k, v, kc, vc, co, xo, max_cands=C, max_ctx_len=L, kernel="triton")


def profile_calls(fn, n=300, top=20):
    """cProfile of n calls of fn (then a CUDA sync): the top entries by own time, as text lines."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return [line for line in buf.getvalue().splitlines() if line.strip()]


def measure(dev, n=200, repeats=5) -> dict:
    from pinfm_rec.kernels.dcat import gluon_launch
    res: dict = {"shapes": {}}
    prev = gluon_launch.CACHED_LAUNCH
    try:
        for R, L, C in SHAPES:
            row = {}
            for mode in ("infer", "fwd"):
                ins = _inputs(R, L, C, dev, grad=mode == "fwd")
                outs = {}
                for on in (False, True, False, True):  # interleaved: drift hits both
                    gluon_launch.set_cached_launch(on)
                    with torch.no_grad() if mode == "infer" else torch.enable_grad():
                        for _ in range(3):  # first calls: JIT, then the fast launcher made
                            _call(ins, C, L)
                        ts = [host_us(lambda: _call(ins, C, L), n) for _ in range(repeats)]
                        row.setdefault(f"{mode}_{'on' if on else 'off'}_us", []).append(
                            statistics.median(ts))
                        outs[on] = _call(ins, C, L).detach()
                torch.cuda.synchronize()
                row[f"{mode}_bitwise_equal"] = bool(torch.equal(outs[False], outs[True]))
            for key in [k for k in row if k.endswith("_us")]:
                row[key] = round(min(row[key]), 2)
            row["infer_saved_us"] = round(row["infer_off_us"] - row["infer_on_us"], 2)
            res["shapes"][f"{R},{L},{C}"] = row
            print(f"{R},{L},{C}", json.dumps(row), flush=True)
        R, L, C = SHAPES[0]
        ins = _inputs(R, L, C, dev, grad=False)
        with torch.no_grad():
            for on in (False, True):
                gluon_launch.set_cached_launch(on)
                for _ in range(10):
                    _call(ins, C, L)
                torch.cuda.synchronize()
                res[f"host_profile_{'on' if on else 'off'}"] = profile_calls(lambda: _call(ins, C, L))
    finally:
        gluon_launch.set_cached_launch(prev)
    res["cached_launch_failed"] = list(gluon_launch._FAST_FAILED)
    res["direct_launch_failed"] = list(gluon_launch._DIRECT_FAILED)
    shapes = res["shapes"].values()
    res["eager_host_overhead_us_off"] = max(s["infer_off_us"] for s in shapes)
    res["eager_host_overhead_us_on"] = max(s["infer_on_us"] for s in shapes)
    res["all_bitwise_equal"] = all(s["infer_bitwise_equal"] and s["fwd_bitwise_equal"]
                                   for s in shapes)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="dcat_host.json")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA device required", file=sys.stderr)
        return 1
    import triton
    torch.manual_seed(0)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__,
               command="python -m pinfm_rec.kernels.dcat.hostgpu " + " ".join(sys.argv[1:]))
    res.update(measure(torch.device("cuda"), a.n, a.repeats))
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print("\n".join(res["host_profile_off"][:18]))
    print("\n".join(res["host_profile_on"][:18]))
    print(f"host us/call (max over shapes), no-grad eager: cached launch off "
          f"{res['eager_host_overhead_us_off']:.1f}, on {res['eager_host_overhead_us_on']:.1f};"
          f" bitwise equal: {res['all_bitwise_equal']}; cached launch failures: "
          f"{res['cached_launch_failed'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
