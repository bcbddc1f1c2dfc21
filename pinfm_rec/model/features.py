"""Dense input features of PinFM tokens: log-bucketed time gaps.

For token t of a row: gap to the previous event (ts[t] - ts[t-1]; the first event of a row gets
its own bucket) and gap to the row's (request's) last event (ts[last] - ts[t]). Gaps in seconds
are bucketed as floor(log2(1 + gap)), clamped to ``num_buckets - 1`` (2^31 s ~ 68 years).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from pinfm_rec.model.trunk import jagged_index

NUM_TIME_BUCKETS = 32


def log_bucket(gap_s: torch.Tensor, num_buckets: int = NUM_TIME_BUCKETS) -> torch.Tensor:
    """gap_s [L] int seconds (negative -> 0) -> bucket ids [L] long in [0, num_buckets)."""
    g = gap_s.clamp_min(0).double()
    return torch.floor(torch.log2(1.0 + g)).long().clamp(max=num_buckets - 1)


def time_gaps(timestamps: torch.Tensor, offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timestamps [L] jagged by offsets [B+1] -> (gap_prev [L], gap_last [L], is_first [L] bool)."""
    total = timestamps.numel()
    rows, pos = jagged_index(offsets, total, 0)
    is_first = pos == 0
    prev = torch.roll(timestamps, 1)
    gap_prev = torch.where(is_first, torch.zeros_like(timestamps), timestamps - prev)
    last = timestamps[(offsets[1:] - 1).clamp_min(0)]  # [B] (garbage for empty rows: unused)
    gap_last = last[rows] - timestamps
    return gap_prev, gap_last, is_first


class TimeFeatures(nn.Module):
    """Sum of two small embeddings of the log-bucketed gaps -> [L, dim]."""

    def __init__(self, dim: int, num_buckets: int = NUM_TIME_BUCKETS, init_scale: float = 0.1) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.prev = nn.Embedding(num_buckets + 1, dim)  # last row: "first event of the row"
        self.last = nn.Embedding(num_buckets, dim)
        for e in (self.prev, self.last):
            nn.init.uniform_(e.weight, -init_scale, init_scale)

    def forward(self, timestamps: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """timestamps [L] jagged by offsets [B+1] -> [L, dim]."""
        gap_prev, gap_last, is_first = time_gaps(timestamps, offsets)
        b_prev = torch.where(
            is_first,
            torch.full_like(gap_prev, self.num_buckets),
            log_bucket(gap_prev, self.num_buckets),
        )
        return self.prev(b_prev) + self.last(log_bucket(gap_last, self.num_buckets))
