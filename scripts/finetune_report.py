"""Collect fine-tuning results into docs/benchmarks/finetune.json.

    PINFM_DATA_DIR=../shared/data python scripts/finetune_report.py   # reads runs/ft-{mind,movielens}-{none,random,pretrained}/results.json,
                                        # docs/benchmarks/raw/finetune_throughput_*.json, storage reports
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_results(ds: str, init: str) -> dict:
    with open(os.path.join(ROOT, "runs", f"ft-{ds}-{init}", "results.json")) as f:
        return json.load(f)


def storage(ds: str) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "pinfm")
    out = subprocess.run([exe, "prepare-ranking", "--spec", f"specs/finetune/{ds}.yaml"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["storage"]


def main() -> None:
    out: dict = {}
    for ds in ("mind", "movielens"):
        for init, key in (("none", "gauc_ranker"), ("random", "gauc_random_init"), ("pretrained", "gauc_pretrained")):
            r = run_results(ds, init)
            out[f"{ds}.{key}"] = round(r["test_gauc"], 4)
            out[f"{ds}.{init}.test"] = {k[5:]: round(v, 4) for k, v in r.items()
                                        if k.startswith("test_") and isinstance(v, float)}
            out[f"{ds}.{init}.valid_gauc"] = round(r["valid_gauc"], 4)
    out["new_items.auc_pretrained"] = out["mind.pretrained.test"]["new_auc"]  # MIND: 86% of test candidates are new
    for ds in ("mind", "movielens"):
        for init in ("none", "random", "pretrained"):
            out[f"new_items.{ds}.auc_{init}"] = out[f"{ds}.{init}.test"]["new_auc"]
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
    out["device"] = f"{tp['device']} (nvidia-h100-x1), torch {tp['torch']}, fbgemm_gpu 1.6.0, torchrec 1.6.1"
    out["command"] = ("metrics: PINFM_DATA_DIR=../shared/data bash scripts/finetune_benchmark.sh mind|movielens (CPU); "
                      "throughput: python3 -m pinfm_rec.train.finetune_bench --cands-per-step 4096 (GPU)")
    with open(os.path.join(ROOT, "docs", "benchmarks", "finetune.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if "." in k and not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
