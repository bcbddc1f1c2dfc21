"""Batch containers that travel from the loader to the model.

Shape notation (used everywhere in pinfm_rec): B batch rows (= requests), U unique requests,
C candidates, L tokens (jagged, = offsets[-1]), N max length, D model dim.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Feature keys of the history KJT, from the feature registry. "neg_item_id" shares the item
# table (sampled negatives).
from pinfm_rec.features import ACTION_KEY, ITEM_KEY, NEG_ITEM_KEY, SURFACE_KEY  # noqa: F401
from pinfm_rec.features import TOKEN_KEYS as SEQUENCE_KEYS  # noqa: F401


@dataclass
class SequenceBatch:
    """One batch of request-grouped user histories (one row per request).

    features: KJT with keys ``item_id, action, surface`` (each lengths [B], values [L] int64, in
        chronological order inside a row) and, for training batches, ``neg_item_id`` (lengths [B],
        values [B * k] uniformly sampled negative item ids, shared by the whole batch).
    timestamps: [L] int64 unix seconds, aligned with the values of ``item_id``.
    request_ids: [B] int64.
    max_len: N, the longest row of the batch (host int, so no device sync is needed).
    target_item: [B] int64 held-out next item (eval batches only; the history excludes it).
    target_timestamp: [B] int64 timestamp of the held-out item (eval batches only).
    weights: [B] float32, 1 for real rows and 0 for rows repeated only to give every rank the same
        number of rows (eval batches only; metrics must ignore weight-0 rows).
    """

    features: KeyedJaggedTensor
    timestamps: torch.Tensor
    request_ids: torch.Tensor
    max_len: int
    target_item: Optional[torch.Tensor] = None
    target_timestamp: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.request_ids.numel())

    def to(self, device: torch.device, non_blocking: bool = False) -> "SequenceBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (torch.Tensor, KeyedJaggedTensor)):
                v = v.to(device=device, non_blocking=non_blocking)
            out[f.name] = v
        return SequenceBatch(**out)

    def pin_memory(self) -> "SequenceBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (torch.Tensor, KeyedJaggedTensor)):
                v = v.pin_memory()
            out[f.name] = v
        return SequenceBatch(**out)
