"""Synthetic ranking data: requests cut from ``synthetic.generate_events`` timelines.

Users' timelines come from the pretraining generator (topics, successors, sessions, actions; see
``synthetic.py``), so the pretraining corpus and the ranking requests share their structure. Requests
are cut as for MovieLens (``ranking_movielens.build_timeline_ranking``): the next ``candidates_next``
events are candidates with label 1 when their action is ENGAGE or SAVE (0 for VIEW / HIDE), plus
``negatives_per_request`` sampled unseen items (label 0). Enough users are generated for
``num_requests`` requests and exactly the first ``num_requests`` (in user, cut order) are kept.
Item ids are the generator's (``num_items`` rows, never-occurring items included). With
``raw_id_offset`` > 0 each dense item k also gets a sparse 64-bit source id
``raw_id_offset + k * RAW_ID_STRIDE`` (``raw_item_ids``), stored in the pretraining corpus's
``item_map.parquet`` (``original_id``) as a real catalogue's ids would be; ``data.raw_ids=true`` makes
the loader emit them instead of the dense ids.
"""
from __future__ import annotations

import math

import numpy as np

from .ranking_movielens import build_timeline_ranking
from .ranking_store import RankingMeta
from .schema import ACTION_ENGAGE, ACTION_SAVE
from .synthetic import generate_events

RAW_ID_STRIDE = 7919  # a prime: raw ids spread over a range far wider than the catalogue


def raw_item_ids(num_items: int, raw_id_offset: int = 0) -> np.ndarray:
    """[num_items] int64 source id of each dense item: ``raw_id_offset + k * RAW_ID_STRIDE`` (offset > 0)
    or the dense id itself (offset 0)."""
    k = np.arange(num_items, dtype=np.int64)
    if raw_id_offset <= 0:
        return k
    if raw_id_offset + (num_items - 1) * RAW_ID_STRIDE >= 2**63:
        raise ValueError(f"raw_id_offset {raw_id_offset} + {num_items} items * {RAW_ID_STRIDE} overflows int64")
    return np.int64(raw_id_offset) + k * RAW_ID_STRIDE


def write_synthetic_ranking(out_dir: str, *, num_requests: int = 2000, num_items: int = 1000, mean_len: int = 40,
                            requests_per_user: int = 4, candidates_next: int = 5, negatives_per_request: int = 15,
                            num_surfaces: int = 4, seed: int = 0, raw_id_offset: int = 0,
                            valid_frac: float = 0.1, test_frac: float = 0.1,
                            progress: bool = True, engagement: bool = False) -> RankingMeta:
    """Generate timelines and write a prepared ranking dir with exactly ``num_requests`` requests."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    num_users = math.ceil(1.25 * num_requests / requests_per_user) + 1  # short timelines give fewer cuts
    ev = generate_events(num_users=num_users, num_items=num_items, mean_len=mean_len, num_surfaces=num_surfaces,
                         seed=seed)
    positive = (ev["action"] == ACTION_ENGAGE) | (ev["action"] == ACTION_SAVE)
    cols = {k: ev[k] for k in ("user_id", "item_id", "action", "surface", "timestamp")}
    return build_timeline_ranking(
        out_dir, cols, positive, num_items=num_items, item_original=raw_item_ids(num_items, raw_id_offset),
        source="synthetic", valid_frac=valid_frac, test_frac=test_frac, candidates_next=candidates_next,
        negatives_per_request=negatives_per_request, requests_per_user=requests_per_user, seed=seed,
        max_requests=num_requests, progress=progress, engagement=engagement,
        provenance={"generator": "pinfm_rec.data.synthetic", "num_users": num_users, "mean_len": mean_len})
