"""GPU A/B of the DCAT forward's scratch buffers (issue 15): host µs per eager no-grad call with
the per-stream scratch (split partials, inference lse) on (``PINFM_DCAT_SCRATCH=1``) and off
(the default: allocated per call), interleaved, in one process; outputs compared bit for bit.

    python3 scripts/gpu/dcat_scratch_ab.py --out $OUT/dcat_scratch_ab.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from pinfm_rec.kernels.dcat import gluon_launch
from pinfm_rec.kernels.dcat.hostgpu import SHAPES, _call, _inputs
from pinfm_rec.kernels.dcat.peers import host_us


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="dcat_scratch_ab.json")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args(argv)
    cap = gluon_launch.SCRATCH_CAP  # on: what PINFM_DCAT_SCRATCH=1 sets
    res = {"device": torch.cuda.get_device_name(), "unit": "host us per eager no-grad call, "
           "min over rounds of the median of 5 runs of n calls", "shapes": {}}
    dev = torch.device("cuda")
    prev = gluon_launch._MAX_SCRATCH_BYTES
    for R, L, C in SHAPES:
        ins = _inputs(R, L, C, dev, grad=False)
        row, outs = {"on": [], "off": []}, {}
        with torch.no_grad():
            for _ in range(a.rounds):
                for on in (False, True):
                    gluon_launch._MAX_SCRATCH_BYTES = cap if on else 0
                    for _ in range(3):
                        _call(ins, C, L)
                    ts = [host_us(lambda: _call(ins, C, L), a.n) for _ in range(5)]
                    row["on" if on else "off"].append(statistics.median(ts))
                    outs[on] = _call(ins, C, L).clone()
            torch.cuda.synchronize()
        gluon_launch._MAX_SCRATCH_BYTES = prev
        r = {"scratch_off_us": round(min(row["off"]), 2), "scratch_on_us": round(min(row["on"]), 2),
             "bitwise_equal": bool(torch.equal(outs[False], outs[True]))}
        res["shapes"][f"{R},{L},{C}"] = r
        print(f"{R},{L},{C}", json.dumps(r), flush=True)
    res["max_off_us"] = max(s["scratch_off_us"] for s in res["shapes"].values())
    res["max_on_us"] = max(s["scratch_on_us"] for s in res["shapes"].values())
    print("max over shapes: off", res["max_off_us"], "on", res["max_on_us"])
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
