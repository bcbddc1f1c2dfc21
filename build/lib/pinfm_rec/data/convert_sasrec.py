"""Generic SASRec-format source (``data.source: sasrec``) and a sparse variant for testing.

A SASRec-format file has one ``user item`` pair per line, the two integers separated by spaces or
tabs, each user's lines in chronological order (users may interleave: like SASRec's
``util.data_partition``, lines are appended to their user's list in file order). Ids are any
integers (sparse, 0- or 1-based, negative): users and items are remapped to dense ids in increasing
original-id order (the prepared dir's user/item maps keep the originals, shifted to >= 0 when negative). The file has no ratings or timestamps: every event is ACTION_ENGAGE and
``timestamp`` is the event's position within its user (0, 1, 2, ...), so time-gap features carry
nothing for this source. ``ml-1m-sasrec`` is this converter on the SASRec repo's ``ml-1m.txt``.

A malformed line (wrong field count, a non-integer field) raises ``DataFormatError`` (a
``DataError``) as ``<file>:<line>: <problem>: <line text>``.

``sparsify`` (``python -m pinfm_rec.data.convert_sasrec sparsify IN OUT``) subsamples a file's user
histories to short contiguous windows (default mean 9 events, at least 5: the shape of the Amazon
sets SASRec/eSASRec report on), to check recipes on sparse data.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Tuple

import numpy as np

from .convert import locate_input, parse_int_table, read_input_bytes
from .schema import DatasetMeta, write_prepared

_RUNS = re.compile(rb"[ \t]+")
_EDGES = re.compile(rb"(?m)^ | (?=\r?$)")


def read_sasrec_file(path: str, candidates=(), progress: bool = True) -> Tuple[np.ndarray, np.ndarray, str]:
    """(user [E], item [E], resolved path) of a SASRec-format file, in file order."""
    src = locate_input(path, list(candidates))
    data, name = read_input_bytes(src, progress=progress)
    data = _EDGES.sub(b"", _RUNS.sub(b" ", data))  # any spaces/tabs -> one space; line numbers kept
    cols = parse_int_table(data, name, " ", ("user", "item"), nonneg=(), progress=progress)
    return cols["user"], cols["item"], src


def positions_in_user(user: np.ndarray) -> np.ndarray:
    """[E] int64: the index of each event among its user's events, in file order."""
    order = np.argsort(user, kind="stable")
    su = user[order]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
    lengths = np.diff(np.r_[starts, su.size])
    pos = np.empty(user.size, dtype=np.int64)
    pos[order] = np.arange(su.size, dtype=np.int64) - np.repeat(starts, lengths)
    return pos


def convert_sasrec(path: str, out_dir: str, *, min_events: int = 1, progress: bool = True,
                   source: str = "sasrec", candidates=()) -> DatasetMeta:
    """SASRec-format file (or a dir holding one of ``candidates``) -> prepared dir (module doc)."""
    user, item, src = read_sasrec_file(path, candidates, progress)
    # write_prepared remaps ids dense (keeping increasing-id order) and records the originals in its
    # user/item maps, but wants them >= 0: negative ids are shifted (order kept), the shift recorded
    shift = {n: int(-min(0, int(c.min()))) for n, c in (("user", user), ("item", item))}
    st = os.stat(src)
    return write_prepared(out_dir, user_id=user + shift["user"], item_id=item + shift["item"],
                          timestamp=positions_in_user(user), source=source, min_events=min_events,
                          provenance={"input": src, "input_bytes": int(st.st_size), "id_shift": shift,
                                      "note": "timestamp = position within user"})

def sparsify(user: np.ndarray, item: np.ndarray, *, mean_events: float = 9.0, min_events: int = 5,
             seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Keep one contiguous window of each user's history (chronology kept): its length is
    ``min_events`` + a geometric count with mean ``mean_events - min_events`` (the long-tailed
    lengths of review data), capped at the user's length; its start is uniform. Users grouped in
    the output, in increasing id order. Returns (user [E'], item [E'])."""
    if mean_events < min_events:
        raise ValueError(f"mean_events ({mean_events}) < min_events ({min_events})")
    rng = np.random.default_rng(seed)
    order = np.argsort(user, kind="stable")  # [E] grouped by user, file order within a user
    su = user[order]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
    n = np.diff(np.r_[starts, su.size])  # [U]
    extra = rng.geometric(1.0 / (mean_events - min_events + 1), size=n.size) - 1
    k = np.minimum(n, min_events + extra)  # [U]
    first = starts + (rng.random(n.size) * (n - k + 1)).astype(np.int64)
    idx = np.repeat(first - np.r_[0, np.cumsum(k)[:-1]], k) + np.arange(int(k.sum()))
    return su[idx], item[order][idx]


def write_sasrec_file(path: str, user: np.ndarray, item: np.ndarray) -> None:
    """Write ``user item`` lines."""
    with open(path, "w") as f:
        f.write("".join(f"{u} {i}\n" for u, i in zip(user.tolist(), item.tolist())))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pinfm_rec.data.convert_sasrec",
                                 description="Write a sparse variant of a SASRec-format file (module doc).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("sparsify", help="subsample each user's history to a short contiguous window",
                        description="example: python -m pinfm_rec.data.convert_sasrec sparsify "
                                    "ml-1m.txt ml-1m-sparse9.txt --mean-events 9")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.add_argument("--mean-events", type=float, default=9.0)
    sp.add_argument("--min-events", type=int, default=5)
    sp.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    user, item, _ = read_sasrec_file(a.src, progress=False)
    u, i = sparsify(user, item, mean_events=a.mean_events, min_events=a.min_events, seed=a.seed)
    write_sasrec_file(a.dst, u, i)
    print(f"{a.dst}: {np.unique(u).size} users, {np.unique(i).size} items, {u.size} events "
          f"({u.size / max(1, np.unique(u).size):.2f} per user)")


if __name__ == "__main__":
    main()
