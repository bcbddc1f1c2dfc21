"""Loader: batch contents, rank sharding, eval coverage/padding, determinism, resume; prepare caching."""
from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pinfm_rec.data import (
    DataFormatError,
    DataSpec,
    SyntheticSpec,
    build_loader,
    prepare_dataset,
    validate_prepared,
    write_prepared,
)
from pinfm_rec.data import prepare as prepare_mod

# Hand-made dataset: user -> list of (item, timestamp); user 7 has 2 events (dropped with min_events=3).
HAND = {10: [(5, 1), (6, 2), (7, 3), (8, 4), (9, 5), (4, 6)], 11: [(1, 10), (2, 11), (3, 12)], 7: [(3, 1), (4, 2)],
        12: [(9, 7), (8, 8), (7, 9), (6, 10)]}


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hand") / "prepared")
    user = np.array([u for u, ev in HAND.items() for _ in ev])
    item = np.array([i for ev in HAND.values() for i, _ in ev])
    ts = np.array([t for ev in HAND.values() for _, t in ev])
    write_prepared(root, user_id=user, item_id=item, timestamp=ts, action=item % 4, surface=item % 2,
                   source="test", num_items=10)  # items already dense in [0, 10)
    return root


def hand_spec(root, **kw) -> DataSpec:
    return DataSpec(source="prepared", path=root, **kw)


def rows_of(batch, key="item_id"):
    jt = batch.features[key]
    return [t.tolist() for t in torch.split(jt.values(), jt.lengths().tolist())]


def items_by_request(root):
    t = pq.read_table(os.path.join(root, "events.parquet")).to_pydict()
    out = {}
    for r, i, ts in zip(t["request_id"], t["item_id"], t["timestamp"]):
        out.setdefault(r, []).append((i, ts))
    return out


def test_train_batch_contents(hand):
    spec = hand_spec(hand, max_len=3, batch_size=8, num_negatives_per_row=4)
    info = prepare_dataset(spec)
    loader = build_loader(spec, info, "train")
    batches = list(loader)
    assert len(loader) == len(batches) == 1
    b = batches[0]
    assert b.features.keys() == ["item_id", "action", "surface", "neg_item_id"]
    assert b.features.values().dtype == torch.int64
    ev = items_by_request(hand)
    got = dict(zip(b.request_ids.tolist(), rows_of(b)))
    expected = {r: [i for i, _ in e[:-2]][-3:] for r, e in ev.items() if len(e) >= 3}
    assert got == expected  # request 0 (user 7) dropped; histories e[:-2] truncated to last 3
    ts = dict(zip(b.request_ids.tolist(), torch.split(b.timestamps, b.features["item_id"].lengths().tolist())))
    assert {r: t.tolist() for r, t in ts.items()} == {r: [t for _, t in e[:-2]][-3:] for r, e in ev.items() if len(e) >= 3}
    assert rows_of(b, "action") == [[i % 4 for i in row] for row in rows_of(b)]
    assert b.max_len == 3 and b.target_item is None and b.weights is None
    neg = b.features["neg_item_id"]
    assert neg.lengths().tolist() == [4] * 3 and neg.values().min() >= 0 and neg.values().max() < 10


@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_batch_contents(hand, split):
    spec = hand_spec(hand, max_len=2, eval_batch_size=2)
    info = prepare_dataset(spec)
    batches = list(build_loader(spec, info, split))
    ev = items_by_request(hand)
    cut = -2 if split == "valid" else -1
    for b in batches:
        assert b.features.keys() == ["item_id", "action", "surface"]
        for r, row, tgt, tts in zip(b.request_ids.tolist(), rows_of(b), b.target_item.tolist(),
                                    b.target_timestamp.tolist()):
            e = ev[r]
            assert row == [i for i, _ in e[:cut]][-2:] and (tgt, tts) == e[cut]
    assert sorted(r for b in batches for r in b.request_ids.tolist()) == [1, 2, 3]
    assert all(b.weights.dtype == torch.float32 and (b.weights == 1).all() for b in batches)


def test_empty_eval_histories_dropped_and_logged(hand, caplog):
    spec = hand_spec(hand, min_events=1)
    info = prepare_dataset(spec)
    with caplog.at_level(logging.WARNING, logger="pinfm_rec.data.loader"):
        valid = list(build_loader(spec, info, "valid"))
    assert "dropped 1 requests with an empty history" in caplog.text
    assert sorted(valid[0].request_ids.tolist()) == [1, 2, 3]
    test = list(build_loader(spec, info, "test"))  # request 0 has 2 events: test history [3]
    assert sorted(test[0].request_ids.tolist()) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    spec = DataSpec(cache_dir=str(tmp_path_factory.mktemp("cache")), batch_size=16, eval_batch_size=24, max_len=50,
                    synthetic=SyntheticSpec(num_users=301, num_items=200, mean_len=30, seed=1))
    return spec, prepare_dataset(spec)


def flat(loader):
    return [b.request_ids.tolist() for b in loader]


def test_train_sharding_two_ranks(synth):
    spec, info = synth
    loaders = [build_loader(spec, info, "train", rank=r, world_size=2, seed=5) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 10  # 301 // 2 = 150 rows -> 9 full batches + 6
    per_rank = [flat(lo) for lo in loaders]
    assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[1]]
    ids = [set(r for b in rows for r in b) for rows in per_rank]
    assert len(ids[0]) == len(ids[1]) == 150 and not ids[0] & ids[1]


@pytest.mark.parametrize("world", [2, 3])
def test_eval_covers_every_request_once(synth, world):
    spec, info = synth
    loaders = [build_loader(spec, info, "test", rank=r, world_size=world) for r in range(world)]
    assert len({len(lo) for lo in loaders}) == 1
    real, pads = [], 0
    for lo in loaders:
        for b in lo:
            w = b.weights.numpy()
            real += b.request_ids.numpy()[w == 1].tolist()
            pads += int((w == 0).sum())
    assert sorted(real) == list(range(301))
    assert pads == (-301) % world


def test_deterministic_and_epoch_dependent(synth):
    spec, info = synth

    def stream(seed=0, epoch=0):
        lo = build_loader(spec, info, "train", seed=seed)
        lo.set_epoch(epoch)
        return [(b.request_ids.tolist(), b.features["neg_item_id"].values().tolist()) for b in lo]

    assert stream() == stream()
    assert stream() != stream(epoch=1) and stream() != stream(seed=1)
    assert sorted(r for ids, _ in stream(epoch=1) for r in ids) == list(range(301))


def batch_signature(b):
    return (b.request_ids.tolist(), b.features.values().tolist(), b.features.lengths().tolist(),
            b.timestamps.tolist())


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_mid_epoch(synth, num_workers):
    spec, info = synth
    spec = DataSpec(**{**spec.__dict__, "num_workers": num_workers})
    ref = build_loader(spec, info, "train", seed=3)
    ref.set_epoch(2)
    expected = [batch_signature(b) for b in ref]

    lo = build_loader(spec, info, "train", seed=3)
    lo.set_epoch(2)
    it = iter(lo)
    head = [batch_signature(next(it)) for _ in range(4)]
    state = lo.state_dict()
    assert state["epoch"] == 2
    resumed = build_loader(spec, info, "train", seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # same epoch: keeps the restored position
    tail = [batch_signature(b) for b in resumed]
    assert head + tail == expected
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(expected)  # next epoch runs in full


def test_set_epoch_other_than_restored_restarts(synth):
    spec, info = synth
    lo = build_loader(spec, info, "train")
    it = iter(lo)
    next(it)
    state = lo.state_dict()
    fresh = build_loader(spec, info, "train")
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    ref = build_loader(spec, info, "train")
    ref.set_epoch(1)
    assert flat(fresh) == flat(ref)


# ---------------------------------------------------------------- prepare cache / validation
def test_prepare_idempotent_and_keyed(tmp_path):
    spec = DataSpec(cache_dir=str(tmp_path), synthetic=SyntheticSpec(num_users=50, num_items=40, mean_len=10))
    a = prepare_dataset(spec)
    mtime = os.stat(os.path.join(a.root, "events.parquet")).st_mtime_ns
    b = prepare_dataset(DataSpec(**{**spec.__dict__, "batch_size": 7}))  # loader-only field: same dir
    assert a.root == b.root and os.stat(os.path.join(a.root, "events.parquet")).st_mtime_ns == mtime
    np.testing.assert_array_equal(a.item_counts, b.item_counts)
    c = prepare_dataset(DataSpec(**{**spec.__dict__, "min_events": 5}))
    assert c.root != a.root
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".tmp")]


def test_prepare_rename_race(tmp_path, monkeypatch):
    """Another rank finishes first: our rename fails, its dir is used, our temp dir is removed."""
    spec = DataSpec(cache_dir=str(tmp_path), synthetic=SyntheticSpec(num_users=30, num_items=20, mean_len=8))
    real_convert = prepare_mod._convert

    def convert_and_lose_race(s, out_dir, progress):
        meta = real_convert(s, out_dir, progress)
        monkeypatch.setattr(prepare_mod, "_convert", real_convert)
        prepare_dataset(s)  # the "other rank"
        return meta

    monkeypatch.setattr(prepare_mod, "_convert", convert_and_lose_race)
    info = prepare_dataset(spec)
    validate_prepared(info.root)
    assert os.listdir(tmp_path) == [os.path.basename(info.root)]


def test_validate_reports_file_and_row(hand, tmp_path):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(hand, bad)
    t = pq.read_table(os.path.join(bad, "events.parquet"))
    ts = t.column("timestamp").to_numpy().copy()
    ts[4] = 0  # request 1 (user 10, rows 2-7): its 3rd event becomes earlier than its 2nd
    pq.write_table(t.set_column(t.schema.get_field_index("timestamp"), "timestamp", pa.array(ts)),
                   os.path.join(bad, "events.parquet"))
    with pytest.raises(DataFormatError, match=r"events\.parquet row 4: not sorted"):
        prepare_dataset(hand_spec(bad))
    items = t.column("item_id").to_numpy().copy()
    items[3] = 10
    pq.write_table(t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(items)),
                   os.path.join(bad, "events.parquet"))
    with pytest.raises(DataFormatError, match=r"events\.parquet row 3: item_id=10 outside \[0, 10\)"):
        validate_prepared(bad)
