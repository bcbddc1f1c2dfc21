"""Long-sequence pretraining on one GPU: step max_len up (4096, 8192, 16384, ...) until a CUDA
out-of-memory error, without and then with activation checkpointing (``model.trunk.activation_checkpointing``),
recording peak memory and tokens/s of each length that fits; the limit is the last length that fits.

    python scripts/scaling/long_seq.py --out docs/benchmarks/long_seq.json          # one H200, ~4 min
    python scripts/scaling/long_seq.py --cpu --lens 64,128 --batch 2 --steps 3     # CPU code-path check

Every length is one ``pinfm smoke`` process (a fresh CUDA context, so an OOM leaves nothing behind)
on the synthetic-50m model shape (d=256, 3 layers, 2 heads, bf16, row-wise Adagrad) with a 100k-item
catalogue and ``--batch`` rows per step whose histories are at least ``max_len`` long (one
synthetic dataset, mean length = the largest length, cut to the last ``max_len`` events). A run
that fails with ``torch.cuda.OutOfMemoryError`` ("CUDA out of memory") ends that series; any other
failure is reported as such. ``--budget-s`` stops launching new lengths once spent.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench import device_name, row_of  # noqa: E402

OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory")


def overrides(max_len: int, longest: int, batch: int, ac: bool, run_dir: str, cpu: bool) -> list:
    users = max(4 * batch, 32)
    return [f"run_dir={run_dir}", "tensorboard=false", f"data.max_len={max_len}", f"model.trunk.max_len={max_len}",
            f"data.batch_size={batch}", "data.eval_batch_size=1", "data.train_windows=false",
            "data.synthetic.num_items=100000", f"data.synthetic.num_users={users}",
            f"data.synthetic.mean_len={longest}", "data.min_events=3",
            f"model.trunk.activation_checkpointing={str(ac).lower()}", "model.loss.in_batch_negatives=1024"] + (
        ["model.embedding.dim=32", "model.trunk.d_model=32", "model.trunk.n_layers=1"] if cpu else [])


def one(max_len: int, longest: int, batch: int, ac: bool, steps: int, runs: str, cpu: bool, timeout: int) -> dict:
    run_dir = os.path.join(runs, f"len{max_len}-{'ac' if ac else 'noac'}")
    cmd = [sys.executable, "-m", "pinfm_rec.cli", "smoke", "--spec", "specs/pretrain/synthetic-50m.yaml",
           "--steps", str(steps)] + (["--cpu"] if cpu else []) + overrides(max_len, longest, batch, ac, run_dir, cpu)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PINFM_PHASE_TIMES="1")
    t0 = time.time()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        text, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"timeout after {timeout}s: {e}", -1
    res = {"max_len": max_len, "activation_checkpointing": ac, "batch_rows": batch, "wall_s": round(time.time() - t0, 1),
           "command": " ".join(cmd[1:])}
    row = row_of(run_dir) if rc == 0 else None
    if row is not None:
        res.update(status="ok", tokens_per_s=row["tokens_per_s"], step_ms=row["step_ms"],
                   peak_mem_mb=row["peak_mem_mb_rank0"], phase_ms=row["phase_ms"])
    else:
        res.update(status="oom" if any(m in text for m in OOM_MARKERS) else "failed", tail=text[-1500:])
    for sub in ("checkpoints", "encoder"):
        shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lens", default="4096,8192,16384,32768,65536,131072,262144", help="max_len values, ascending")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=230, help="no new length after this many seconds")
    p.add_argument("--timeout", type=int, default=180, help="seconds per length")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "long_seq"))
    p.add_argument("--out", default="")
    p.add_argument("--cpu", action="store_true")
    a = p.parse_args(argv)
    lens = [int(x) for x in a.lens.split(",")]
    t0, rows = time.time(), []
    limit = {}
    for ac in (False, True):
        for n in lens:
            if ac and limit.get(False) is not None and n < limit[False]:
                continue  # fits without checkpointing already: only the lengths beyond are of interest
            if time.time() - t0 > a.budget_s:
                print(f"budget spent: max_len {n} (ac={ac}) not run", flush=True)
                break
            r = one(n, max(lens), a.batch, ac, a.steps, a.runs, a.cpu, a.timeout)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("tail", "command")}), flush=True)
            if r["status"] != "ok":
                if r["status"] == "failed":
                    print(r["tail"], flush=True)
                break
            limit[ac] = n
    summary = {"device": device_name(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "batch_rows": a.batch,
               "max_len_fits": {"no_activation_checkpointing": limit.get(False),
                                "activation_checkpointing": limit.get(True)},
               "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"written: {a.out}")
    print(json.dumps(summary["max_len_fits"]))
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
