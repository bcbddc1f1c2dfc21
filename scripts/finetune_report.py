"""Collect fine-tuning results into docs/benchmarks/finetune.json.

    PINFM_DATA_DIR=../shared/data .venv/bin/python scripts/finetune_report.py
reads runs/ft-{mind,movielens}-{none,random,pretrained}-s{seed}/results.json (written by
scripts/finetune_benchmark.sh), docs/benchmarks/raw/finetune_throughput_*.json and the storage
reports. ``<ds>.gauc_<model>`` is the mean test GAUC over the seeds; per-seed values under
``<ds>.<init>.seeds``. A dataset with none of its runs in this checkout keeps the values (and note)
of the existing report (listed under ``kept_from_earlier_report``).
"""
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SEEDS = (0, 1, 2)
KEYS = (("none", "gauc_ranker"), ("random", "gauc_random_init"), ("pretrained", "gauc_pretrained"))


def run_results(ds: str, init: str, seed: int) -> dict:
    with open(os.path.join(ROOT, "runs", f"ft-{ds}-{init}-s{seed}", "results.json")) as f:
        return json.load(f)


def seed_rows(ds: str, init: str) -> dict:
    """{seed: valid/test metrics} of the finished runs of (ds, init)."""
    rows = {}
    for s in SEEDS:
        try:
            r = run_results(ds, init, s)
        except FileNotFoundError:
            continue
        rows[str(s)] = {"valid_gauc": round(r["valid_gauc"], 4), "best_epoch": r.get("best_epoch"),
                        "best_step": r.get("best_step"),
                        "wall_s": round(r["wall_s"], 1),
                        **{k: round(v, 4) for k, v in r.items() if k.startswith("test_") and isinstance(v, float)}}
    return rows


def mean(rows: dict, key: str) -> float:
    return round(sum(r[key] for r in rows.values()) / len(rows), 4)


def storage(ds: str) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "pinfm")
    out = subprocess.run([exe, "prepare-ranking", "--spec", f"specs/finetune/{ds}.yaml"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["storage"]


def previous(old: dict, ds: str) -> dict:
    """The keys of dataset ``ds`` in the existing report ``old`` (kept when this checkout has none of its runs)."""
    return {k: v for k, v in old.items() if k.startswith(f"{ds}.") or k.startswith(f"new_items.{ds}.")}


def main() -> None:
    out: dict = {}
    path = os.path.join(ROOT, "docs", "benchmarks", "finetune.json")
    old: dict = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    kept = []
    for ds in ("mind", "movielens"):
        runs = {init: seed_rows(ds, init) for init, _ in KEYS}
        if not any(runs.values()):  # no run of ds here: its recorded values stay
            out.update(previous(old, ds))
            kept.append(ds)
            continue
        for init, key in KEYS:
            rows = runs[init]
            if not rows:
                continue
            out[f"{ds}.{key}"] = mean(rows, "test_gauc")
            out[f"{ds}.{init}.valid_gauc"] = mean(rows, "valid_gauc")
            out[f"{ds}.{init}.test"] = {k[5:]: mean(rows, k) for k in next(iter(rows.values()))
                                        if k.startswith("test_") and k != "test_count" and k != "test_requests"}
            out[f"{ds}.{init}.seeds"] = rows
            out[f"new_items.{ds}.auc_{init}"] = out[f"{ds}.{init}.test"].get("new_auc")
    out["new_items.auc_pretrained"] = out.get("new_items.mind.auc_pretrained")  # MIND: 86% of test candidates are new
    st = {ds: storage(ds) for ds in ("mind", "movielens")}
    out["storage_ratio_flat_over_dedup"] = round(st["mind"]["shuffled_flat"]["ratio"], 2)
    out["storage"] = {ds: {"dedup_bytes": s["dedup_bytes"], "flat_request_ordered_bytes": s["flat_bytes"],
                           "ratio_request_ordered": round(s["ratio"], 2),
                           "flat_shuffled_bytes": s["shuffled_flat"]["flat_bytes"],
                           "ratio_shuffled": round(s["shuffled_flat"]["ratio"], 2),
                           "ratio_uncompressed": round(s["uncompressed"]["ratio"], 2),
                           "ratio_user_columns_request_ordered": round(s["user_columns"]["ratio"], 2),
                           "ratio_user_columns_shuffled": round(s["shuffled_flat"]["user_columns_ratio"], 2)}
                      for ds, s in st.items()}
    with open(os.path.join(ROOT, "docs", "benchmarks", "raw", "finetune_throughput_4096.json")) as f:
        tp = json.load(f)
    row32 = [r for r in tp["rows"] if r["cands_per_request"] == 32][0]
    out["train_speedup_dedup_32"] = round(row32["speedup"], 2)
    out["throughput"] = {f"{r['cands_per_request']}": {"dedup_examples_per_s": round(r["dedup_examples_per_s"]),
                                                        "flat_examples_per_s": round(r["flat_examples_per_s"]),
                                                        "speedup": round(r["speedup"], 2)} for r in tp["rows"]}
    out["throughput_device"] = f"{tp['device']} (nvidia-h100-x1), torch {tp['torch']}, fbgemm_gpu 1.6.0, torchrec 1.6.1"
    import torch
    import torchrec

    out["device"] = (f"CPU (2-core shared dev machine, gloo, 1 process), torch {torch.__version__}, "
                     f"torchrec {torchrec.__version__}")
    out["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out["seeds"] = list(SEEDS)
    out["protocol"] = ("same DLRM, seeds and protocol per arm: up to train.epochs, valid GAUC each epoch and every "
                       "train.eval_every_steps steps where the spec sets it (MIND: 20), early stopping "
                       "(train.patience evaluations), the best-valid model tested once; means over the seeds "
                       "listed under <ds>.<init>.seeds")
    if "mind" not in kept:
        out["mind.note"] = ("encoder pretrained on the histories-only corpus (scripts/history_corpus.py; the default "
                            "corpus holds the train clicks) with encoder.unseen_items=zero; data.engagement_counters="
                            "true (impressions / clicks / smoothed CTR of the candidate's item in earlier requests: "
                            "77% of test candidates never appear in the train split); see docs/benchmarks/finetune.md")
    if kept:  # datasets whose runs were not in this checkout, and the date of the report they come from
        dates = old.get("kept_from_earlier_report")
        dates = dates if isinstance(dates, dict) else {}
        out["kept_from_earlier_report"] = {ds: dates.get(ds, old.get("date")) for ds in kept}
    out["command"] = ("metrics: PINFM_DATA_DIR=../shared/data SEEDS='0 1 2' bash scripts/finetune_benchmark.sh "
                      "mind|movielens (CPU; MIND pretrained on the histories-only corpus of scripts/history_corpus.py, "
                      "see docs/benchmarks/finetune.md); report: .venv/bin/python scripts/finetune_report.py; "
                      "throughput: python3 -m pinfm_rec.train.finetune_bench --cands-per-step 4096 (GPU)")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k.count(".") == 1 and not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
