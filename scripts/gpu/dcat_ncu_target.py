"""Target for Nsight Compute (session 4): runs the DCAT forward at (1,16384,C) three
times (C=1024), the plain Gluon kernel (run 11's default) or, with ``ws``, the warp-specialised one
(``ws192``: its 3-consumer tile at C=960, five whole 192-row tiles).

    ncu --kernel-name regex:dcat_fwd_gluon --launch-skip 2 --launch-count 1 --set full \
        python3 scripts/gpu/dcat_ncu_target.py [ws | ws192]

Reports: docs/benchmarks/raw/dcat_ncu_2026-11-23_{plain,ws}.txt (ncu locks the SM clock
at 1.42 GHz, so read utilisations, not durations)."""
import sys

import torch

from pinfm_rec.kernels.dcat import triton_fwd
from pinfm_rec.kernels.dcat.bench import make
from pinfm_rec.kernels.dcat.tune import fwd_candidate

dev = torch.device("cuda")
G = fwd_candidate()  # every key explicit
C = 960 if "ws192" in sys.argv else 1024  # 960 = 5 tiles of 192: no partial tile
q, k, v, qc, kc, vc, co, xo = make(1, 16384, C, torch.bfloat16, dev)
cfg = (dict(G, ws=True, BLOCK_M=192, waves=0.9) if "ws192" in sys.argv else
       dict(G, ws=True, BLOCK_M=128, waves=0.95) if "ws" in sys.argv else G)
for _ in range(3):
    triton_fwd.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.125, C, 16384, cfg)
torch.cuda.synchronize()
