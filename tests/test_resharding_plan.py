"""Dry sharding plans per topology (scripts/scaling/plan.py, parallel.dry_plan): no process group,
no device; the HBM budget per device decides what fits (TorchRec's 32 GB default would refuse the
51 GB item table of synthetic-50m on one GPU)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("scaling_plan", os.path.join(ROOT, "scripts/scaling/plan.py"))
plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan)

SPEC = os.path.join(ROOT, "specs/pretrain/synthetic-50m.yaml")


def _spec_with(*overrides):
    from pinfm_rec.spec import load_spec
    from pinfm_rec.train.pretrain import PretrainSpec

    return load_spec(PretrainSpec, SPEC, list(overrides))


def test_row_wise_50m_items_on_8_gpus(tmp_path, capsys):
    assert plan.main(["--spec", SPEC, "--world-size", "8", "--out", str(tmp_path)]) == 0
    saved = json.load(open(tmp_path / "plan.json"))
    item = next(r for r in saved["tables"] if r["table"] == "t_item")
    assert saved["world_size"] == 8 and item["sharding_type"] == "row_wise" and item["ranks"] == list(range(8))
    assert (item["rows"], item["dim"]) == (50_000_000, 256)
    # 50M x 256 fp32 split evenly: 6103.5 MB per rank
    assert sum(item["mb_per_rank"].values()) == pytest.approx(50_000_000 * 256 * 4 / 2**20, rel=1e-6)
    assert max(item["mb_per_rank"].values()) == pytest.approx(6103.5, rel=1e-3)
    out = capsys.readouterr().out
    assert "t_item" in out and "row_wise" in out and "8 devices" in out
    assert "t_item" in open(tmp_path / "plan.txt").read()


def test_table_wise_places_the_whole_table_on_one_rank_within_the_hbm_budget():
    rows = plan.plan_for(_spec_with("model.embedding.item.sharding=table_wise"), 4, hbm_gb=141)
    item = next(r for r in rows if r["table"] == "t_item")
    assert item["sharding_type"] == "table_wise" and len(item["ranks"]) == 1
    with pytest.raises(Exception, match="(?i)plan|memory|storage"):  # 51 GB of weights > a 32 GB device
        plan.plan_for(_spec_with("model.embedding.item.sharding=table_wise"), 1, hbm_gb=32)
