"""Dry sharding plan: the table TorchRec's planner would give a pretraining spec on a topology of N
devices, without a process group, a GPU or training (the model's tables stay on ``meta``).

    python scripts/scaling/plan.py --spec specs/pretrain/synthetic-50m.yaml --world-size 8
    python scripts/scaling/plan.py --spec specs/pretrain/synthetic-50m.yaml --world-size 16 --gpus-per-host 8 \
        --hbm-gb 141 --out runs/plan-2x8 model.embedding.item.sharding=table_wise

Prints the plan (table, sharding type, ranks, rows x dim, MB of weights per rank) and, with
``--out``, writes plan.txt / plan.json there (the same files a run writes into its run dir).
Vocabulary sizes of a synthetic spec come from the spec (nothing is generated); other sources are
prepared (cached) to read them. A spec the planner cannot place (e.g. a table larger than
``--hbm-gb`` table_wise) fails with the planner's message.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from pinfm_rec import console  # noqa: E402
from pinfm_rec.parallel import dry_plan, plan_rows  # noqa: E402


def vocab_of(data) -> dict:
    if data.source == "synthetic":
        s = data.synthetic
        return {"num_items": s.num_items, "num_actions": s.num_actions, "num_surfaces": s.num_surfaces}
    from pinfm_rec.data.prepare import prepare_dataset

    return prepare_dataset(data)


def plan_for(spec, world_size: int, compute_device: str = "cuda", hbm_gb: float = 141.0, gpus_per_host: int = 8):
    import torch

    from pinfm_rec.model.embedding import table_shardings
    from pinfm_rec.model.pinfm import PinFM

    model = PinFM(spec.model, vocab_of(spec.data), device=torch.device("meta"), dense_device="cpu")
    plan = dry_plan(model, table_shardings(spec.model.embedding), world_size, compute_device, hbm_gb,
                    gpus_per_host, spec.data.batch_size)
    return plan_rows(plan)


def main(argv=None) -> int:
    from pinfm_rec.spec import load_spec
    from pinfm_rec.train.pretrain import PretrainSpec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--world-size", type=int, required=True, help="devices (ranks) in all")
    p.add_argument("--gpus-per-host", type=int, default=8, help="ranks per host (intra-host links)")
    p.add_argument("--hbm-gb", type=float, default=141.0, help="memory per device (H200: 141)")
    p.add_argument("--cpu", action="store_true", help="plan for CPU ranks (gloo) instead of CUDA devices")
    p.add_argument("--out", default="", help="write plan.txt / plan.json into this dir")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    logging.getLogger("torchrec").setLevel(logging.ERROR)  # dry-run caveats about dense tensor estimates
    warnings.filterwarnings("ignore", category=FutureWarning)
    spec = load_spec(PretrainSpec, a.spec, a.overrides)
    rows = plan_for(spec, a.world_size, "cpu" if a.cpu else "cuda", a.hbm_gb, a.gpus_per_host)
    where = "cpu" if a.cpu else f"cuda, {a.hbm_gb:g} GB each, {a.gpus_per_host} per host"
    print(f"sharding plan of {a.spec} on {a.world_size} devices ({where}):")
    print(console.plan_table(rows))
    if a.out:
        console.save_plan(a.out, rows, a.world_size)
        print(f"written: {os.path.join(a.out, 'plan.txt')}, plan.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
