"""The scaling rule (data/scaling.py): values from the data, `auto` keys resolved as overrides,
explicit values win; the sparse variant of ML-1M gets a small max_len and model; one command trains
and evaluates a SASRec-format file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pinfm_rec.data.convert_sasrec import sparsify, write_sasrec_file
from pinfm_rec.data.scaling import AUTO_KEYS, auto_overrides, scaling_rule, stats_from_lengths
from pinfm_rec.spec import load_spec
from pinfm_rec.train.pretrain import PretrainSpec

REPO = Path(__file__).resolve().parents[1]
SPEC = str(REPO / "specs" / "pretrain" / "sasrec.yaml")


def test_rule_on_ml1m_shaped_data_is_the_ml1m_recipe():
    lengths = np.r_[np.full(3000, 50), np.full(2400, 150), np.full(640, 900)]  # p90 = 900 -> capped 200
    stats = stats_from_lengths(lengths, num_items=3416)
    assert stats.events_per_user > 100 and stats.events_per_item > 50
    assert scaling_rule(stats) == {
        "data.max_len": 200, "model.trunk.max_len": 200, "model.trunk.d_model": 256, "model.embedding.dim": 256,
        "model.trunk.n_layers": 3, "model.trunk.n_heads": 2, "model.trunk.dropout": 0.3}


@pytest.mark.parametrize("p90,want", [(3, 20), (21, 30), (47.2, 50), (200, 200), (5000, 200)])
def test_max_len_is_p90_rounded_up_to_10_within_20_200(p90, want):
    lengths = np.full(10, p90) if float(p90).is_integer() else np.r_[np.full(9, 10), [p90 * 10]]
    stats = stats_from_lengths(lengths.astype(np.int64), 100)
    if not float(p90).is_integer():
        assert stats.len_percentile == pytest.approx(np.percentile(lengths.astype(np.int64), 90))
    got = scaling_rule(stats)["data.max_len"]
    assert got == min(200, max(20, int(np.ceil(stats.len_percentile / 10) * 10)))
    if float(p90).is_integer():
        assert got == want


def test_middle_tier():
    stats = stats_from_lengths(np.full(1000, 40), num_items=2000)  # 40 events/user, 20 events/item
    rule = scaling_rule(stats)
    assert (rule["model.trunk.d_model"], rule["model.trunk.n_layers"], rule["model.trunk.dropout"]) == (128, 2, 0.4)
    assert rule["data.max_len"] == 40


def _long_histories(users=300, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 400, users)
    user = np.repeat(np.arange(1, users + 1), lengths)
    item = rng.integers(1, 2000, lengths.sum())
    return user, item


def test_sparse_variant_gets_small_max_len_and_model(tmp_path):
    """Histories cut to ~9 events per user (convert_sasrec.sparsify): the rule picks SASRec's
    sparse-data setting instead of the dense recipe."""
    user, item = _long_histories()
    dense = scaling_rule(stats_from_lengths(np.bincount(user)[1:], np.unique(item).size))
    su, si = sparsify(user, item, mean_events=9, seed=0)
    sparse = scaling_rule(stats_from_lengths(np.bincount(su)[1:], np.unique(si).size))
    assert dense["data.max_len"] == 200 and dense["model.trunk.d_model"] == 256
    assert sparse["data.max_len"] == 20
    assert (sparse["model.trunk.d_model"], sparse["model.embedding.dim"], sparse["model.trunk.n_heads"]) == (64, 64, 1)
    assert sparse["model.trunk.dropout"] == 0.5  # ~1.4 events per item


def test_real_ml1m_sparse_variant(tmp_path):
    base = os.environ.get("PINFM_DATA_DIR") or str(REPO.parent / "shared" / "data")
    src = os.path.join(base, "ml-1m", "sasrec", "ml-1m.txt")
    if not os.path.isfile(src):
        pytest.skip(f"{src} not found")
    from pinfm_rec.data.convert_sasrec import read_sasrec_file

    user, item, _ = read_sasrec_file(src, progress=False)
    su, si = sparsify(user, item, mean_events=9, seed=0)
    dst = tmp_path / "ml-1m-sparse9.txt"
    write_sasrec_file(str(dst), su, si)
    ov = auto_overrides(SPEC, [f"data.path={dst}", f"data.cache_dir={tmp_path / 'cache'}"])
    spec = load_spec(PretrainSpec, SPEC, ov)
    assert spec.data.max_len == spec.model.trunk.max_len == 20  # p90 = 15
    assert (spec.model.trunk.d_model, spec.model.trunk.n_layers, spec.model.trunk.dropout) == (64, 2, 0.4)


def _tiny_file(tmp_path) -> str:
    rng = np.random.default_rng(1)
    user, item = np.repeat(np.arange(1, 121), 12), rng.integers(1, 60, 120 * 12)
    p = tmp_path / "tiny.txt"
    write_sasrec_file(str(p), user, item)
    return str(p)


def test_auto_keys_resolved_and_explicit_values_win(tmp_path):
    path = _tiny_file(tmp_path)
    base = [f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}"]
    ov = auto_overrides(SPEC, base)
    assert ov[:2] == base and sorted(o.split("=")[0] for o in ov[2:]) == sorted(AUTO_KEYS)
    spec = load_spec(PretrainSpec, SPEC, ov)
    assert spec.data.max_len == 20 and spec.model.trunk.d_model == 64 and spec.model.trunk.n_heads == 1
    ov = auto_overrides(SPEC, base + ["data.max_len=64", "model.trunk.d_model=96"])
    spec = load_spec(PretrainSpec, SPEC, ov)
    assert spec.data.max_len == 64 and spec.model.trunk.max_len == 64  # the trunk follows the data
    assert spec.model.trunk.d_model == spec.model.embedding.dim == 96
    assert auto_overrides(str(REPO / "specs" / "pretrain" / "ml1m-cpu.yaml"), ["x=1"]) == ["x=1"]  # no auto


def test_one_command_trains_and_evaluates_a_sasrec_file(tmp_path):
    path = _tiny_file(tmp_path)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pinfm_rec.cli", "pretrain", "--spec", SPEC, f"data.path={path}",
           f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "tensorboard=false",
           "parallel.embedding_optimizer=rowwise_adagrad", "parallel.embedding_lr=0.05"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert 0.0 <= res["test_hr@10"] <= 1.0 and res["test_count"] == 120
    import yaml

    saved = yaml.safe_load((run / "spec.yaml").read_text())
    assert saved["data"]["max_len"] == saved["model"]["trunk"]["max_len"] == 20
    assert saved["model"]["trunk"]["d_model"] == saved["model"]["embedding"]["dim"] == 64
