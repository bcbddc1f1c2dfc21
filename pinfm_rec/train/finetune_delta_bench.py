"""Delta vs full export size for fine-tuning intervals (issue 18): ``pinfm finetune delta_export=true``
on the synthetic ranking stream at several catalogue sizes, per id mode.

One run per (catalogue size, id mode): the same request stream shape (``--requests`` requests, the
synthetic generator's timelines), DLRM + a random-init PinFM encoder (d32, 2 layers), fused SGD
tables, ``checkpoint.every_steps`` = a fifth of an epoch, so each incremental export covers a
"day" of ~20% of the train requests. Records per run: bytes of the base (a full export) and of each
delta, their ratio, the share of table rows a delta carries per table, and the bytes of the dense
rest (trunk, MLPs, managed slot state) every delta repeats.

    OMP_NUM_THREADS=1 python -m pinfm_rec.train.finetune_delta_bench --items 600 20000 \\
        --out docs/benchmarks/finetune_delta.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

from pinfm_rec.spec import from_dict
from pinfm_rec.train.delta_export import BASE, STATE_FILE, _is_table, chain_dirs, chain_sizes

MODES = {"dense": {"id_mode": "error"}, "managed": {"id_mode": "managed"}}


def _spec(tmp: str, items: int, mode: str, requests: int, epochs: int) -> dict:
    raw = mode != "dense"
    emb = {"dim": 32, **MODES[mode]}
    if raw:
        emb["item"] = {"num_embeddings": items}
    steps_per_epoch = int(requests * 0.8) // 32
    return {
        "name": f"delta-{mode}-{items}", "seed": 0, "tensorboard": False, "delta_export": True,
        "run_dir": os.path.join(tmp, f"{mode}-{items}"),
        "data": {"source": "synthetic", "max_len": 30, "batch_size": 32, "eval_batch_size": 128, "raw_ids": raw,
                 "cache_dir": os.path.join(tmp, "cache"),
                 "synthetic": {"num_requests": requests, "num_items": items, "mean_len": 30, "candidates_next": 4,
                               "negatives_per_request": 12, "raw_id_offset": 2**40 if raw else 0}},
        "model": {"embedding": emb, "trunk": {"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1,
                                              "max_len": 30}},
        "encoder": {"init": "random", "out_dim": 16, "cand_id_dropout": 0.1, "kernel": "pytorch"},
        "ranker": {"arch": "dlrm", "embedding_dim": 16, "dense_arch": [32, 16], "over_arch": [32, 1],
                   "history_bag_len": 30},
        "parallel": {"embedding_optimizer": "sgd", "embedding_lr": 0.1},
        "train": {"epochs": epochs, "lr": 0.002, "warmup_steps": 10, "log_every": 50, "eval_every_epochs": 0,
                  "eval_max_batches": 2},
        "checkpoint": {"every_steps": max(1, steps_per_epoch // 5)},  # 5 equal intervals per epoch
    }


def _breakdown(out_dir: str) -> Dict[str, object]:
    """Mean over the deltas: share of each table's rows a delta carries, bytes of the row part, of the
    dense rest (what every delta repeats whole) and of the managed slot state in it."""
    base = torch.load(os.path.join(out_dir, BASE, STATE_FILE), weights_only=False)["full"]
    shares: Dict[str, List[float]] = {}
    dense_bytes, row_bytes, slot_bytes = [], [], []
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    for d in chain_dirs(out_dir)[1:]:
        delta = torch.load(os.path.join(d, STATE_FILE), weights_only=False)
        for k, (ids, rows) in delta["rows"].items():
            if rows.dim() == 2:
                shares.setdefault(k.split(".")[-2], []).append(ids.numel() / base[k].shape[0])
        row_bytes.append(sum(nbytes(i) + nbytes(r) for i, r in delta["rows"].values()))
        dense_bytes.append(sum(nbytes(v) for v in delta["dense"].values()))
        slot_bytes.append(sum(nbytes(i) + nbytes(r) for k, (i, r) in delta["rows"].items() if "._mch_" in k)
                          + sum(nbytes(v) for k, v in delta["dense"].items() if "._mch_" in k))
    table_bytes = sum(nbytes(v) for k, v in base.items() if _is_table(k, v))  # embedding rows of a full export
    return {"rows_share_per_table": {k: float(np.mean(v)) for k, v in shares.items()},
            "delta_row_bytes": float(np.mean(row_bytes)), "delta_dense_bytes": float(np.mean(dense_bytes)),
            "delta_slot_state_bytes": float(np.mean(slot_bytes)), "full_table_bytes": int(table_bytes)}


def run_one(tmp: str, items: int, mode: str, requests: int, epochs: int) -> Dict[str, object]:
    from pinfm_rec.train.finetune import FinetuneSpec, finetune

    spec = from_dict(FinetuneSpec, _spec(tmp, items, mode, requests, epochs))
    t0 = time.perf_counter()
    res = finetune(spec, force_cpu=True)
    out_dir = os.path.join(spec.run_dir, "deltas")
    sizes = chain_sizes(out_dir)
    deltas = [b for k, b in sizes.items() if k != BASE]
    return {"items": items, "id_mode": mode, "raw_ids": spec.data.raw_ids, "steps": res["steps"],
            "interval_steps": spec.checkpoint.every_steps,
            "interval_requests": spec.checkpoint.every_steps * spec.data.batch_size,
            "full_bytes": sizes[BASE], "delta_bytes_mean": float(np.mean(deltas)), "num_deltas": len(deltas),
            "delta_over_full": float(np.mean(deltas) / sizes[BASE]), **_breakdown(out_dir),
            "test_auc": res.get("test_auc"), "wall_s": time.perf_counter() - t0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[600, 20000])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for items in args.items:
            for mode in args.modes:
                rows.append(run_one(tmp, items, mode, args.requests, args.epochs))
                print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python -m pinfm_rec.train.finetune_delta_bench " + " ".join(argv or []), "rows": rows,
           "torch": torch.__version__}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
