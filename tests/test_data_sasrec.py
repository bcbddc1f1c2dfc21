"""Generic SASRec-format source (``data.source: sasrec``): whitespace, id forms, interleaved users,
malformed rows; the sparse variant."""
from __future__ import annotations

import numpy as np
import pytest

from pinfm_rec.data import DataSpec, prepare_dataset
from pinfm_rec.data.convert_sasrec import main as sasrec_main
from pinfm_rec.data.convert_sasrec import read_sasrec_file, sparsify
from pinfm_rec.data.schema import read_event_columns
from pinfm_rec.errors import DataError


def _prepare(tmp_path, text: str, **kw):
    src = tmp_path / "any-name.txt"
    src.write_text(text)
    return prepare_dataset(DataSpec(source="sasrec", path=str(src), cache_dir=str(tmp_path / "cache"), **kw)), src


def test_any_whitespace_any_ints_interleaved_users(tmp_path):
    # tabs / several spaces / trailing blanks; negative and sparse ids; user -7's lines interleave with 100's
    text = "-7 40\n100\t-3\n-7   5 \n100 40\n\n-7\t\t900\n100 5\n"
    info, _ = _prepare(tmp_path, text, min_events=3)
    assert (info.num_users, info.num_items, info.num_events) == (2, 4, 6)
    ev = read_event_columns(info.root)
    # users in increasing original id (-7 then 100); items -3,5,40,900 -> 0,1,2,3; file order per user
    np.testing.assert_array_equal(ev["request_id"], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ev["item_id"], [2, 1, 3, 0, 2, 1])
    np.testing.assert_array_equal(ev["timestamp"], [0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("text,line,frag", [
    ("1 2\n1 3\n1 2 3\n", 3, "expected 2 fields"),
    ("1 2\n1 3.5\n", 2, "not an integer"),
    ("1 2\nuser item\n", 2, "not an integer"),
    ("1 2\n1\n", 2, "expected 2 fields"),
])
def test_malformed_row_is_a_data_error_naming_file_and_line(tmp_path, text, line, frag):
    with pytest.raises(DataError) as ei:
        _prepare(tmp_path, text)
    msg = str(ei.value)
    assert f"any-name.txt:{line}:" in msg and frag in msg, msg


def test_ml1m_alias_reads_the_same_as_sasrec(tmp_path):
    src = tmp_path / "ml-1m.txt"
    src.write_text("1 5\n1 3\n1 5\n2 3\n2 9\n2 1\n")
    a = prepare_dataset(DataSpec(source="sasrec", path=str(src), cache_dir=str(tmp_path / "a")))
    b = prepare_dataset(DataSpec(source="ml-1m-sasrec", path=str(tmp_path), cache_dir=str(tmp_path / "b")))
    ea, eb = read_event_columns(a.root), read_event_columns(b.root)
    for k in ("request_id", "item_id", "timestamp", "action"):
        np.testing.assert_array_equal(ea[k], eb[k])


def test_sparsify_windows_are_contiguous_and_short():
    rng = np.random.default_rng(0)
    n_users = 400
    lengths = rng.integers(20, 300, n_users)
    user = np.repeat(np.arange(n_users) * 3 + 1, lengths)
    item = np.concatenate([np.arange(n) + 1000 * u for u, n in enumerate(lengths)])  # item = 1000*u + position
    u2, i2 = sparsify(user, item, mean_events=9, min_events=5, seed=1)
    _, counts = np.unique(u2, return_counts=True)
    assert counts.size == n_users and counts.min() >= 5
    assert 8.0 < counts.mean() < 10.0
    # each kept window is consecutive positions of the original history (chronology kept)
    same_user = u2[1:] == u2[:-1]
    assert (np.diff(i2)[same_user] == 1).all()
    assert (i2 // 1000 == (u2 - 1) // 3).all()


def test_sparsify_cli_writes_a_sasrec_file(tmp_path):
    src, dst = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("".join(f"{u} {i}\n" for u in range(1, 31) for i in range(1, 41)))
    sasrec_main(["sparsify", str(src), str(dst), "--mean-events", "7", "--min-events", "5"])
    user, item, _ = read_sasrec_file(str(dst), progress=False)
    assert np.unique(user).size == 30 and 5 <= np.bincount(user).max() <= 40
