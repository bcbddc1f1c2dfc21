"""`pinfm plan`: the sharding plan of a spec for a topology (parallel.dry_plan / spec_plan_rows), with no
process group and no device; the HBM budget per device decides what fits (TorchRec's 32 GB default
would refuse the 51 GB item table of synthetic-50m on one GPU)."""
import json
import os

import pytest

from pinfm_rec import cli
from pinfm_rec.parallel import spec_plan_rows
from pinfm_rec.spec import load_spec
from pinfm_rec.train.pretrain import PretrainSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "specs/pretrain/synthetic-50m.yaml")


def test_row_wise_50m_items_on_8_gpus(tmp_path, capsys):
    assert cli.main(["plan", "--spec", SPEC, "--world-size", "8", "--out", str(tmp_path)]) == 0
    saved = json.load(open(tmp_path / "plan.json"))
    item = next(r for r in saved["tables"] if r["table"] == "t_item")
    assert saved["world_size"] == 8 and item["sharding_type"] == "row_wise" and item["ranks"] == list(range(8))
    assert (item["rows"], item["dim"]) == (50_000_000, 256)
    # 50M x 256 fp32 split evenly: 6103.5 MB per rank
    assert sum(item["mb_per_rank"].values()) == pytest.approx(50_000_000 * 256 * 4 / 2**20, rel=1e-6)
    assert max(item["mb_per_rank"].values()) == pytest.approx(6103.5, rel=1e-3)
    out = capsys.readouterr().out
    assert "t_item" in out and "row_wise" in out and "on 8 GPUs" in out
    assert "t_item" in open(tmp_path / "plan.txt").read()


def test_table_wise_fits_an_h200_but_not_a_32gb_device(capsys):
    spec = load_spec(PretrainSpec, SPEC, ["model.embedding.item.sharding=table_wise"])
    item = next(r for r in spec_plan_rows(spec, 4, hbm_gb=141) if r["table"] == "t_item")
    assert item["sharding_type"] == "table_wise" and len(item["ranks"]) == 1
    # 51 GB of weights on one 32 GB device: a one-line spec error (exit 2) naming what to change
    assert cli.main(["plan", "--spec", SPEC, "--world-size", "1", "--hbm-gb", "32",
                     "model.embedding.item.sharding=table_wise"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pinfm: spec error:") and "no sharding plan fits 1 device(s) of 32 GB" in err
    assert len(err.splitlines()) == 1
