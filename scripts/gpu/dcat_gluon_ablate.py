"""Ablations of the Gluon DCAT forward at (1,16384,1024) (GPU time, CUDA graph): which part
of a history block bounds the kernel. Each variant is a text patch of gluon_fwd.py
(numbers are wrong on purpose; only times matter). Usage: python3 scripts/gpu/dcat_gluon_ablate.py"""

import importlib.util
import pathlib
import sys
import tempfile

import torch

from pinfm_rec.kernels.dcat import triton_fwd
from pinfm_rec.kernels.dcat.bench import _graph_bench, flops_fwd, make

src = pathlib.Path(triton_fwd.__file__).with_name("gluon_fwd.py").read_text()
PATCHES = {
    "full": [],
    "noexp": [("p = gl.exp2(s_acc * qk_scale - m_new[:, None])",
               "p = s_acc * qk_scale - m_new[:, None]")],
    "nopv": [("o_tok = warpgroup_mma(p, v_bufs.index(prev), acc, is_async=True)",
              "o_tok = acc + 0.0")],
    "nosoftmax": [("p, alpha, m_i, l_i = _softmax_block(s_acc, m_i, l_i, qk_scale, p_layout, dtype,\n"
                   "                                                    POLY)\n"
                   "                acc = warpgroup_mma_wait(0",
                   "p = gl.convert_layout(s_acc.to(dtype), p_layout)\n"
                   "                acc = warpgroup_mma_wait(0")],
    "sync_pv": [("s_acc = warpgroup_mma_wait(1, deps=(s_tok, ))",
                 "s_acc = warpgroup_mma_wait(0, deps=(s_tok, ))")],
}
extra = sys.argv[1:]
R, L, C = 1, 16384, 1024
dev = torch.device("cuda")
q, k, v, qc, kc, vc, co, xo = make(R, L, C, torch.bfloat16, dev)
# the plain Gluon kernel with the FA3 overlap on: the configuration of the recorded
# ablation (session 3, probe B); the "sync_pv" variant turns the overlap off again
cfg = dict(triton_fwd.FWD_CONFIG, impl="gluon", num_stages=3, overlap=True, poly=False,
           q_reg=False, fuse_combine=False, ws_min_ctx=0)
tmp = pathlib.Path(tempfile.mkdtemp())
for name, pats in PATCHES.items():
    s = src
    for a, b in pats:
        assert a in s, (name, a)
        s = s.replace(a, b)
    f = tmp / f"gluon_{name}.py"
    f.write_text(s)
    spec = importlib.util.spec_from_file_location(f"gluon_{name}", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["pinfm_rec.kernels.dcat.gluon_fwd"] = mod
    import pinfm_rec.kernels.dcat as pkg
    pkg.gluon_fwd = mod
    for waves in (1.5,):
        c = dict(cfg, waves=waves)
        t = _graph_bench(lambda: triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, C, L, c),
                         rep=30)
        print(f"{name:10s} waves {waves}: {t*1e3:.1f} us  {flops_fwd(R, L, C)/t/1e9:.0f} TF/s",
              flush=True)
