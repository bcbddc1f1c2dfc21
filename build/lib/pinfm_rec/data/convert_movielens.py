"""MovieLens converters: SASRec ML-1M file, GroupLens ML-1M ``ratings.dat``, ML-100K ``u.data``.

All three write one request per user (request_id = user_id), surface 0 (MovieLens has one surface).

* ``ml-1m-sasrec``: the generic ``sasrec`` source (convert_sasrec.py) on SASRec's ``ml-1m.txt``:
  ``user item`` per line, 1-based dense ids, each user's items in chronological order (SASRec
  ``DataProcessing.py``: implicit feedback, items with < 5 ratings dropped); no ratings, no
  timestamps (every event ACTION_ENGAGE, ``timestamp`` = position within the user).
* ``ml-1m-raw``: GroupLens ``UserID::MovieID::Rating::Timestamp``; rating >= 4 -> ACTION_ENGAGE,
  else ACTION_VIEW; events sorted by timestamp per user, ties in file order (stable), which is the
  order SASRec used. Accepts ``ratings.dat``, a dir holding it, or GroupLens ``ml-1m.zip``.
  Note: no 5-rating item filter is applied (unlike SASRec), so item counts differ from the SASRec file.
* ``ml-100k``: ``u.data``, tab-separated ``user item rating timestamp``, not sorted; same rating
  rule and stable per-user time sort. Accepts ``u.data``, the ``ml-100k`` dir, or ``ml-100k.zip``.
"""
from __future__ import annotations

import os

import numpy as np

from .convert import locate_input, parse_int_table, read_input_bytes
from .convert_sasrec import convert_sasrec
from .schema import ACTION_ENGAGE, ACTION_VIEW, ENGAGE_MIN_RATING, DatasetMeta, write_prepared

ML1M_SASREC_FILES = ("ml-1m.txt", "sasrec/ml-1m.txt")  # names looked for when data.path is a dir


def _provenance(path: str) -> dict:
    st = os.stat(path)
    return {"input": path, "input_bytes": int(st.st_size)}


def convert_ml1m_sasrec(path: str, out_dir: str, *, min_events: int = 1, progress: bool = True) -> DatasetMeta:
    """SASRec ``ml-1m.txt`` (or a dir holding it) -> prepared dir: the generic SASRec-format
    converter (convert_sasrec.py) under the source name ``ml-1m-sasrec``.

    Full ML-1M: 6040 requests/users, 3416 items, 999611 events, all ACTION_ENGAGE.
    """
    return convert_sasrec(path, out_dir, min_events=min_events, progress=progress, source="ml-1m-sasrec",
                          candidates=ML1M_SASREC_FILES)


def _ratings_to_prepared(cols: dict, src: str, out_dir: str, source: str, min_events: int) -> DatasetMeta:
    rating = cols["rating"]
    action = np.where(rating >= ENGAGE_MIN_RATING, ACTION_ENGAGE, ACTION_VIEW).astype(np.int64)
    return write_prepared(out_dir, user_id=cols["user"], item_id=cols["item"], timestamp=cols["timestamp"],
                          action=action, source=source, min_events=min_events,
                          provenance={**_provenance(src), "engage_rule": f"rating >= {ENGAGE_MIN_RATING}"})


def convert_ml1m_raw(path: str, out_dir: str, *, min_events: int = 1, progress: bool = True) -> DatasetMeta:
    """GroupLens ML-1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) -> prepared dir.

    ``path``: the file (any name, e.g. a partial ``ratings_users0001-2999.dat``), a dir with
    ``ratings.dat``, or ``ml-1m.zip``.
    """
    src = locate_input(path, ["ratings.dat", "ml-1m/ratings.dat", "ml-1m.zip"])
    data, name = read_input_bytes(src, members=["ml-1m/ratings.dat", "ratings.dat"], progress=progress)
    cols = parse_int_table(data, name, "::", ("user", "item", "rating", "timestamp"), progress=progress)
    return _ratings_to_prepared(cols, src, out_dir, "ml-1m-raw", min_events)


def convert_ml100k(path: str, out_dir: str, *, min_events: int = 1, progress: bool = True) -> DatasetMeta:
    """GroupLens ML-100K ``u.data`` (tab-separated ``user item rating timestamp``) -> prepared dir.

    Full file: 943 users, 1682 items, 100000 events, 55375 of them ACTION_ENGAGE (rating >= 4).
    """
    src = locate_input(path, ["u.data", "ml-100k/u.data", "ml-100k.zip"])
    data, name = read_input_bytes(src, members=["ml-100k/u.data", "u.data"], progress=progress)
    cols = parse_int_table(data, name, "\t", ("user", "item", "rating", "timestamp"), progress=progress)
    return _ratings_to_prepared(cols, src, out_dir, "ml-100k", min_events)
