"""GPU check of the DCAT forward on row-strided inputs (q/k/v and the K/V cache as slices of qkv
projections, what the trunk passes), no TorchRec needed (issue 15):

    python3 scripts/gpu/dcat_strided_check.py --out $OUT/dcat_strided.json

Per anchor shape (R, L, C), H=8, Dh=64, bf16, through ``dcat_attention`` under no_grad:
outputs with the Gluon kernel's strided reads on (``triton_fwd.GLUON_STRIDED``) vs off (inputs
made contiguous first) compared bit for bit, and per call: GPU time in a CUDA graph
(triton.testing.do_bench_cudagraph, median) and eager host µs (``peers.host_us``), off and on.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

SHAPES = [(1, 512, 64), (1, 512, 256), (1, 2048, 256), (8, 512, 256), (4, 2048, 256),
          (2, 2048, 1024), (1, 16384, 1024)]
H, DH = 8, 64


def main(argv=None) -> dict:
    import triton.testing

    from pinfm_rec.kernels.dcat import dcat_attention, triton_fwd
    from pinfm_rec.kernels.dcat.peers import host_us

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    prev = triton_fwd.GLUON_STRIDED
    try:
        for R, L, C in SHAPES:
            qkv_c = torch.randn(R * C, 3, H, DH, device=dev, dtype=torch.bfloat16, generator=g)
            qkv_x = torch.randn(R * L, 3, H, DH, device=dev, dtype=torch.bfloat16, generator=g)
            q, k, v = qkv_c.unbind(1)
            _, kc, vc = qkv_x.unbind(1)
            co = torch.arange(0, R * C + 1, C, device=dev)
            xo = torch.arange(0, R * L + 1, L, device=dev)

            def call():
                return dcat_attention(q, k, v, kc, vc, co, xo, max_cands=C, max_ctx_len=L,
                                      kernel="triton")
            row: dict = {}
            outs = {}
            with torch.no_grad():
                for on in (False, True):
                    triton_fwd.GLUON_STRIDED = on
                    outs[on] = call().clone()
                    tag = "on" if on else "off"
                    row[f"gpu_us_{tag}"] = 1e3 * triton.testing.do_bench_cudagraph(call, rep=50)
                    for _ in range(3):
                        call()
                    row[f"host_us_{tag}"] = statistics.median(host_us(call, 200) for _ in range(5))
                torch.cuda.synchronize()
            ref = dcat_attention(*(t.contiguous() for t in (q, k, v, kc, vc)), co, xo,
                                 max_cands=C, max_ctx_len=L, kernel="pytorch").float()
            row["bitwise_equal"] = bool(torch.equal(outs[False], outs[True]))
            row["rel_err_on_vs_fp32_reference"] = float(
                (outs[True].float() - ref).norm() / ref.norm())
            res["shapes"][f"{R},{L},{C}"] = row
            print(f"R={R} L={L} C={C}: " + "  ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                flush=True)
    finally:
        triton_fwd.GLUON_STRIDED = prev
    res["all_bitwise_equal"] = all(r["bitwise_equal"] for r in res["shapes"].values())
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
