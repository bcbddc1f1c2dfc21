"""Converters: tiny hand-made files, bad-input errors (file + line in the message), real MovieLens files."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pinfm_rec.data import (
    ACTION_ENGAGE,
    ACTION_VIEW,
    ColumnMapping,
    DataFormatError,
    DataSpec,
    convert_event_log,
    convert_ml1m_raw,
    convert_ml1m_sasrec,
    convert_ml100k,
    prepare_dataset,
    resolve_data_path,
    validate_prepared,
)
from pinfm_rec.data.schema import read_event_columns

REPO = Path(__file__).resolve().parents[1]


def shared_data(rel: str) -> str:
    """Path of a file under the shared data dir ($PINFM_DATA_DIR or <repo>/../shared/data), else skip."""
    bases = [os.environ.get("PINFM_DATA_DIR"), str(REPO.parent / "shared" / "data")]
    for base in bases:
        if base and os.path.exists(os.path.join(base, rel)):
            return os.path.join(base, rel)
    pytest.skip(f"{rel} not found under $PINFM_DATA_DIR or {REPO.parent / 'shared' / 'data'}")


def events(root) -> dict:
    return read_event_columns(str(root))


def write(tmp_path, name, text) -> str:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(p)


# ---------------------------------------------------------------- tiny files, happy paths
def test_sasrec_tiny(tmp_path):
    src = write(tmp_path, "ml-1m.txt", "1 5\n1 3\n1 5\n2 3\n2 9\n2 1\n")
    meta = convert_ml1m_sasrec(src, str(tmp_path / "out"), progress=False)
    assert (meta.num_requests, meta.num_items, meta.num_events) == (2, 4, 6)
    ev = events(tmp_path / "out")
    # items 1,3,5,9 -> 0,1,2,3 ; order inside a user is the file order, timestamps = positions.
    np.testing.assert_array_equal(ev["item_id"], [2, 1, 2, 1, 3, 0])
    np.testing.assert_array_equal(ev["timestamp"], [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(ev["request_id"], [0, 0, 0, 1, 1, 1])
    assert (ev["action"] == ACTION_ENGAGE).all() and (ev["surface"] == 0).all()
    validate_prepared(str(tmp_path / "out"))


def test_ml1m_raw_tiny_stable_time_sort_and_rating_rule(tmp_path):
    src = write(tmp_path, "ratings.dat", "1::10::5::300\n1::20::3::100\n1::30::4::300\n2::10::1::50\n2::30::2::40\n")
    convert_ml1m_raw(src, str(tmp_path / "out"), progress=False)
    ev = events(tmp_path / "out")
    # user 1 sorted by time, tie (300) kept in file order: 20, 10, 30
    np.testing.assert_array_equal(ev["item_id"], [1, 0, 2, 2, 0])
    np.testing.assert_array_equal(ev["timestamp"], [100, 300, 300, 40, 50])
    np.testing.assert_array_equal(ev["action"], [ACTION_VIEW, ACTION_ENGAGE, ACTION_ENGAGE, ACTION_VIEW, ACTION_VIEW])


def test_ml1m_raw_from_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::10::5::3\n1::20::3::1\n")
    meta = convert_ml1m_raw(str(tmp_path / "ml-1m.zip"), str(tmp_path / "out"), progress=False)
    assert meta.num_events == 2


def test_ml100k_tiny_unsorted(tmp_path):
    src = write(tmp_path, "u.data", "2\t7\t4\t20\n1\t7\t3\t30\n2\t8\t5\t10\n1\t9\t4\t10\n")
    meta = convert_ml100k(str(tmp_path), str(tmp_path / "out"), progress=False)  # dir -> u.data
    assert src.endswith("u.data") and (meta.num_users, meta.num_items) == (2, 3)
    ev = events(tmp_path / "out")
    np.testing.assert_array_equal(ev["request_id"], [0, 0, 1, 1])
    np.testing.assert_array_equal(ev["item_id"], [2, 0, 1, 0])
    np.testing.assert_array_equal(ev["action"], [1, 0, 1, 1])


def test_generic_csv_and_parquet(tmp_path):
    src = write(tmp_path, "log.csv", "uid,pin,ts,act,extra\n7,100,5,2,x\n7,200,1,3,y\n9,100,2,0,z\n")
    mapping = ColumnMapping(user_id="uid", item_id="pin", timestamp="ts", action="act")
    convert_event_log(src, str(tmp_path / "csv"), mapping=mapping, fmt="csv", source="csv")
    ev = events(tmp_path / "csv")
    np.testing.assert_array_equal(ev["item_id"], [1, 0, 0])
    np.testing.assert_array_equal(ev["action"], [3, 2, 0])
    assert (ev["surface"] == 0).all()

    pq.write_table(pa.table({"user": [5, 5, 6], "item": [1, 2, 1], "time": [3.7, 1.2, 0.0]}), tmp_path / "log.parquet")
    mapping = ColumnMapping(user_id="user", item_id="item", timestamp="time")
    convert_event_log(str(tmp_path / "log.parquet"), str(tmp_path / "pq"), mapping=mapping, fmt="parquet",
                      source="parquet")
    ev = events(tmp_path / "pq")
    np.testing.assert_array_equal(ev["timestamp"], [1, 3, 0])
    assert (ev["action"] == ACTION_ENGAGE).all()  # missing action -> engage


def test_resolve_against_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PINFM_DATA_DIR", str(tmp_path))
    assert resolve_data_path("ml-100k/u.data") == str(tmp_path / "ml-100k" / "u.data")
    assert resolve_data_path("/abs/x") == "/abs/x"


# ---------------------------------------------------------------- bad input
BAD_CASES = [
    # (name, content, converter, expected line, message fragment)
    ("truncated", "1::10::5::300\n1::20::3::100\n1::30::", convert_ml1m_raw, 3, "truncated"),
    ("non_numeric", "1::10::5::300\n1::abc::3::100\n", convert_ml1m_raw, 2, "not an integer"),
    ("negative", "1\t10\t5\t300\n-3\t20\t3\t100\n", convert_ml100k, 2, "negative user"),
    ("field_count", "1 2\n1 2 3\n", convert_ml1m_sasrec, 2, "expected 2 fields"),
    ("text_sasrec", "1 2\n1 3\n2 x4\n", convert_ml1m_sasrec, 3, "not an integer"),
]


@pytest.mark.parametrize("name,content,conv,line,frag", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_file_and_line(tmp_path, name, content, conv, line, frag):
    src = write(tmp_path, f"{name}.dat", content)
    with pytest.raises(DataFormatError) as ei:
        conv(src, str(tmp_path / "out"), progress=False)
    msg = str(ei.value)
    assert f"{src}:{line}:" in msg and frag in msg, msg
    assert not (tmp_path / "out").exists()


def test_empty_file(tmp_path):
    src = write(tmp_path, "empty.dat", "\n")
    with pytest.raises(DataFormatError, match=r"empty\.dat: empty file"):
        convert_ml1m_raw(src, str(tmp_path / "out"), progress=False)
    src = write(tmp_path, "empty.csv", "")
    with pytest.raises(DataFormatError, match=r"empty\.csv: empty file"):
        convert_event_log(src, str(tmp_path / "o2"), mapping=ColumnMapping(), fmt="csv", source="csv")


@pytest.mark.parametrize("body,line,frag", [
    ("user_id,item_id,timestamp\n1,2,3\n1,x,4\n", 3, "item_id (item_id) is not numeric"),
    ("user_id,item_id,timestamp\n1,2,3\n1,-2,4\n", 3, "negative item_id"),
    ("user_id,item_id,timestamp\n1,2,3\n1,2\n", 3, "expected 3 fields"),
])
def test_bad_csv(tmp_path, body, line, frag):
    src = write(tmp_path, "log.csv", body)
    with pytest.raises(DataFormatError) as ei:
        convert_event_log(src, str(tmp_path / "out"), mapping=ColumnMapping(), fmt="csv", source="csv")
    assert f"{src}:{line}:" in str(ei.value) and frag in str(ei.value), str(ei.value)


def test_csv_missing_column(tmp_path):
    src = write(tmp_path, "log.csv", "a,b\n1,2\n")
    with pytest.raises(DataFormatError, match=r"log\.csv:1: header has no column 'user_id'"):
        convert_event_log(src, str(tmp_path / "out"), mapping=ColumnMapping(), fmt="csv", source="csv")


def test_parquet_negative_row(tmp_path):
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [3, -1], "timestamp": [0, 0]}), tmp_path / "e.parquet")
    with pytest.raises(DataFormatError, match=r"e\.parquet row 1: negative item_id"):
        convert_event_log(str(tmp_path / "e.parquet"), str(tmp_path / "out"), mapping=ColumnMapping(), fmt="parquet",
                          source="parquet")


# ---------------------------------------------------------------- real files
def test_real_ml1m_sasrec(tmp_path):
    src = shared_data("ml-1m/sasrec/ml-1m.txt")
    meta = convert_ml1m_sasrec(src, str(tmp_path / "out"), progress=False)
    assert (meta.num_users, meta.num_requests, meta.num_items, meta.num_events) == (6040, 6040, 3416, 999611)
    validate_prepared(str(tmp_path / "out"))


def test_real_ml100k(tmp_path):
    src = shared_data("ml-100k/u.data")
    info = prepare_dataset(DataSpec(source="ml-100k", path=src, cache_dir=str(tmp_path), min_events=3))
    assert (info.num_users, info.num_items, info.num_events) == (943, 1682, 100000)
    ev = events(info.root)
    assert int((ev["action"] == ACTION_ENGAGE).sum()) == 55375
    assert (np.diff(ev["timestamp"])[np.diff(ev["request_id"]) == 0] >= 0).all()


def test_real_ml1m_raw_partial_matches_sasrec_order(tmp_path):
    """users 1-2999 of the raw ratings, time-sorted, give SASRec's sequences (after its 5-rating item filter)."""
    raw = shared_data("ml-1m/raw/ratings_users0001-2999.dat")
    sas_items = np.loadtxt(shared_data("ml-1m/sasrec/sas_to_original_items.txt"), dtype=np.int64)
    sas_users = np.loadtxt(shared_data("ml-1m/sasrec/sas_to_original_users.txt"), dtype=np.int64)
    meta = convert_ml1m_raw(raw, str(tmp_path / "raw"), progress=False)
    assert (meta.num_users, meta.num_events) == (2999, 487650)
    convert_ml1m_sasrec(shared_data("ml-1m/sasrec/ml-1m.txt"), str(tmp_path / "sas"), progress=False)

    def original_sequences(root):
        ev = events(root)
        items = pq.read_table(os.path.join(root, "item_map.parquet")).column("original_id").to_numpy()[ev["item_id"]]
        users = pq.read_table(os.path.join(root, "user_map.parquet")).column("original_id").to_numpy()
        bounds = np.flatnonzero(np.diff(ev["request_id"])) + 1
        return dict(zip(users.tolist(), np.split(items, bounds)))

    raw_seq = original_sequences(str(tmp_path / "raw"))
    sas_seq = original_sequences(str(tmp_path / "sas"))  # SASRec 1-based ids
    item_map = np.zeros(sas_items[:, 0].max() + 1, np.int64)
    item_map[sas_items[:, 0]] = sas_items[:, 1]
    user_map = dict(sas_users.tolist())
    kept = set(sas_items[:, 1].tolist())
    compared = 0
    for sas_user, seq in sas_seq.items():
        orig_user = user_map[sas_user]
        if orig_user in raw_seq:
            expected = [i for i in raw_seq[orig_user].tolist() if i in kept]
            assert item_map[seq].tolist() == expected, orig_user
            compared += 1
    assert compared == 2999


def test_directory_with_both_formats_reads_the_requested_one(tmp_path):
    d = tmp_path / "both"
    d.mkdir()
    (d / "events.csv").write_text("user_id,item_id,timestamp\n1,2,0\n1,3,1\n")
    pq.write_table(pa.table({"user_id": [7, 7, 7], "item_id": [4, 5, 6], "timestamp": [0, 1, 2]}),
                   d / "events.parquet")
    meta = convert_event_log(str(d), str(tmp_path / "out_pq"), mapping=ColumnMapping(), fmt="parquet",
                             source="parquet")
    assert meta.num_events == 3
    meta = convert_event_log(str(d), str(tmp_path / "out_csv"), mapping=ColumnMapping(), fmt="csv", source="csv")
    assert meta.num_events == 2
