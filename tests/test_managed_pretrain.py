"""Raw 64-bit item ids end to end: a CSV event log with raw ids, data.raw_ids=true (the loader emits
the source ids, eval ranks the catalogue of raw ids) and embedding.id_mode=managed, through the
`pinfm pretrain` CLI; and the loader's raw-id batches."""
import json
import os
import subprocess
import sys

import numpy as np

from pinfm_rec.data.churn import churn_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _csv(tmp_path) -> str:
    s = churn_stream(num_users=300, num_items=300, mean_len=20, seed=1)
    path = str(tmp_path / "events.csv")
    cols = np.stack([s.events[k] for k in ("user_id", "item_id", "timestamp")], 1)
    np.savetxt(path, cols, fmt="%d", delimiter=",", header="user_id,item_id,timestamp", comments="")
    return path


def test_loader_emits_raw_ids(tmp_path):
    from pinfm_rec.data.loader import build_loader
    from pinfm_rec.data.prepare import DataSpec, prepare_dataset

    spec = DataSpec(source="csv", path=_csv(tmp_path), cache_dir=str(tmp_path / "cache"), raw_ids=True,
                    max_len=20, batch_size=8)
    info = prepare_dataset(spec)
    assert info.item_raw_ids is not None and info.item_raw_ids.size == info.num_items
    assert int(info.item_raw_ids.max()) > 2**40  # the source's raw ids, not 0..N-1
    raw = set(info.item_raw_ids.tolist())
    train = next(iter(build_loader(spec, info, "train")))
    assert set(train.features.values().tolist()[: train.features["item_id"].values().numel()]) <= raw
    assert set(train.features["neg_item_id"].values().tolist()) <= raw
    valid = next(iter(build_loader(spec, info, "valid")))
    assert set(valid.target_item.tolist()) <= raw


def test_pretrain_with_raw_ids_and_managed_tables(tmp_path):
    cmd = [sys.executable, "-m", "pinfm_rec.cli", "pretrain", "--spec", "specs/pretrain/synthetic-tiny.yaml",
           f"run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache", "data.source=csv",
           f"data.path={_csv(tmp_path)}", "data.raw_ids=true", "data.max_len=20", "model.trunk.max_len=20",
           "data.batch_size=32", "model.embedding.id_mode=managed", "model.embedding.item.num_embeddings=512",
           "parallel.embedding_optimizer=sgd", "parallel.embedding_lr=0.2", "train.epochs=2", "train.log_every=5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    num_items = json.loads((tmp_path / "run" / "encoder" / "encoder_meta.json").read_text())["num_items"]
    hr = res["test_hr@10"]
    assert np.isfinite(hr) and hr > 3 * 10 / num_items, res  # learned: well above a random ranking
