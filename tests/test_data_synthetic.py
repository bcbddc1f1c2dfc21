"""Synthetic generator: determinism, distributional structure, learnability, speed."""
from __future__ import annotations

import time

import numpy as np
import pytest

from pinfm_rec.data import ACTION_ENGAGE, ACTION_HIDE, ACTION_SAVE, DataSpec, SyntheticSpec, prepare_dataset
from pinfm_rec.data.splits import gather_index, leave_one_out, request_offsets
from pinfm_rec.data.synthetic import SESSION_MEAN_LEN, generate_events


@pytest.fixture(scope="module")
def ev():
    return generate_events(num_users=2000, num_items=1000, mean_len=60, seed=0)


def test_deterministic_per_seed(ev):
    again = generate_events(num_users=2000, num_items=1000, mean_len=60, seed=0)
    other = generate_events(num_users=2000, num_items=1000, mean_len=60, seed=1)
    for k in ev:
        np.testing.assert_array_equal(ev[k], again[k])
    assert not np.array_equal(ev["item_id"][:1000], other["item_id"][:1000])


def test_shapes_ranges_order(ev):
    n = ev["item_id"].size
    assert 0.8 * 2000 * 60 < n < 1.2 * 2000 * 60
    assert ev["item_id"].min() >= 0 and ev["item_id"].max() < 1000
    assert set(np.unique(ev["action"])) == {0, 1, 2, 3} and set(np.unique(ev["surface"])) == {0, 1, 2, 3}
    assert (np.diff(ev["user_id"]) >= 0).all()
    same_user = np.diff(ev["user_id"]) == 0
    assert (np.diff(ev["timestamp"])[same_user] > 0).all()
    assert np.bincount(ev["user_id"]).min() >= 3


def test_zipf_head_share(ev):
    counts = np.sort(np.bincount(ev["item_id"], minlength=1000))[::-1]
    share = counts / counts.sum()
    ranks = np.arange(1, 1001) ** -1.1
    expected_top10 = ranks[:10].sum() / ranks.sum()  # ~0.48 for Zipf(1.1) over 1000 items
    assert abs(share[:10].sum() - expected_top10) < 0.08
    assert share[:100].sum() > 0.7  # top 10% of items hold most events
    assert (counts > 0).mean() > 0.9  # but the tail is still visited


def test_sessions(ev):
    same_user = np.diff(ev["user_id"]) == 0
    gaps = np.diff(ev["timestamp"])[same_user]
    long = gaps >= 1800
    # a new session every ~SESSION_MEAN_LEN events; within-session gaps are short
    assert abs(long.mean() - 1 / SESSION_MEAN_LEN) < 0.02
    assert np.median(gaps[~long]) < 60 and np.median(gaps[long]) > 6 * 3600


def test_actions_depend_on_topic(ev):
    """Engage/save concentrate on the user's preferred topics, hides on the others."""
    a, pref = ev["action"], ev["preferred"]
    assert 0.2 < pref.mean() < 0.95
    pos = (a == ACTION_ENGAGE) | (a == ACTION_SAVE)
    assert pos[pref].mean() > 3 * pos[~pref].mean()
    assert (a == ACTION_HIDE)[~pref].mean() > 3 * (a == ACTION_HIDE)[pref].mean()
    # preferred topics recur: a user's most frequent topic covers a large share of their events
    cluster = ev["item_cluster"][ev["item_id"]]
    top_share = [np.bincount(c).max() / c.size for c in np.split(cluster, np.flatnonzero(np.diff(ev["user_id"])) + 1)]
    assert np.mean(top_share) > 0.25  # uniform over 20 topics would be ~0.1


def test_next_item_is_learnable(ev):
    """A bigram model fit on the train split ranks the test target far above random and popularity."""
    off, items = request_offsets(ev["user_id"]), ev["item_id"]
    tr = leave_one_out(off, "train", 200, 3)
    idx = gather_index(tr.start, tr.end)
    same_row = np.diff(np.repeat(np.arange(len(tr)), tr.lengths)) == 0
    bigram = np.zeros((1000, 1000))
    np.add.at(bigram, (items[idx[:-1][same_row]], items[idx[1:][same_row]]), 1)
    pop = np.bincount(items[idx], minlength=1000)
    te = leave_one_out(off, "test", 200, 3)
    target = items[te.target]
    top = np.argsort(-(bigram[items[te.end - 1]] + 1e-3 * pop), axis=1)[:, :10]
    hr_bigram = (top == target[:, None]).any(1).mean()
    hr_pop = np.isin(target, np.argsort(-pop)[:10]).mean()
    assert hr_bigram > 0.6 and hr_bigram > hr_pop + 0.1, (hr_bigram, hr_pop)  # random: 0.01


def test_millions_of_events_in_seconds():
    t = time.perf_counter()
    big = generate_events(num_users=20000, num_items=50000, mean_len=60, seed=3)
    assert big["item_id"].size > 1_000_000
    assert time.perf_counter() - t < 10


def test_prepare_synthetic(tmp_path):
    spec = DataSpec(cache_dir=str(tmp_path), synthetic=SyntheticSpec(num_users=100, num_items=50, mean_len=20,
                                                                       num_surfaces=2, num_actions=2))
    info = prepare_dataset(spec)
    assert (info.num_users, info.num_items, info.num_surfaces, info.num_actions) == (100, 50, 2, 2)
    assert info.item_counts.shape == (50,) and info.item_counts.dtype == np.int64
