"""Histories-only pretraining corpus of a prepared ranking dir (no train-period labels).

    .venv/bin/python scripts/history_corpus.py <ranking dir>   # prints the new corpus dir

The corpus ``prepare-ranking`` writes (``<dir>/pretrain``) holds, per user with a train request,
the history of its latest train request followed by the CLICKED CANDIDATES of its train requests.
An encoder pretrained on it has learned the fine-tuning train labels: on MIND every train positive
is an item of that corpus (0% new) while 18% of train candidates are not, and the pretrained user
vector of a train user points at the news it clicked in those very impressions. Neither holds on
valid/test requests (50% / 91% of their positives are new items), so the ranker learns a shortcut
that does not transfer. This corpus keeps only the request histories of the same users and times
(everything observed before the requests; no label of any request): ``<dir>/pretrain_history``,
the same item/action/surface ids and vocabulary sizes as ``<dir>/pretrain``.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from pinfm_rec.data.ranking_store import PRETRAIN_DIR, SPLIT_IDS, load_ranking_store
from pinfm_rec.data.schema import write_prepared

OUT = "pretrain_history"


def history_events(tables, t_valid: int) -> dict:
    """Per user with a train request: the history of its latest train request, timestamps as stored
    (each < that request's time < t_valid). Columns user_id, item_id, action, surface, timestamp [E]."""
    train = np.flatnonzero((tables.split == SPLIT_IDS["train"]) & (tables.time < t_valid))
    latest = {}
    for r in train:  # time order: the last one wins
        latest[int(tables.user_id[r])] = int(r)
    cols = {k: [] for k in ("user_id", "item_id", "action", "surface", "timestamp")}
    for user, r in latest.items():
        s, e = tables.hist_offsets[r], tables.hist_offsets[r + 1]
        cols["user_id"].append(np.full(e - s, user, np.int64))
        cols["item_id"].append(tables.hist_item[s:e])
        cols["action"].append(tables.hist_action[s:e])
        cols["surface"].append(tables.hist_surface[s:e])
        cols["timestamp"].append(tables.hist_ts[s:e])
    return {k: np.concatenate(v).astype(np.int64) for k, v in cols.items()}


def main(root: str) -> str:
    out = os.path.join(root, OUT)
    if os.path.isfile(os.path.join(out, "meta.json")):  # written already (same input: same corpus)
        return out
    store = load_ranking_store(root)
    with open(os.path.join(root, PRETRAIN_DIR, "meta.json")) as f:
        full = json.load(f)
    ev = history_events(store.tables, store.meta.t_valid)
    assert ev["timestamp"].max() < store.meta.t_valid
    write_prepared(out, **ev, source=f"{store.meta.source}-pretrain-history", num_items=full["num_items"],
                   num_actions=full["num_actions"], num_surfaces=full["num_surfaces"],
                   provenance={"ranking_dir": root, "before_time": store.meta.t_valid,
                               "what": "request histories of train requests only (no clicked candidates)"})
    return out


if __name__ == "__main__":
    print(main(sys.argv[1]))
