"""data.engagement_counters: real-time impression / click counters of each candidate's item over strictly
earlier requests, against a brute-force loop; spec -> cache key -> dense features -> loader."""
import numpy as np
import pytest

from pinfm_rec.data.ranking import RankingDataSpec, SyntheticRankingSpec, build_ranking_loader, prepare_ranking
from pinfm_rec.data.ranking_store import (CTR_PRIOR_WEIGHT, DENSE_FEATURES, ENGAGEMENT_FEATURES, engagement_counters,
                                          load_ranking_store)


def _loop(item, time, label, split):
    train = split == 0
    p0 = label[train].mean()
    out = []
    for c in range(item.size):
        earlier = (item == item[c]) & (time < time[c])  # strictly earlier requests; same time excluded
        imps, clicks = earlier.sum(), (earlier & (label > 0)).sum()
        out.append((np.log1p(imps), np.log1p(clicks), (clicks + CTR_PRIOR_WEIGHT * p0) / (imps + CTR_PRIOR_WEIGHT)))
    return np.array(out, np.float32)


def test_counters_match_a_loop_and_never_see_their_own_or_later_labels():
    rng = np.random.default_rng(0)
    c = 400
    item = rng.integers(0, 12, c)
    time = np.sort(rng.integers(0, 60, c))  # ties: rows of one request share a time
    label = (rng.random(c) < 0.3).astype(np.int8)
    split = np.where(time < 40, 0, np.where(time < 50, 1, 2)).astype(np.int8)
    got = engagement_counters(item, time, label, split, 12)
    assert got.shape == (c, len(ENGAGEMENT_FEATURES)) and got.dtype == np.float32
    np.testing.assert_allclose(got, _loop(item, time, label, split), rtol=1e-6)
    # flipping the labels of the latest requests changes no earlier request's counters
    late = time >= 55
    flipped = engagement_counters(item, time, np.where(late, 1 - label, label), split, 12)
    np.testing.assert_array_equal(flipped[time <= 55], got[time <= 55])
    assert not np.array_equal(flipped[time > 55], got[time > 55])  # (the test can fail: later rows see them)
    # a first impression has no history: 0, 0 and the train click rate
    first = np.array([np.flatnonzero(item == i)[0] for i in np.unique(item)])
    np.testing.assert_allclose(got[first, :2], 0)
    np.testing.assert_allclose(got[first, 2], label[split == 0].mean(), rtol=1e-6)


def _mind_file(path, n=60, seed=0):
    """A small MIND-format behaviors.tsv: n impressions over two days, 8 news ids, random clicks."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        h, m = divmod(i * 47, 60)
        day = 9 + h // 24
        hist = " ".join(f"N{x}" for x in rng.integers(0, 8, rng.integers(0, 4)))
        imps = " ".join(f"N{x}-{int(rng.random() < 0.3)}" for x in rng.choice(8, 4, replace=False))
        lines.append(f"{i + 1}\tU{i % 9}\t11/{day}/2019 {h % 12 + 1}:{m:02d}:00 {'AM' if h % 24 < 12 else 'PM'}"
                     f"\t{hist}\t{imps}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("on", [False, True])
def test_spec_flag_adds_three_dense_features_under_its_own_cache_key(tmp_path, on):
    path = _mind_file(tmp_path / "behaviors.tsv")

    def spec(flag):
        return RankingDataSpec(source="mind", path=path, cache_dir=str(tmp_path / "cache"), max_len=16,
                               batch_size=16, eval_batch_size=16, engagement_counters=flag)
    info = prepare_ranking(spec(on))
    want = DENSE_FEATURES + (ENGAGEMENT_FEATURES if on else ())
    assert info.dense_features == want and info.num_dense == len(want)
    st = load_ranking_store(info.root)
    assert st.dense.shape[1] == len(want)
    other = prepare_ranking(spec(not on))
    assert other.root != info.root  # never one cache for both
    if on:
        t = st.tables
        req = np.repeat(np.arange(t.num_requests), np.diff(t.cand_offsets))
        np.testing.assert_allclose(st.dense[:, 3:], _loop(t.cand_item, t.time[req], t.label, t.split[req]), rtol=1e-5)
        assert st.dense[:, 4].max() > 0  # some earlier clicks were counted
        # the base features are the same as without the flag
        np.testing.assert_array_equal(st.dense[:, :3], load_ranking_store(other.root).dense)
    batch = next(iter(build_ranking_loader(spec(on), info, "train")))
    assert batch.dense.shape[1] == len(want)


def test_timeline_sources_refuse_the_counters(tmp_path):
    """A timeline source's labels are the user's next events: counted at the request time they would reach
    the same user's later requests before they happen. The spec and the writer refuse the flag."""
    from pinfm_rec.spec import FieldError

    for source in ("synthetic", "movielens"):
        with pytest.raises(FieldError, match="engagement_counters"):
            RankingDataSpec(source=source, path="x", engagement_counters=True)
    from pinfm_rec.data.ranking_synthetic import write_synthetic_ranking

    with pytest.raises(ValueError, match="impression log"):
        write_synthetic_ranking(str(tmp_path / "r"), num_requests=50, num_items=40, engagement=True, progress=False)
