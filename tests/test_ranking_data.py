"""Request-deduplicated ranking data: prepare (synthetic, MIND, MovieLens), loader, flatten, storage, leakage."""
from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pinfm_rec.data import DataSpec, build_loader, prepare_dataset
from pinfm_rec.data.convert_mind import convert_mind
from pinfm_rec.data.ranking import (
    RankingDataSpec,
    SyntheticRankingSpec,
    build_ranking_loader,
    flatten_batch,
    prepare_ranking,
    storage_report,
)
from pinfm_rec.data.ranking_movielens import convert_movielens_ranking
from pinfm_rec.data.ranking_store import CANDIDATES_FILE, REQUESTS_FILE, load_ranking_store
from pinfm_rec.data.schema import DataFormatError, read_event_columns, validate_prepared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("PINFM_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
MIND = os.path.join(DATA_DIR, "mind-small-train-subset", "behaviors.tsv")
ML100K = os.path.join(DATA_DIR, "ml-100k", "u.data")
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    spec = RankingDataSpec(cache_dir=str(tmp_path_factory.mktemp("rank")), max_len=16, batch_size=32,
                           eval_batch_size=16, synthetic=SyntheticRankingSpec(num_requests=300, num_items=200))
    return spec, prepare_ranking(spec)


def hist_rows(batch, key="item_id"):
    jt = batch.history.features[key]
    return [t.tolist() for t in torch.split(jt.values(), jt.lengths().tolist())]


def all_batches(loader):
    return list(iter(loader))


def same_batch(a, b) -> bool:
    return (torch.equal(a.history.features.values(), b.history.features.values())
            and torch.equal(a.history.features.lengths(), b.history.features.lengths())
            and torch.equal(a.history.request_ids, b.history.request_ids) and torch.equal(a.cand_item, b.cand_item)
            and torch.equal(a.cand_offsets, b.cand_offsets) and torch.equal(a.labels, b.labels))


def test_synthetic_prepare_and_cache(synth):
    spec, info = synth
    assert sum(info.num_requests.values()) == 300 and info.num_requests["valid"] == info.num_requests["test"] == 30
    assert info.num_items == 200 and info.num_dense == 3
    mtime = os.stat(os.path.join(info.root, REQUESTS_FILE)).st_mtime_ns
    assert prepare_ranking(spec).root == info.root  # cached: not rebuilt
    assert os.stat(os.path.join(info.root, REQUESTS_FILE)).st_mtime_ns == mtime
    assert not [d for d in os.listdir(spec.cache_dir) if d.startswith(".tmp")]


def test_batch_contents_match_storage(synth):
    spec, info = synth
    req = pq.read_table(os.path.join(info.root, REQUESTS_FILE)).to_pydict()
    cand = pq.read_table(os.path.join(info.root, CANDIDATES_FILE)).to_pydict()
    by_req = {}
    for i, r in enumerate(cand["request_id"]):
        by_req.setdefault(r, []).append(i)
    seen = 0
    for b in build_ranking_loader(spec, info, "valid"):
        u, c = b.num_requests, b.num_candidates
        assert b.cand_offsets.shape == (u + 1,) and b.dense.shape == (c, 3) and b.dense.dtype == torch.float32
        assert b.labels.shape == b.cand_new.shape == b.weights.shape == (c,) and b.cand_new.dtype == torch.bool
        assert b.history.features.keys() == ["item_id", "action", "surface"]
        assert b.history.timestamps.shape == (b.history.features["item_id"].values().numel(),)
        lengths = b.history.features["item_id"].lengths().tolist()
        ts_rows = [t.tolist() for t in torch.split(b.history.timestamps, lengths)]
        for k, (r, items, acts, ts) in enumerate(zip(b.history.request_ids.tolist(), hist_rows(b),
                                                    hist_rows(b, "action"), ts_rows)):
            assert req["split"][r] == 1 and b.history.target_timestamp[k] == req["time"][r]
            assert items == req["hist_item"][r][-spec.max_len:] and acts == req["hist_action"][r][-spec.max_len:]
            assert ts == req["hist_ts"][r][-spec.max_len:] and all(t <= req["time"][r] for t in ts)
            rows = by_req[r]
            sl = slice(int(b.cand_offsets[k]), int(b.cand_offsets[k + 1]))
            assert b.cand_item[sl].tolist() == [cand["item_id"][i] for i in rows]
            assert b.labels[sl].tolist() == [float(cand["label"][i]) for i in rows]
            assert b.cand_new[sl].tolist() == [cand["is_new"][i] for i in rows]
        seen += u
    assert seen == info.num_requests["valid"]


def test_determinism_and_resume(synth):
    spec, info = synth
    a = build_ranking_loader(spec, info, "train", seed=3)
    b = build_ranking_loader(spec, info, "train", seed=3)
    for ep in (0, 1):
        a.set_epoch(ep)
        b.set_epoch(ep)
        assert all(same_batch(x, y) for x, y in zip(all_batches(a), all_batches(b)))
    c = build_ranking_loader(spec, info, "train", seed=4)
    a.set_epoch(0)
    assert not same_batch(next(iter(a)), next(iter(c)))
    a.set_epoch(1)
    full = all_batches(a)
    assert len(full) == len(a) >= 4
    a.set_epoch(1)
    it = iter(a)
    for _ in range(2):
        next(it)
    state = a.state_dict()
    fresh = build_ranking_loader(spec, info, "train", seed=3)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    rest = all_batches(fresh)
    assert len(rest) == len(full) - 2 and all(same_batch(x, y) for x, y in zip(rest, full[2:]))


def test_two_rank_sharding(synth):
    spec, info = synth
    for split in ("valid", "test"):
        loaders = [build_ranking_loader(spec, info, split, rank=r, world_size=2) for r in (0, 1)]
        assert len(loaders[0]) == len(loaders[1])
        real = []
        for ld in loaders:
            for b in ld:
                w = b.history.weights
                real += b.history.request_ids[w > 0].tolist()
                assert torch.equal(b.weights, torch.repeat_interleave(w, b.cand_offsets.diff()))
                # the host-side max the DCAT crossing trusts (padding rows included)
                assert b.max_cands == int(b.cand_offsets.diff().max()) and b.max_cands > 0
        assert sorted(real) == sorted(set(real)) and len(real) == info.num_requests[split]
    train = [build_ranking_loader(spec, info, "train", rank=r, world_size=2, seed=1) for r in (0, 1)]
    ids = [torch.cat([b.history.request_ids for b in ld]).tolist() for ld in train]
    assert all(b.max_cands == int(b.cand_offsets.diff().max()) for b in train[0])
    assert len(ids[0]) == len(ids[1]) and not set(ids[0]) & set(ids[1])
    assert len(ids[0]) + len(ids[1]) >= info.num_requests["train"] - 1


def test_flatten_batch(synth):
    spec, info = synth
    b = next(iter(build_ranking_loader(spec, info, "valid")))
    f = flatten_batch(b)
    c = b.num_candidates
    assert f.num_requests == f.num_candidates == c and torch.equal(f.cand_offsets, torch.arange(c + 1))
    assert torch.equal(f.cand_item, b.cand_item) and torch.equal(f.labels, b.labels) and torch.equal(f.dense, b.dense)
    req_of = b.expand_index().tolist()
    for key in ("item_id", "action", "surface"):
        orig, flat = hist_rows(b, key), hist_rows(f, key)
        assert flat == [orig[r] for r in req_of]
    ts_o = torch.split(b.history.timestamps, b.history.features["item_id"].lengths().tolist())
    ts_f = torch.split(f.history.timestamps, f.history.features["item_id"].lengths().tolist())
    assert all(torch.equal(ts_f[i], ts_o[r]) for i, r in enumerate(req_of))
    assert torch.equal(f.history.request_ids, b.history.request_ids[req_of])
    assert torch.equal(f.history.target_timestamp, b.history.target_timestamp[req_of])
    assert torch.equal(flatten_batch(f).cand_item, f.cand_item)  # flat is a fixed point


def test_storage_ratio(synth, tmp_path):
    _, info = synth
    flat = str(tmp_path / "flat.parquet")
    rep = storage_report(info.root, flat_path=flat)
    assert rep["ratio"] > 1 and rep["user_columns"]["ratio"] > 1 and rep["uncompressed"]["ratio"] > 1
    assert pq.ParquetFile(flat).metadata.num_rows == rep["num_candidates"] == sum(info.num_candidates.values())


def _check_no_leakage(info):
    meta = validate_prepared(info.pretrain_dir)
    # same dense item-id space (candidate-only items included) and action/surface vocabularies
    assert (meta.num_items, meta.num_actions, meta.num_surfaces) == (info.num_items, info.num_actions,
                                                                     info.num_surfaces)
    ev = read_event_columns(info.pretrain_dir, ("item_id", "timestamp"))
    st = load_ranking_store(info.root)
    t = st.tables
    first_valid = int(t.time[t.split == 1].min())
    assert int(ev["timestamp"].max()) < first_valid == info.t_valid
    assert int(t.time[t.split == 0].max()) < info.t_valid <= info.t_test <= int(t.time[t.split == 2].min())
    counts = np.bincount(ev["item_id"], minlength=info.num_items)
    assert np.array_equal(st.is_new, counts[t.cand_item] == 0)
    assert int(t.cand_item.max()) < info.num_items
    cand_split = np.repeat(t.split, np.diff(t.cand_offsets))
    later = cand_split > 0  # valid/test requests see the whole corpus
    np.testing.assert_allclose(st.dense[later, 0], np.log1p(counts[t.cand_item[later]]), rtol=1e-6)
    return t


def test_no_leakage_synthetic(synth):
    _check_no_leakage(synth[1])


def test_pretrain_dir_is_a_prepared_dataset(synth):
    """`pinfm pretrain data.source=prepared data.path=<pretrain_dir>` reads it through the normal loader."""
    spec = DataSpec(source="prepared", path=synth[1].pretrain_dir, batch_size=8, max_len=16)
    info = prepare_dataset(spec)
    assert info.num_items == synth[1].num_items
    batch = next(iter(build_loader(spec, info, "train")))
    assert int(batch.features["item_id"].values().max()) < info.num_items


def _data(path):
    if not os.path.isfile(path):
        pytest.skip(f"{path} absent (set PINFM_DATA_DIR to the shared data dir)")
    return path


def test_mind_real(tmp_path):
    spec = RankingDataSpec(source="mind", path=_data(MIND), cache_dir=str(tmp_path))
    info = prepare_ranking(spec)
    assert sum(info.num_requests.values()) == 5000 and sum(info.num_candidates.values()) == 189_359
    t = _check_no_leakage(info)
    assert int((np.diff(t.hist_offsets) == 0).sum()) == 107 and t.label.mean() > 0
    assert 0 < info.new_item_fraction["test"] <= 1
    # dense ids agree with the pretraining dir's item_map: check the first line's impression list
    first = open(MIND, encoding="utf-8").readline().rstrip("\n").split("\t")
    orig = pq.read_table(os.path.join(info.pretrain_dir, "item_map.parquet")).column("original_id").to_numpy()
    when = int(dt.datetime.strptime(first[2], "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=dt.timezone.utc).timestamp())
    r = int(np.flatnonzero((t.user_id == int(first[1][1:])) & (t.time == when))[0])
    got = orig[t.cand_item[t.cand_offsets[r]:t.cand_offsets[r + 1]]].tolist()
    assert got == [int(x.split("-")[0][1:]) for x in first[4].split()]
    assert orig[t.hist_item[t.hist_offsets[r]:t.hist_offsets[r + 1]]].tolist() == [int(x[1:]) for x in first[3].split()]
    batches = list(build_ranking_loader(spec, info, "train"))
    assert sum(b.num_requests for b in batches) == info.num_requests["train"]


def test_movielens_100k_real(tmp_path):
    path = _data(ML100K)
    spec = RankingDataSpec(source="movielens", path=os.path.dirname(path), cache_dir=str(tmp_path))
    info = prepare_ranking(spec)
    t = _check_no_leakage(info)
    raw = np.loadtxt(path, dtype=np.int64)  # user item rating ts
    assert sum(info.num_requests.values()) == 943 * 4  # every ML-100K user has >= 20 ratings
    pre = validate_prepared(info.pretrain_dir)
    assert pre.num_events == int((raw[:, 3] < info.t_valid).sum())
    orig = pq.read_table(os.path.join(info.pretrain_dir, "item_map.parquet")).column("original_id").to_numpy()
    rating = {(u, i): (r, ts) for u, i, r, ts in raw.tolist()}
    for r in range(0, t.num_requests, 97):  # positives: rated >= 4 by the user at/after the request
        items = orig[t.cand_item[t.cand_offsets[r]:t.cand_offsets[r + 1]]]
        labels = t.label[t.cand_offsets[r]:t.cand_offsets[r + 1]]
        for it, lab in zip(items.tolist(), labels.tolist()):
            if lab:
                rt, ts = rating[(int(t.user_id[r]), it)]
                assert rt >= 4 and ts >= t.time[r]
        assert len(set(items.tolist())) == items.size
    assert t.hist_offsets[-1] > 0 and (np.diff(t.hist_offsets) >= 1).all()


MIND_OK = "1\tU1\t11/12/2019 2:14:46 PM\tN1 N2\tN3-0 N4-1\n"


@pytest.mark.parametrize("bad, line, what", [
    ("1\tU1\t11/12/2019 2:14:46 PM\tN1 N2\n", 2, "expected 5"),            # truncated line
    ("1\tU1\t2019-11-12 14:14:46\tN1\tN3-1\n", 2, "does not match format"),  # bad time
    ("1\tU1\t11/12/2019 2:14:46 PM\tNx\tN3-1\n", 2, "N<digits>"),          # bad news id
    ("1\tU1\t11/12/2019 2:14:46 PM\tN1\tN3-2\n", 2, "<0|1>"),              # bad label
])
def test_mind_bad_input(tmp_path, bad, line, what):
    p = tmp_path / "behaviors.tsv"
    p.write_text(MIND_OK + bad)
    with pytest.raises(DataFormatError, match=rf"behaviors\.tsv:{line}: .*{what}"):
        convert_mind(str(p), str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("bad, what", [("3\t4\tfive\t881250949\n", "not an integer"),
                                       ("3\t4\t5\n", "expected 4 fields")])
def test_movielens_bad_input(tmp_path, bad, what):
    p = tmp_path / "u.data"
    p.write_text("1\t2\t5\t881250949\n2\t3\t4\t881250950\n" + bad)
    with pytest.raises(DataFormatError, match=rf"u\.data:3: .*{what}"):
        convert_movielens_ranking(str(p), str(tmp_path / "out"), progress=False)
