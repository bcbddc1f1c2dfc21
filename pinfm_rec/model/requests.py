"""What the encoder reads of a batch of U requests, from a ``RankingBatch`` or from plain
KeyedJaggedTensors (a TorchRec user's own data path).

From KJTs (``requests_from_kjt``):
    history     KJT of U rows. Keys are mapped from the feature registry's names by
                ``feature_names`` (e.g. ``{"item_id": "hist_items", "timestamp": "hist_ts"}``;
                unmapped names are used as is). ``item_id`` is required; ``action``, ``surface``
                and ``timestamp`` (event times, int seconds, aligned with the items) are optional.
    candidates  KJT of U rows with one key (or the key ``feature_names["candidate"]``): the
                candidate item ids of each request, jagged by request (TorchRec's
                request -> candidate layout; ``expand_index`` = inverse indices [C]).
    request_ts  [U] request times (optional: without them the last token's "time to the next
                event" and the candidates' gap are unknown).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.host_sizes import HostSizes
from pinfm_rec.data.ranking_batch import RankingBatch
from pinfm_rec.errors import EncoderError
from pinfm_rec.features import ITEM_KEY, TOKEN_KEYS
from pinfm_rec.model.jagged import jagged_index

TIME_KEY = "timestamp"  # the history's event times, when they travel inside the history KJT
CANDIDATE_KEY = "candidate"


@dataclass
class Requests:
    """features: history KJT (registry keys, U rows); timestamps [L] or None; request_ts [U] or
    None; cand_item [C]; cand_offsets [U+1]; max_len N (host int); max_cands (host int or None);
    cand_cold [C] bool or None (``RankingBatch.cand_cold``: zero these candidates' item embeddings)."""

    features: KeyedJaggedTensor
    timestamps: Optional[torch.Tensor]
    request_ts: Optional[torch.Tensor]
    cand_item: torch.Tensor
    cand_offsets: torch.Tensor
    max_len: int
    max_cands: Optional[int] = None
    host: Optional[HostSizes] = None  # host-side sizes (data/host_sizes.py), None from KJTs
    cand_cold: Optional[torch.Tensor] = None

    @property
    def num_requests(self) -> int:
        return self.cand_offsets.numel() - 1

    def expand_index(self) -> torch.Tensor:
        """[C]: the request of each candidate (inverse indices); built once per Requests (the
        encoder asks for it several times per forward)."""
        rows = self.__dict__.get("_expand_index")
        if rows is None:
            rows = self.__dict__["_expand_index"] = jagged_index(self.cand_offsets, self.cand_item.numel())[0]
        return rows


def requests_from_batch(batch: RankingBatch) -> Requests:
    h = batch.history
    return Requests(h.features, h.timestamps, h.target_timestamp, batch.cand_item, batch.cand_offsets,
                    h.max_len, batch.max_cands, batch.host, batch.cand_cold)


def requests_from_kjt(
    history: KeyedJaggedTensor,
    candidates: KeyedJaggedTensor,
    request_ts: Optional[torch.Tensor] = None,
    feature_names: Optional[Mapping[str, str]] = None,
) -> Requests:
    """The encoder's view of U requests given as KJTs (module doc). One host sync (N)."""
    names = dict(feature_names or {})
    keys = list(history.keys())
    item_key = names.get(ITEM_KEY, ITEM_KEY)
    if item_key not in keys:
        raise EncoderError(f"history: no key {item_key!r} (the items; feature_names[{ITEM_KEY!r}]); it has {keys}")
    jts = history.to_dict()
    feats = {k: jts[names.get(k, k)] for k in TOKEN_KEYS if names.get(k, k) in jts}
    features = KeyedJaggedTensor.from_jt_dict(feats)
    time_key = names.get(TIME_KEY, TIME_KEY)
    timestamps = jts[time_key].values() if time_key in jts else None
    if timestamps is not None and timestamps.numel() != jts[item_key].values().numel():
        raise EncoderError(f"history: key {time_key!r} has {timestamps.numel()} timestamps for "
                           f"{jts[item_key].values().numel()} items; give one per history event")
    ckeys = list(candidates.keys())
    cand_key = names.get(CANDIDATE_KEY, ckeys[0] if len(ckeys) == 1 else CANDIDATE_KEY)
    if cand_key not in ckeys:
        raise EncoderError(f"candidates: no key {cand_key!r} (feature_names[{CANDIDATE_KEY!r}]); it has {ckeys}")
    if candidates.stride() != history.stride():
        raise EncoderError(f"candidates has {candidates.stride()} rows, history {history.stride()}: both need "
                           f"one row per request")
    if request_ts is not None and request_ts.numel() != history.stride():
        raise EncoderError(f"request_ts has {request_ts.numel()} entries for {history.stride()} requests")
    cand = candidates[cand_key]
    lengths = jts[item_key].lengths()
    max_len = int(lengths.max()) if lengths.numel() else 0
    return Requests(features, timestamps, request_ts, cand.values(), cand.offsets(), max_len)
