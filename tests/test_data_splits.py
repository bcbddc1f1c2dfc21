"""Leave-one-out splits on a hand-made example (exact histories and targets)."""
from __future__ import annotations

import numpy as np
import pytest

from pinfm_rec.data.splits import gather_index, leave_one_out, request_offsets, train_item_counts

# request 0: events 0..4 (5 events), request 1: 5..7 (3), request 2: 8..9 (2), request 3: 10 (1)
REQ = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
OFF = request_offsets(REQ)


def ranges(rows):
    return [list(range(s, e)) for s, e in zip(rows.start, rows.end)]


def test_offsets():
    np.testing.assert_array_equal(OFF, [0, 5, 8, 10, 11])


def test_leave_one_out_min3():
    tr = leave_one_out(OFF, "train", max_len=10, min_events=3)
    assert tr.request_id.tolist() == [0, 1] and tr.target is None
    assert ranges(tr) == [[0, 1, 2], [5]]
    va = leave_one_out(OFF, "valid", max_len=10, min_events=3)
    assert ranges(va) == [[0, 1, 2], [5]] and va.target.tolist() == [3, 6]
    te = leave_one_out(OFF, "test", max_len=10, min_events=3)
    assert ranges(te) == [[0, 1, 2, 3], [5, 6]] and te.target.tolist() == [4, 7]
    assert te.num_short_dropped == 2 and te.num_empty_dropped == 0


def test_truncation_keeps_last_max_len():
    te = leave_one_out(OFF, "test", max_len=2, min_events=3)
    assert ranges(te) == [[2, 3], [5, 6]] and te.target.tolist() == [4, 7]
    assert te.lengths.tolist() == [2, 2]


def test_empty_histories_are_dropped_and_counted():
    va = leave_one_out(OFF, "valid", max_len=10, min_events=1)
    # request 2 (2 events): valid history e[:0] empty; request 3 (1 event): no valid target
    assert va.request_id.tolist() == [0, 1] and va.num_empty_dropped == 2
    te = leave_one_out(OFF, "test", max_len=10, min_events=1)
    assert te.request_id.tolist() == [0, 1, 2] and ranges(te)[2] == [8] and te.target.tolist() == [4, 7, 9]
    assert te.num_empty_dropped == 1


def test_gather_and_item_counts():
    np.testing.assert_array_equal(gather_index(np.array([2, 7]), np.array([4, 8])), [2, 3, 7])
    items = np.array([0, 1, 2, 2, 1, 3, 3, 0, 1, 1, 2])
    counts = train_item_counts(items, OFF, num_items=4, max_len=2, min_events=3)
    # train rows: request 0 -> events [1, 2] (truncated), request 1 -> [5]
    np.testing.assert_array_equal(counts, [0, 1, 1, 1])


def test_bad_split():
    with pytest.raises(ValueError):
        leave_one_out(OFF, "dev", 10)


@pytest.mark.parametrize("max_len", [2, 3, 5, 200])
def test_train_windows_cover_every_target_once(max_len):
    rng = np.random.default_rng(max_len)
    lengths = rng.integers(3, 40, size=30)
    lengths[:3] = [3, 4, max_len + 2]  # 1- and 2-token train histories, one exactly one window
    offsets = np.r_[0, np.cumsum(lengths)]
    last = leave_one_out(offsets, "train", max_len, min_events=3)
    rows = leave_one_out(offsets, "train", max_len, min_events=3, train_windows=True)
    assert (rows.lengths >= 1).all() and (rows.lengths <= max_len).all()
    assert (np.diff(rows.request_id) >= 0).all()  # a request's rows adjacent, in request order
    for r in range(lengths.size):
        mine = np.flatnonzero(rows.request_id == r)
        assert (np.diff(rows.start[mine]) > 0).all()  # time order inside a request
        # the latest window is the default (last max_len) row
        assert rows.start[mine[-1]] == last.start[r] and rows.end[mine[-1]] == last.end[r]
        # next-token targets (every token but a window's first) = e[first+1 : stop-2], each once
        targets = np.concatenate([np.arange(s + 1, e) for s, e in zip(rows.start[mine], rows.end[mine])])
        np.testing.assert_array_equal(targets, np.arange(offsets[r] + 1, offsets[r + 1] - 2))
    # item counts follow the same rows
    items = rng.integers(0, 7, size=int(offsets[-1]))
    counts = train_item_counts(items, offsets, 7, max_len, 3, train_windows=True)
    assert counts.sum() == rows.lengths.sum()


def test_train_windows_need_two_events_per_window():
    with pytest.raises(ValueError, match="max_len >= 2"):
        leave_one_out(OFF, "train", max_len=1, min_events=3, train_windows=True)


@pytest.mark.parametrize("train_windows", [False, True])
def test_protocol_through_the_loader_on_a_sasrec_file(tmp_path, train_windows):
    """The SASRec/GR protocol on exact rows, as the loader emits them: train sees e[:-2] only (no
    valid/test target as input or target), valid = (e[:-2], e[-2]), test = (e[:-1], e[-1]) with the
    valid item last in the test history; histories cut to the last max_len events."""
    from pinfm_rec.data import DataSpec, build_loader, prepare_dataset

    seqs = {7: list(range(100, 112)), 3: [200, 201, 202, 203, 204], 9: [300, 301, 302]}  # unique items
    (tmp_path / "f.txt").write_text("".join(f"{u} {i}\n" for u, items in seqs.items() for i in items))
    spec = DataSpec(source="sasrec", path=str(tmp_path / "f.txt"), cache_dir=str(tmp_path / "c"), max_len=4,
                    batch_size=2, eval_batch_size=8, num_negatives_per_row=0, train_windows=train_windows)
    info = prepare_dataset(spec)
    items = sorted(i for s in seqs.values() for i in s)  # dense id = rank of the original id
    users = sorted(seqs)  # request id = rank of the user id
    orig = lambda v: [items[int(x)] for x in v]  # noqa: E731

    def rows(split):
        out = []
        for b in build_loader(spec, info, split):
            vals, lens = b.features["item_id"].values(), b.features["item_id"].lengths()
            hist = np.split(vals.numpy(), np.cumsum(lens.numpy())[:-1])
            w = b.weights if b.weights is not None else np.ones(len(hist))
            for j, h in enumerate(hist):
                if float(w[j]) > 0:
                    t = None if b.target_item is None else items[int(b.target_item[j])]
                    out.append((users[int(b.request_ids[j])], orig(h), t))
        return out

    train_tokens = {}
    for u, h, _ in rows("train"):
        train_tokens.setdefault(u, set()).update(h)
    for u, s in seqs.items():
        # windows cover all of e[:-2]; without them only the last max_len events of it
        want = set(s[:-2]) if train_windows else set(s[:-2][-4:])
        assert train_tokens[u] == want, (u, train_tokens[u])
        assert s[-1] not in train_tokens[u] and s[-2] not in train_tokens[u]
    valid = {u: (h, t) for u, h, t in rows("valid")}
    test = {u: (h, t) for u, h, t in rows("test")}
    for u, s in seqs.items():
        assert valid[u] == (s[:-2][-4:], s[-2])
        assert test[u] == (s[:-1][-4:], s[-1]) and test[u][0][-1] == s[-2]
