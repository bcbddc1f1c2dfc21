"""Weak-scaling benchmark of pretraining and fine-tuning on 1..N GPUs through the TorchX component.

    python scripts/scaling/bench.py run --gpus 1,2,4,8                 # GPU host: every config, nccl
    python scripts/scaling/bench.py run --tiny --gpus 1,2              # CPU / gloo code-path check
    python scripts/scaling/bench.py summarise --runs runs/scaling --out docs/benchmarks/scaling.json
    python scripts/scaling/bench.py commands --gpus 2                  # print the torchx commands only
    python scripts/scaling/bench.py quality --gpus 1,8 --out q.json    # full ML-1M recipe at 1 and 8 GPUs

Each (config, N) row is ``torchx run -s local_cwd components/pinfm.py:<pretrain|finetune> --spec ...
-j 1xN --gpu N`` with ``PINFM_PHASE_TIMES=1`` (step-time breakdown, pinfm_rec/train/phases.py), a
fixed number of steps, no periodic evaluation, a fresh run dir ``<runs>/<config>-<N>gpu``.

Weak scaling: ``data.batch_size`` (rows per GPU per step) stays fixed, so the global batch is N
times the spec's; the dense AdamW lr follows the square-root rule ``lr_N = lr_1 * sqrt(N)`` with the
same warm-up; the embedding lr stays (FBGEMM's row-wise Adagrad / Adam normalise the per-row
gradient, which the backward all-to-all sums over the N ranks' rows). Efficiency at N GPUs =
(examples/s at N) / (N * examples/s at 1), per config; throughput is the median over the logged
windows after the first (warm-up).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # pinfm_rec without an install (a GPU host running from the checkout)

# per-run overrides: bounded by steps, no periodic eval or early stopping, one final eval batch, no resume
RUN = ["train.eval_every_epochs=0", "train.patience=0", "train.eval_max_batches=1", "checkpoint.every_steps=0",
       "checkpoint.resume=false", "checkpoint.on_existing=overwrite", "tensorboard=false"]
# fine-tuning at GPU size: synthetic ranking data, a d=256 3-layer encoder (random init), DLRM
FT_GPU = ["encoder.init=random", "data.max_len=200", "model.trunk.max_len=200", "model.embedding.dim=256",
          "model.trunk.d_model=256", "model.trunk.n_layers=3", "data.batch_size=64", "data.synthetic.num_requests=50000",
          "data.synthetic.num_items=1000000", "data.synthetic.mean_len=150", "ranker.history_bag_len=100",
          "train.epochs=100"]
FT_SPEC = "specs/finetune/synthetic-tiny.yaml"

# name: (kind, component, spec, overrides). kind: pretraining | finetuning (the efficiency headline)
GPU_CONFIGS = {
    "pretrain-50m-rowwise": ("pretraining", "pretrain", "specs/pretrain/synthetic-50m.yaml", []),
    "pretrain-50m-tablewise": ("pretraining", "pretrain", "specs/pretrain/synthetic-50m.yaml",
                               ["model.embedding.item.sharding=table_wise"]),
    "pretrain-ml1m": ("pretraining", "pretrain", "specs/pretrain/ml1m-gpu.yaml", ["train.epochs=1000"]),
    "finetune-dcat": ("finetuning", "finetune", FT_SPEC, FT_GPU),
}
TINY_CONFIGS = {
    "pretrain-tiny": ("pretraining", "pretrain", "specs/pretrain/synthetic-tiny.yaml", ["train.epochs=20"]),
    "finetune-tiny": ("finetuning", "finetune", FT_SPEC, ["train.epochs=20"]),
}
# a config without its own 1-GPU row is compared with this one's (table_wise = row_wise on one GPU)
BASELINE = {"pretrain-50m-tablewise": "pretrain-50m-rowwise"}
HEADLINE = {"pretraining": ("pretrain-50m-rowwise", "pretrain-tiny"), "finetuning": ("finetune-dcat", "finetune-tiny")}


def spec_lr(component: str, spec: str, overrides: List[str]) -> float:
    from pinfm_rec.spec import load_spec

    if component == "finetune":
        from pinfm_rec.train.finetune import FinetuneSpec as cls
    else:
        from pinfm_rec.train.pretrain import PretrainSpec as cls
    return float(load_spec(cls, os.path.join(ROOT, spec), list(overrides)).train.lr)


def scaled_lr(lr1: float, gpus: int) -> float:
    """The dense lr at ``gpus`` GPUs (square-root rule on the N-times larger global batch)."""
    return lr1 * math.sqrt(gpus)


def command(name: str, cfg, gpus: int, steps: int, runs: str, tiny: bool) -> List[str]:
    kind, component, spec, extra = cfg
    lr = scaled_lr(spec_lr(component, spec, extra), gpus)
    log_every = max(1, steps // 6)
    overrides = RUN + list(extra) + [f"train.max_steps={steps}", f"train.log_every={log_every}",
                                     f"train.lr={lr:.6g}", f"name={name}-{gpus}gpu",
                                     f"run_dir={os.path.join(runs, f'{name}-{gpus}gpu')}"]
    return torchx_cmd(component, spec, gpus, tiny, overrides)


def torchx_cmd(component: str, spec: str, gpus: int, tiny: bool, overrides: List[str]) -> List[str]:
    return [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", f"components/pinfm.py:{component}",
            "--spec", spec, "-j", f"1x{gpus}", "--gpu", "0" if tiny else str(gpus),
            "--env", "PINFM_PHASE_TIMES=1", *overrides]


# quality at N GPUs under the same rule: the full ML-1M recipe (its own epochs and evaluation)
QUALITY = ("pretrain", "specs/pretrain/ml1m-gpu.yaml", [])
QUALITY_TINY = ("pretrain", "specs/pretrain/synthetic-tiny.yaml", ["train.epochs=1", "train.eval_max_batches=2"])
QUALITY_METRICS = ("test_hr@10", "test_ndcg@10", "valid_hr@10", "valid_ndcg@10")


def quality(args) -> dict:
    """Train the whole recipe at each GPU count (dense lr x sqrt(N)) and record its test/valid metrics."""
    component, spec, extra = QUALITY_TINY if args.tiny else QUALITY
    rows = []
    for n in (int(g) for g in args.gpus.split(",")):
        run_dir = os.path.join(args.runs, f"quality-{n}gpu")
        lr = scaled_lr(spec_lr(component, spec, extra), n)
        cmd = torchx_cmd(component, spec, n, args.tiny, list(extra) + [
            "checkpoint.resume=false", "checkpoint.on_existing=overwrite", "tensorboard=false", f"train.lr={lr:.6g}",
            f"name=quality-{n}gpu", f"run_dir={run_dir}"])
        print("+", " ".join(cmd[1:]), flush=True)
        out = subprocess.run(cmd, cwd=ROOT, env=_env(args.tiny), capture_output=True, text=True, timeout=args.timeout)
        path = os.path.join(run_dir, "results.json")
        if not os.path.isfile(path):
            print(f"FAILED quality x{n} (rc {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}", flush=True)
            continue
        with open(path) as f:
            res = json.load(f)
        rows.append({"gpus": n, "lr": lr, "steps": res.get("steps"), "wall_s": res.get("wall_s"),
                     **{k: res.get(k) for k in QUALITY_METRICS}, "command": " ".join(cmd[1:])})
        print(f"  quality x{n}: " + " ".join(f"{k}={rows[-1][k]}" for k in QUALITY_METRICS), flush=True)
    result = {"spec": spec, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"written: {args.out}")
    return result


def _env(tiny: bool) -> dict:
    env = dict(os.environ)
    if tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _median(vals: List[float]) -> Optional[float]:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def row_of(run_dir: str) -> Optional[dict]:
    """One measured row from a run's results.json (None when the run left none)."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        res = json.load(f)
    perf = res.get("perf") or []
    steady = perf[1:] or perf  # the first window holds the warm-up (kernels, allocator, loader start)
    meta = {}
    if os.path.isfile(os.path.join(run_dir, "bench_meta.json")):
        with open(os.path.join(run_dir, "bench_meta.json")) as f:
            meta = json.load(f)
    phases = sorted({k for p in steady for k in p if k.startswith("perf/phase_")})
    return {
        **meta,
        "world_size": res.get("world_size"), "device": res.get("device"), "steps": res.get("steps"),
        "examples_per_s": _median([p.get("perf/examples_per_s") for p in steady]),
        "tokens_per_s": _median([p.get("perf/tokens_per_s") for p in steady]),
        "step_ms": _median([p.get("perf/step_ms") for p in steady]),
        "phase_ms": {k[len("perf/phase_"):-len("_ms")]: _median([p.get(k) for p in steady]) for k in phases},
        "peak_mem_mb_rank0": max((p.get("perf/peak_mem_mb", 0.0) for p in perf), default=None),
        "windows": len(steady), "wall_s": res.get("wall_s"),
    }


def device_name(tiny: bool = False) -> str:
    """The device the runs used: a --tiny run is CPU / gloo (CUDA hidden) even on a GPU host."""
    if tiny:
        return f"cpu ({os.cpu_count()} cores)"
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover - a broken CUDA install reads as CPU
        pass
    return f"cpu ({os.cpu_count()} cores)"


def summarise(rows: List[dict], device: str) -> dict:
    """scaling.json: per-row measurements, weak-scaling efficiency per config and per kind (headline)."""
    by_cfg: Dict[str, Dict[int, dict]] = {}
    for r in rows:
        by_cfg.setdefault(r["config"], {})[int(r["gpus"])] = r
    eff_by_cfg: Dict[str, Dict[str, float]] = {}
    for cfg, per in by_cfg.items():
        base = (per.get(1) or by_cfg.get(BASELINE.get(cfg, ""), {}).get(1) or {}).get("examples_per_s")
        if base:
            eff_by_cfg[cfg] = {str(n): round(r["examples_per_s"] / (n * base), 4)
                               for n, r in sorted(per.items()) if r.get("examples_per_s")}
    eff = {}
    for kind, names in HEADLINE.items():
        name = next((n for n in names if n in eff_by_cfg), None)
        if name:
            eff[kind] = {"config": name, **eff_by_cfg[name]}
    gpus = [int(r["gpus"]) for r in rows if r.get("examples_per_s")]
    return {"device": device, "max_gpus_measured": max(gpus) if gpus else 0,
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "rule": "weak scaling: data.batch_size per GPU fixed (global batch x N); dense lr x sqrt(N), "
                    "same warm-up; embedding lr unchanged",
            "weak_scaling_efficiency": eff, "weak_scaling_efficiency_by_config": eff_by_cfg, "rows": rows}


def run(args) -> int:
    configs = TINY_CONFIGS if args.tiny else GPU_CONFIGS
    names = args.configs.split(",") if args.configs else list(configs)
    gpus = [int(g) for g in args.gpus.split(",")]
    rows, failed = [], []
    os.makedirs(args.runs, exist_ok=True)
    for name in names:
        for n in gpus:
            cmd = command(name, configs[name], n, args.steps, args.runs, args.tiny)
            run_dir = os.path.join(args.runs, f"{name}-{n}gpu")
            shutil.rmtree(run_dir, ignore_errors=True)
            print("+", " ".join(cmd[1:]), flush=True)
            t0 = time.time()
            out = subprocess.run(cmd, cwd=ROOT, env=_env(args.tiny), capture_output=True, text=True, timeout=args.timeout)
            meta = {"config": name, "kind": configs[name][0], "gpus": n, "command": " ".join(cmd[1:]),
                    "lr": float(next(a for a in cmd if a.startswith("train.lr=")).split("=", 1)[1])}
            row = None
            if os.path.isdir(run_dir):
                with open(os.path.join(run_dir, "bench_meta.json"), "w") as f:
                    json.dump(meta, f)
                row = row_of(run_dir)
            if row is None:
                failed.append(f"{name} x{n}")
                print(f"FAILED {name} x{n} (rc {out.returncode}, {time.time() - t0:.0f}s):\n{out.stdout[-2000:]}\n"
                      f"{out.stderr[-4000:]}", flush=True)
                continue
            rows.append(row)
            print(f"  {name} x{n}: {row['examples_per_s']:.1f} ex/s, {row['tokens_per_s']:.0f} tok/s, "
                  f"step {row['step_ms']:.1f} ms, peak {row['peak_mem_mb_rank0']:.0f} MB ({time.time() - t0:.0f}s)",
                  flush=True)
            if not args.keep:  # the 50M runs leave ~100 GB of checkpoint + encoder export
                for sub in ("checkpoints", "encoder", "encoder.tmp"):
                    shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
    summary = summarise(rows, device_name(args.tiny))
    summary["failed"] = failed
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"written: {args.out}")
    print(json.dumps(summary["weak_scaling_efficiency"]))
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "commands", "quality"):
        s = sub.add_parser(name)
        s.add_argument("--gpus", default="1,2,4,8", help="comma-separated GPU (rank) counts")
        s.add_argument("--configs", default="", help="comma-separated config names (default: all)")
        s.add_argument("--tiny", action="store_true", help="CPU/gloo, synthetic-tiny configs")
        s.add_argument("--steps", type=int, default=100)
        s.add_argument("--runs", default=os.path.join(ROOT, "runs", "scaling"))
        s.add_argument("--out", default="", help="scaling.json to write")
        s.add_argument("--keep", action="store_true", help="keep checkpoints and encoder exports")
        s.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    s = sub.add_parser("summarise")
    s.add_argument("--runs", default=os.path.join(ROOT, "runs", "scaling"))
    s.add_argument("--out", required=True)
    s.add_argument("--quality", default="", help="a `quality` JSON to embed as ml1m_quality")
    a = p.parse_args(argv)
    if a.cmd == "quality":
        return 0 if quality(a)["rows"] else 1
    if a.cmd == "commands":
        configs = TINY_CONFIGS if a.tiny else GPU_CONFIGS
        for name in (a.configs.split(",") if a.configs else configs):
            for n in (int(g) for g in a.gpus.split(",")):
                print(" ".join(command(name, configs[name], n, a.steps, a.runs, a.tiny)))
        return 0
    if a.cmd == "run":
        return run(a)
    rows = [r for d in sorted(os.listdir(a.runs)) if (r := row_of(os.path.join(a.runs, d))) and "config" in r]
    # (summarise has no --tiny: runs of the tiny configs alone were CPU / gloo runs)
    summary = summarise(rows, device_name(bool(rows) and all(r["config"] in TINY_CONFIGS for r in rows)))
    if a.quality and os.path.isfile(a.quality):
        with open(a.quality) as f:
            summary["ml1m_quality"] = json.load(f)
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary["weak_scaling_efficiency"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
