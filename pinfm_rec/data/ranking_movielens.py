"""Ranking requests cut from per-user timelines: MovieLens ratings (ML-100K ``u.data``, ML-1M ``ratings.dat``)
and, through ``build_timeline_ranking``, the synthetic generator.

Per user (events sorted by time, ties in file order) ``requests_per_user`` cut positions c, evenly spaced
over [min_history, n - candidates_next] (duplicates merged). A request at cut c:

* time = timestamp of event c (the first "next" event); history = events [0, c) (all of them; the loader
  keeps the last max_len);
* candidates = the next ``candidates_next`` events' items, label = ``positive[e]`` (MovieLens: rating >= 4),
  keeping only events before the cutoff of the NEXT split (train: < t_valid, valid: < t_test), so no label
  of a train request comes from the valid/test period;
* plus ``negatives_per_request`` items (label 0) drawn without replacement from the items the user never
  rated (at any time) that had already appeared (first event time <= request time), seeded by
  (seed, request); candidates are shuffled within the request.

Splits by request time (``ranking_store.time_cutoffs``). The pretraining corpus is every event with
timestamp < t_valid (MovieLens: rating >= 4 -> ACTION_ENGAGE, else ACTION_VIEW; one request per user).
Item vocabulary = every item of the input, so items first rated in the valid/test period have rows.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import numpy as np
from tqdm.auto import tqdm

from .convert import locate_input, parse_int_table, read_input_bytes
from .ranking_store import RankingMeta, RankingTables, sort_by_time, split_of, time_cutoffs, write_ranking
from .schema import ACTION_ENGAGE, ACTION_VIEW, ENGAGE_MIN_RATING, DataFormatError
from .splits import gather_index

logger = logging.getLogger(__name__)

MOVIELENS_INPUTS = ["u.data", "ml-100k/u.data", "ratings.dat", "ml-1m/ratings.dat", "ml-100k.zip", "ml-1m.zip"]


def _cuts(n: int, requests_per_user: int, candidates_next: int, min_history: int) -> np.ndarray:
    """Cut positions [k] of a timeline of n events (empty when n <= min_history)."""
    if n <= min_history:
        return np.zeros(0, np.int64)
    hi = max(min_history, n - candidates_next)
    return np.unique(np.round(np.linspace(min_history, hi, max(1, requests_per_user))).astype(np.int64))


def build_timeline_ranking(
    out_dir: str,
    ev: Dict[str, np.ndarray],
    positive: np.ndarray,
    *,
    num_items: int,
    item_original: np.ndarray,
    source: str,
    valid_frac: float,
    test_frac: float,
    candidates_next: int,
    negatives_per_request: int,
    requests_per_user: int,
    min_history: int = 1,
    seed: int = 0,
    max_requests: Optional[int] = None,
    progress: bool = True,
    provenance: Optional[dict] = None,
    engagement: bool = False,
) -> RankingMeta:
    """Cut requests from timelines (module doc) and write the ranking dir. ``engagement`` counters are
    refused: a label here is a later event of the user, which counters keyed on the request time would
    hand to the user's next requests before it happens. ``ev``: columns user_id, item_id
    (dense < num_items), action, surface, timestamp, each [E], grouped by user and chronological inside a
    user; ``positive`` [E] bool labels. ``max_requests`` keeps the first requests in (user, cut) order."""
    if candidates_next < 1 or negatives_per_request < 0 or requests_per_user < 1 or min_history < 0:
        raise ValueError("need candidates_next >= 1, negatives_per_request >= 0, requests_per_user >= 1, "
                         "min_history >= 0")
    if engagement:
        raise ValueError(f"{source}: engagement counters need an impression log (labels observed at the "
                         f"request time); this source's labels are the user's next events")
    user, item, ts = ev["user_id"], ev["item_id"], ev["timestamp"]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    ends = np.r_[starts[1:], user.size]
    cut_pos = [s + _cuts(int(e - s), requests_per_user, candidates_next, min_history) for s, e in zip(starts, ends)]
    cut_user = np.repeat(np.arange(starts.size), [c.size for c in cut_pos])
    cut = np.concatenate(cut_pos).astype(np.int64) if cut_pos else np.zeros(0, np.int64)  # [R] event index
    if max_requests is not None:
        cut, cut_user = cut[:max_requests], cut_user[:max_requests]
    if cut.size == 0:
        raise DataFormatError(f"{source}: no user has more than {min_history} events; no request can be cut")
    req_time = ts[cut]
    t_valid, t_test = time_cutoffs(req_time, valid_frac, test_frac)
    big = np.iinfo(np.int64).max
    label_limit = np.array([t_valid, t_test, big])[split_of(req_time, t_valid, t_test)]  # [R]

    first_seen = np.full(num_items, big, np.int64)
    np.minimum.at(first_seen, item, ts)
    by_first = np.argsort(first_seen, kind="stable")  # items in order of appearance
    first_sorted = first_seen[by_first]
    rated = np.zeros(num_items, bool)
    cand_items, cand_labels, cand_counts = [], [], []
    current_user = -1
    for r in tqdm(range(cut.size), desc=f"{source} requests", disable=not progress, leave=False):
        u, c = int(cut_user[r]), int(cut[r])
        if u != current_user:
            rated[:] = False
            rated[item[starts[u]:ends[u]]] = True
            current_user = u
        nxt = np.arange(c, min(c + candidates_next, int(ends[u])))
        nxt = nxt[ts[nxt] < label_limit[r]]
        pool = by_first[: np.searchsorted(first_sorted, req_time[r], side="right")]
        pool = pool[~rated[pool]]
        rng = np.random.default_rng([seed, r])
        neg = rng.choice(pool, size=min(negatives_per_request, pool.size), replace=False) if pool.size else pool
        items = np.r_[item[nxt], neg].astype(np.int64)
        labels = np.r_[positive[nxt].astype(np.int8), np.zeros(neg.size, np.int8)]
        perm = rng.permutation(items.size)
        cand_items.append(items[perm])
        cand_labels.append(labels[perm])
        cand_counts.append(items.size)

    hist_start = starts[cut_user]
    hidx = gather_index(hist_start, cut)  # [H] event index of every history token
    user_out = np.asarray(ev.get("user_original", user), np.int64)
    tables = RankingTables(
        user_id=user_out[cut], time=req_time, hist_offsets=np.r_[0, np.cumsum(cut - hist_start)].astype(np.int64),
        hist_item=item[hidx], hist_action=ev["action"][hidx], hist_surface=ev["surface"][hidx], hist_ts=ts[hidx],
        cand_offsets=np.r_[0, np.cumsum(cand_counts)].astype(np.int64), cand_item=np.concatenate(cand_items),
        label=np.concatenate(cand_labels))
    tables = sort_by_time(tables, t_valid, t_test)
    before = ts < t_valid
    pretrain = {"user_id": user_out[before], "item_id": item[before], "action": ev["action"][before],
                "surface": ev["surface"][before], "timestamp": ts[before]}
    prov = {**(provenance or {}), "candidates_next": candidates_next, "negatives_per_request": negatives_per_request,
            "requests_per_user": requests_per_user, "min_history": min_history, "seed": seed,
            "label_rule": "next events before the next split's cutoff; sampled unrated items are 0"}
    return write_ranking(out_dir, tables, pretrain=pretrain, num_items=num_items, item_original=item_original,
                         t_valid=t_valid, t_test=t_test, source=source, provenance=prov, engagement=engagement)


def convert_movielens_ranking(path: str, out_dir: str, *, valid_frac: float = 0.1, test_frac: float = 0.1,
                              candidates_next: int = 5, negatives_per_request: int = 20, requests_per_user: int = 4,
                              min_history: int = 1, seed: int = 0, progress: bool = True,
                              engagement: bool = False) -> RankingMeta:
    """MovieLens ratings -> prepared ranking dir (module doc). ``path``: ``u.data`` (tab-separated), a
    ``ratings*.dat`` file (``::``-separated), a dir holding either, or the GroupLens zip."""
    src = locate_input(path, MOVIELENS_INPUTS)
    data, name = read_input_bytes(src, members=["ml-100k/u.data", "u.data", "ml-1m/ratings.dat", "ratings.dat"],
                                  progress=progress)
    first = data[: data.find(b"\n") if b"\n" in data else len(data)]
    sep = "::" if b"::" in first else "\t"
    cols = parse_int_table(data, name, sep, ("user", "item", "rating", "timestamp"), progress=progress)
    order = np.lexsort((cols["timestamp"], cols["user"]))  # stable: ties keep file order
    user_orig, item_raw = cols["user"][order], cols["item"][order]
    rating, ts = cols["rating"][order], cols["timestamp"][order]
    item_original, item = np.unique(item_raw, return_inverse=True)
    _, user = np.unique(user_orig, return_inverse=True)
    ev = {"user_id": user.astype(np.int64), "user_original": user_orig, "item_id": item.reshape(-1).astype(np.int64),
          "action": np.where(rating >= ENGAGE_MIN_RATING, ACTION_ENGAGE, ACTION_VIEW).astype(np.int64),
          "surface": np.zeros(ts.size, np.int64), "timestamp": ts}
    st = os.stat(src)
    return build_timeline_ranking(
        out_dir, ev, rating >= ENGAGE_MIN_RATING, num_items=int(item_original.size), item_original=item_original,
        source="movielens", valid_frac=valid_frac, test_frac=test_frac, candidates_next=candidates_next,
        negatives_per_request=negatives_per_request, requests_per_user=requests_per_user, min_history=min_history,
        seed=seed, progress=progress, engagement=engagement,
        provenance={"input": src, "input_bytes": int(st.st_size), "engage_rule": f"rating >= {ENGAGE_MIN_RATING}"})
