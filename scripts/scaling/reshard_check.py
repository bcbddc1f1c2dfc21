"""Resharding check: train a tiny run on N ranks through ``torch.distributed.run``, resume it on M ranks for zero steps
(which re-saves the same step), and compare the two DCP checkpoints as full tensors.

A checkpoint converted with ``dcp_to_torch_save`` holds every tensor whole (sharded tables and
their fused optimizer state included), so equal dicts mean the M-rank run loaded exactly what the
N-rank run saved.

    python scripts/scaling/reshard_check.py --save 2 --load 1                 # CPU / gloo
    python scripts/scaling/reshard_check.py --save 8 --load 2 --gpu \
        --spec specs/pretrain/synthetic-50m.yaml --out runs/reshard-8to2      # GPU / nccl

prints one JSON line (equal / different / missing keys, the world-size warning seen) and exits 1
when any tensor differs or is missing. tests/test_resharding.py runs it on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from pinfm_rec.train.checkpoint import _flatten  # noqa: E402  (nested dict -> {"a.b.c": value})

# both runs: no periodic eval or checkpoint, one eval batch at the end, no TensorBoard
RUN = ["train.eval_every_epochs=0", "train.patience=0", "train.eval_max_batches=1", "checkpoint.every_steps=0",
       "tensorboard=false"]
# a smaller synthetic-tiny (the CPU tests): 300 users, 16 rows per rank and step
TINY = ["data.synthetic.num_users=300", "data.batch_size=16"]


def torchrun(nproc: int, command: str, spec: str, overrides: List[str], cpu: bool = True,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """``pinfm <command>`` on ``nproc`` local ranks (gloo on CPU unless ``cpu`` is False)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pinfm_rec.cli", command, "--spec", spec, *overrides]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def full_state(ckpt: str, out_file: str) -> Dict[str, object]:
    """The checkpoint as one flat {key: full tensor or value} dict (DCP → torch.save format)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, out_file)
    return _flatten(torch.load(out_file, weights_only=False))


def compare(a: Dict[str, object], b: Dict[str, object]) -> Dict[str, List[str]]:
    """{"only_a": keys, "only_b": keys, "different": keys, "equal": keys} of two flat states; tensors
    compare exactly (same shape, dtype and values)."""
    res: Dict[str, List[str]] = {"only_a": sorted(set(a) - set(b)), "only_b": sorted(set(b) - set(a)),
                                 "different": [], "equal": []}
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if torch.is_tensor(x) and torch.is_tensor(y):
            same = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        else:
            same = x == y
        res["equal" if same else "different"].append(k)
    return res


def save_then_resume(run_root: str, spec: str, n: int, m: int, steps: int = 3, save_overrides=(),
                     load_overrides=(), cpu: bool = True) -> dict:
    """Train ``steps`` steps on ``n`` ranks, copy the final checkpoint aside, resume on ``m`` ranks
    for zero steps (same max_steps: the resumed run re-saves step ``steps``), then compare both
    checkpoints. Returns {"cmp": compare(...), "saved", "resumed", "log": the resumed run's log}."""
    run_dir = os.path.join(run_root, "run")
    base = RUN + [f"name=reshard-{n}to{m}", f"run_dir={run_dir}", f"train.max_steps={steps}"]
    torchrun(n, "pretrain", spec, base + list(save_overrides), cpu=cpu)
    ckpt = os.path.join(run_dir, "checkpoints", f"step_{steps:08d}")
    saved = os.path.join(run_root, f"saved_on_{n}")
    shutil.copytree(ckpt, saved)
    torchrun(m, "pretrain", spec, base + list(load_overrides), cpu=cpu)
    with open(os.path.join(run_dir, "log.txt")) as f:
        log = f.read()
    a = full_state(saved, os.path.join(run_root, "a.pt"))
    b = full_state(ckpt, os.path.join(run_root, "b.pt"))
    return {"cmp": compare(a, b), "saved": a, "resumed": b, "log": log}


WORLD_CHANGE_WARNING = "no loader state for world size"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save", type=int, required=True, help="ranks of the saving run (N)")
    p.add_argument("--load", type=int, required=True, help="ranks of the resuming run (M)")
    p.add_argument("--spec", default="specs/pretrain/synthetic-tiny.yaml")
    p.add_argument("--out", default="runs/reshard-check", help="scratch dir (replaced)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gpu", action="store_true", help="nccl on the GPUs (default: CPU / gloo)")
    p.add_argument("--save-override", action="append", default=[], help="spec override of the saving run only")
    p.add_argument("--load-override", action="append", default=[], help="spec override of the resuming run only")
    p.add_argument("--tiny", action="store_true", help="shrink synthetic-tiny further (300 users, batch 16)")
    p.add_argument("overrides", nargs="*", help="spec overrides of both runs")
    a = p.parse_args(argv)
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    both = (TINY if a.tiny else []) + a.overrides
    r = save_then_resume(a.out, a.spec, a.save, a.load, a.steps, both + a.save_override, both + a.load_override,
                         cpu=not a.gpu)
    c = r["cmp"]
    ok = not (c["different"] or c["only_a"] or c["only_b"])
    print(json.dumps({"save_ranks": a.save, "load_ranks": a.load, "ok": ok, "equal": len(c["equal"]),
                      "different": c["different"], "missing_after_resume": c["only_a"], "new_after_resume": c["only_b"],
                      "world_change_logged": WORLD_CHANGE_WARNING in r["log"]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
