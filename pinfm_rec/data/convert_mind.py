"""MIND ``behaviors.tsv`` -> prepared ranking dir (one request per impression).

Input (tab-separated, no header): ``impression_id  user_id  time  history  impressions`` with user ids
``U<digits>``, time ``M/D/YYYY h:mm:ss AM/PM`` (read as UTC), history = space-separated news ids
``N<digits>`` oldest first (may be empty), impressions = space-separated ``N<digits>-<0|1>`` (label 1 =
clicked). Any malformed line raises ``DataFormatError`` naming the file and 1-based line.

Mapping:

* item ids: every news id of the file (histories and candidates) -> dense ids in increasing numeric order
  (original numeric part in ``pretrain/item_map.parquet``); user_id = numeric part of ``U<digits>``.
* request = impression, time = impression time; candidates = the impression list with click labels.
* MIND histories carry no per-click time: history event i of n gets the synthetic timestamp
  ``t_impression - (n - i)`` seconds (increasing, ending 1 s before the impression), action ENGAGE, surface 0.
  Time-gap features are therefore meaningless inside MIND histories.
* pretraining corpus (only train-period information: every event < t_valid): per user with a train
  impression, the history of its latest train impression (MIND histories are fixed per user) with
  timestamps ending 1 s before its FIRST train impression, followed by the clicked candidates of all its
  train impressions (ACTION_ENGAGE at the impression time).
"""
from __future__ import annotations

import datetime as dt
import os
from typing import Dict, List

import numpy as np
from tqdm.auto import tqdm

from .convert import _line_error, locate_input, read_input_bytes
from .ranking_store import RankingMeta, RankingTables, sort_by_time, time_cutoffs, write_ranking
from .schema import ACTION_ENGAGE, DataFormatError

MIND_INPUTS = ["behaviors.tsv", "train/behaviors.tsv", "MINDsmall_train/behaviors.tsv"]
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


def _id(tok: str, prefix: str) -> int:
    """Numeric part of ``<prefix><digits>``; ValueError otherwise."""
    if len(tok) < 2 or tok[0] != prefix or not tok[1:].isascii() or not tok[1:].isdigit():
        raise ValueError(f"{tok!r} is not an id of the form {prefix}<digits>")
    return int(tok[1:])


def parse_behaviors(data: bytes, name: str, progress: bool = True) -> Dict[str, object]:
    """Parse behaviors.tsv bytes. Returns user [R], time [R] (unix s), history (list of R int lists of news
    numbers), cand_news [C], label [C] int8, cand_counts [R]; raises DataFormatError ``name:line: ...``."""
    lines = data.split(b"\n")
    ends_nl = data.endswith(b"\n")
    if ends_nl:
        lines.pop()
    users: List[int] = []
    times: List[int] = []
    hists: List[List[int]] = []
    cands: List[int] = []
    labels: List[int] = []
    counts: List[int] = []
    for i, raw in enumerate(tqdm(lines, desc=f"parse {os.path.basename(name)}", disable=not progress, leave=False)):
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        last = i == len(lines) - 1
        fields = line.split(b"\t")
        if len(fields) != 5:
            raise _line_error(name, i + 1, f"expected 5 tab-separated fields (impression_id user_id time history "
                              f"impressions), got {len(fields)}", line, last, ends_nl)
        try:
            text = [f.decode("utf-8") for f in fields]
            int(text[0])
            user = _id(text[1], "U")
            t = dt.datetime.strptime(text[2].strip(), TIME_FORMAT).replace(tzinfo=dt.timezone.utc)
            hist = [_id(tok, "N") for tok in text[3].split()]
            imp = [tok.rsplit("-", 1) for tok in text[4].split()]
            if not imp:
                raise ValueError("empty impression list")
            for pair in imp:
                if len(pair) != 2 or pair[1] not in ("0", "1"):
                    raise ValueError(f"impression {'-'.join(pair)!r} is not <newsid>-<0|1>")
            cand = [_id(p[0], "N") for p in imp]
        except (ValueError, UnicodeDecodeError) as e:
            raise _line_error(name, i + 1, str(e), line, last, ends_nl) from None
        users.append(user)
        times.append(int(t.timestamp()))
        hists.append(hist)
        cands.extend(cand)
        labels.extend(int(p[1]) for p in imp)
        counts.append(len(cand))
    if not users:
        raise DataFormatError(f"{name}: no impressions (expected tab-separated MIND behaviors lines)")
    return {"user": np.array(users, np.int64), "time": np.array(times, np.int64), "history": hists,
            "cand_news": np.array(cands, np.int64), "label": np.array(labels, np.int8),
            "cand_counts": np.array(counts, np.int64)}


def _pretrain_events(tables: RankingTables, t_valid: int) -> Dict[str, np.ndarray]:
    """Pretraining events from train requests of time-sorted ``tables`` (see module doc)."""
    train = np.flatnonzero(tables.time < t_valid)
    per_user: Dict[int, List[int]] = {}
    for r in train:  # time order
        per_user.setdefault(int(tables.user_id[r]), []).append(int(r))
    cols: Dict[str, List[np.ndarray]] = {"user_id": [], "item_id": [], "timestamp": []}
    for user, reqs in per_user.items():
        latest = reqs[-1]
        hist = tables.hist_item[tables.hist_offsets[latest]:tables.hist_offsets[latest + 1]]
        t_first = int(tables.time[reqs[0]])
        items = [hist]
        times = [t_first - np.arange(hist.size, 0, -1, dtype=np.int64)]
        for r in reqs:
            cs, ce = tables.cand_offsets[r], tables.cand_offsets[r + 1]
            clicked = tables.cand_item[cs:ce][tables.label[cs:ce] == 1]
            items.append(clicked)
            times.append(np.full(clicked.size, tables.time[r], np.int64))
        it = np.concatenate(items)
        cols["item_id"].append(it)
        cols["timestamp"].append(np.concatenate(times))
        cols["user_id"].append(np.full(it.size, user, np.int64))
    out = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
    out["action"] = np.full(out["item_id"].size, ACTION_ENGAGE, np.int64)
    out["surface"] = np.zeros(out["item_id"].size, np.int64)
    return out


def convert_mind(path: str, out_dir: str, *, valid_frac: float = 0.1, test_frac: float = 0.1,
                 progress: bool = True, engagement: bool = False) -> RankingMeta:
    """MIND ``behaviors.tsv`` (or a dir holding it) -> prepared ranking dir (see module doc)."""
    src = locate_input(path, MIND_INPUTS)
    data, name = read_input_bytes(src, progress=progress)
    p = parse_behaviors(data, name, progress)
    hist_len = np.array([len(h) for h in p["history"]], np.int64)
    hist_news = np.fromiter((n for h in p["history"] for n in h), np.int64, count=int(hist_len.sum()))
    news, dense = np.unique(np.r_[hist_news, p["cand_news"]], return_inverse=True)
    dense = dense.reshape(-1).astype(np.int64)
    h = hist_news.size
    hist_offsets = np.r_[0, np.cumsum(hist_len)].astype(np.int64)
    pos = np.arange(h, dtype=np.int64) - np.repeat(hist_offsets[:-1], hist_len)  # index inside its history
    req_of_hist = np.repeat(np.arange(hist_len.size), hist_len)
    tables = RankingTables(
        user_id=p["user"], time=p["time"], hist_offsets=hist_offsets, hist_item=dense[:h],
        hist_action=np.full(h, ACTION_ENGAGE, np.int64), hist_surface=np.zeros(h, np.int64),
        hist_ts=p["time"][req_of_hist] - (hist_len[req_of_hist] - pos),
        cand_offsets=np.r_[0, np.cumsum(p["cand_counts"])].astype(np.int64), cand_item=dense[h:], label=p["label"])
    t_valid, t_test = time_cutoffs(tables.time, valid_frac, test_frac)
    tables = sort_by_time(tables, t_valid, t_test)
    pretrain = _pretrain_events(tables, t_valid)
    st = os.stat(src)
    return write_ranking(out_dir, tables, pretrain=pretrain, num_items=int(news.size), item_original=news,
                         t_valid=t_valid, t_test=t_test, source="mind", engagement=engagement,
                         provenance={"input": src, "input_bytes": int(st.st_size), "time_zone": "UTC (assumed)",
                                     "history_timestamps": "synthetic: t_impression - (n - i) seconds"})
