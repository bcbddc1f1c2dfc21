"""Request-deduplicated ranking batches (fine-tuning / serving).

One history per request, stored and shipped once; its candidates are rows jagged by request.
Expansion to one row per candidate (the "flat" layout a ranker may need) happens on the device
(``expand_index``), never in storage or in the loader.

Shapes: U unique requests in the batch, C candidates (= cand_offsets[-1]), L history tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.batch import SequenceBatch


@dataclass
class RankingBatch:
    """Candidates of U requests, each request's history once.

    history: SequenceBatch with U rows (keys item_id/action/surface, timestamps [L], request_ids [U],
        max_len N; target_timestamp [U] = the request's time, so time features measure gaps to it).
    cand_item: [C] int64 candidate item ids, request r's at cand_offsets[r]:cand_offsets[r+1].
    cand_offsets: [U+1] int64.
    labels: [C] float32 in {0, 1}.
    dense: [C, F] float32 per-candidate dense features (F may be 0).
    cand_new: [C] bool, True where the candidate item never occurs in the pretraining data.
    weights: [C] float32, 0 for padding rows added to equalise ranks (metrics ignore them).
    """

    history: SequenceBatch
    cand_item: torch.Tensor
    cand_offsets: torch.Tensor
    labels: torch.Tensor
    dense: torch.Tensor
    cand_new: torch.Tensor
    weights: Optional[torch.Tensor] = None

    @property
    def num_requests(self) -> int:
        return int(self.cand_offsets.numel() - 1)

    @property
    def num_candidates(self) -> int:
        return int(self.cand_item.numel())

    # what the shared step loop (train/loop.py) reads: examples = candidates, tokens = history
    @property
    def batch_size(self) -> int:
        return self.num_candidates

    @property
    def timestamps(self) -> torch.Tensor:
        return self.history.timestamps

    @property
    def request_ids(self) -> torch.Tensor:
        return self.history.request_ids

    def expand_index(self) -> torch.Tensor:
        """[C] int64: the request (row of ``history``) of each candidate (= inverse_indices)."""
        lengths = self.cand_offsets[1:] - self.cand_offsets[:-1]  # [U]
        return torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=self.num_candidates
        )

    def _map(self, fn) -> "RankingBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (torch.Tensor, KeyedJaggedTensor, SequenceBatch)):
                v = fn(v)
            out[f.name] = v
        return RankingBatch(**out)

    def to(self, device: torch.device, non_blocking: bool = False) -> "RankingBatch":
        return self._map(lambda v: v.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "RankingBatch":
        return self._map(lambda v: v.pin_memory())
