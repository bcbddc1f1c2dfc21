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


def _run(tmp_path, name, csv, *extra):
    cmd = [sys.executable, "-m", "pinfm_rec.cli", "pretrain", "--spec", "specs/pretrain/synthetic-tiny.yaml",
           f"run_dir={tmp_path}/{name}", f"data.cache_dir={tmp_path}/cache", "data.source=csv", f"data.path={csv}",
           "data.raw_ids=true", "data.max_len=20", "model.trunk.max_len=20", "data.batch_size=32",
           "model.embedding.id_mode=managed", "model.embedding.item.num_embeddings=512",
           "parallel.embedding_optimizer=sgd", "parallel.embedding_lr=0.2", "train.log_every=5", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)


def test_continued_pretraining_from_a_checkpoint_admits_new_ids(tmp_path):
    """Pretrain on the events before the new items appear; continue on the whole stream with
    init_from=<its encoder>: it starts where the first run ended (lower first losses than a fresh
    run), and the new raw ids get slots."""
    s = churn_stream(num_users=300, num_items=300, mean_len=20, seed=1)
    cols = ("user_id", "item_id", "timestamp")
    old = s.events["timestamp"] < s.t_new
    for name, keep in (("old.csv", old), ("all.csv", np.ones_like(old))):
        np.savetxt(tmp_path / name, np.stack([s.events[k][keep] for k in cols], 1), fmt="%d", delimiter=",",
                   header=",".join(cols), comments="")
    first = _run(tmp_path, "first", tmp_path / "old.csv", "train.epochs=3")
    assert first.returncode == 0, first.stderr[-3000:]
    losses = {}
    for name, extra in (("continued", [f"init_from={tmp_path}/first/encoder"]), ("fresh", [])):
        out = _run(tmp_path, name, tmp_path / "all.csv", "train.epochs=1", *extra)
        assert out.returncode == 0, out.stderr[-3000:]
        losses[name] = json.loads((tmp_path / name / "results.json").read_text())["perf"][0]["train/loss"]
    assert losses["continued"] < 0.8 * losses["fresh"], losses
    from pinfm_rec.model.encoder import PinFMEncoder
    from pinfm_rec.model.managed import slot_ids

    admitted = {}
    for name in ("first", "continued"):
        admitted[name] = set(slot_ids(PinFMEncoder.from_pretrained(str(tmp_path / name / "encoder")))[0].tolist())
    new_ids = set(s.events["item_id"][s.is_new].tolist())
    assert not admitted["first"] & new_ids and len(admitted["continued"] & new_ids) > 0.5 * len(new_ids)
    bad = _run(tmp_path, "bad", tmp_path / "all.csv", f"init_from={tmp_path}/first/encoder", "model.trunk.d_model=16")
    assert bad.returncode == 2 and "init_from=" in bad.stderr and "trunk" in bad.stderr, bad.stderr[-2000:]


def test_init_from_a_checkpoint_with_another_dense_vocabulary_is_one_error(tmp_path):
    import pytest
    import yaml

    from pinfm_rec.errors import CheckpointError
    from pinfm_rec.model import EmbeddingSpec, ModelSpec, PinFM, TrunkSpec
    from pinfm_rec.spec import to_dict
    from pinfm_rec.train.checkpoint import export_encoder
    from pinfm_rec.train.init_from import init_from

    ms = ModelSpec(embedding=EmbeddingSpec(dim=16), trunk=TrunkSpec(d_model=16, n_layers=1, n_heads=2, max_len=10))
    vocab = {"num_items": 40, "num_actions": 4, "num_surfaces": 3}
    path = export_encoder(str(tmp_path / "enc"), PinFM(ms, vocab, device="cpu"), yaml.safe_dump({"model": to_dict(ms)}),
                          vocab, rank=0)
    same = PinFM(ms, vocab, device="cpu")
    assert init_from(same, path, ms) > 0
    with pytest.raises(CheckpointError, match="init_from=.*id_mode=managed"):
        init_from(PinFM(ms, dict(vocab, num_items=50), device="cpu"), path, ms)


def test_raw_ids_need_a_managed_or_hashed_item_table():
    import pytest

    from pinfm_rec.errors import SpecError
    from pinfm_rec.spec import load_spec
    from pinfm_rec.train.pretrain import PretrainSpec

    path = os.path.join(ROOT, "specs", "pretrain", "synthetic-tiny.yaml")
    with pytest.raises(SpecError, match="'data.raw_ids': true needs model.embedding.id_mode=managed"):
        load_spec(PretrainSpec, path, ["data.raw_ids=true"])
    spec = load_spec(PretrainSpec, path, ["data.raw_ids=true", "model.embedding.id_mode=managed",
                                          "model.embedding.managed.eviction=lfu"])
    assert spec.model.embedding.managed.eviction == "lfu"
