"""A synthetic stream with item churn and raw 64-bit ids (issue 18's new-item measurement).

``churn_stream`` takes the synthetic generator's events (``synthetic.generate_events``) and
 * gives every item a random raw id in [0, 2**62) (what a production catalogue hands over: no
   dense 0..N-1 ids);
 * introduces new items at ``t_new`` (a time quantile of the events): a fraction ``new_frac`` of the
   items is relaunched under a fresh raw id, every event of such an item at or after ``t_new``
   carries the new id, so the item's structure (topic, successors, popularity) is kept while the
   id was never seen before ``t_new``: "items first seen later".

The caller splits the stream by time (before ``t_new``: the pretraining period; then fine-tune or
continued-training intervals, e.g. one day each; then evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

from pinfm_rec.data.synthetic import generate_events

RAW_ID_SPACE = 2**62


@dataclass
class ChurnStream:
    """Events sorted by (user, time): columns [E] int64; ``is_new`` [E] bool: the event's item id
    was introduced at ``t_new``; ``old_raw`` / ``new_raw`` [num_items]: each generator item's raw ids
    (``new_raw`` -1 for items that are not relaunched)."""

    events: Dict[str, np.ndarray]
    is_new: np.ndarray
    old_raw: np.ndarray
    new_raw: np.ndarray
    t_new: int

    def time_quantile(self, q: float) -> int:
        return int(np.quantile(self.events["timestamp"], q))


def churn_stream(num_users: int = 1500, num_items: int = 1500, mean_len: int = 40, new_frac: float = 0.3,
                 new_at: float = 0.6, seed: int = 0) -> ChurnStream:
    """Synthetic events with raw ids; ``new_frac`` of the items relaunched under new raw ids at the
    ``new_at`` time quantile of all events."""
    ev = generate_events(num_users=num_users, num_items=num_items, mean_len=mean_len, seed=seed)
    rng = np.random.default_rng([seed, 0xC4A2])
    raw = rng.permutation(np.unique(rng.integers(0, RAW_ID_SPACE, size=3 * num_items, dtype=np.int64))[: 2 * num_items])
    old_raw, new_raw = raw[:num_items], raw[num_items:]
    relaunched = rng.random(num_items) < new_frac
    new_raw = np.where(relaunched, new_raw, -1)
    t_new = int(np.quantile(ev["timestamp"], new_at))
    item = ev["item_id"]
    is_new = relaunched[item] & (ev["timestamp"] >= t_new)
    events = {k: ev[k] for k in ("user_id", "action", "surface", "timestamp")}
    events["item_id"] = np.where(is_new, new_raw[item], old_raw[item])
    return ChurnStream(events, is_new, old_raw, new_raw, t_new)
