"""Dense input features of PinFM tokens: log-bucketed time gaps.

For token t of a row: gap to the previous event (ts[t] - ts[t-1]; the first event of a row gets
its own bucket) and gap to the time its prediction is made for: the next event (ts[t+1] - ts[t])
inside the row, and for the row's last token the request time (``request_ts``, e.g. the eval
batch's ``target_timestamp``) or, without one, an "unknown" bucket. This keeps training and
serving consistent: in training token t predicts event t+1, at serving the last token predicts
the request. (A gap to the row's last event instead would hand the last token, the one every
user embedding is read from, a bucket that never gets a training signal.)
Gaps in seconds are bucketed as floor(log2(1 + gap)), clamped to ``num_buckets - 1``
(2^31 s ~ 68 years).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from pinfm_rec.model.jagged import jagged_index

NUM_TIME_BUCKETS = 32


def bucket_bounds(num_buckets: int = NUM_TIME_BUCKETS, device=None) -> torch.Tensor:
    """[num_buckets - 1] int64 lower bounds 2^k - 1 (k = 1..num_buckets-1) of buckets 1.. of
    ``log_bucket``: floor(log2(1 + g)) >= k  <=>  g >= 2^k - 1."""
    return torch.tensor([(1 << k) - 1 for k in range(1, num_buckets)], dtype=torch.long, device=device)


def log_bucket(gap_s: torch.Tensor, num_buckets: int = NUM_TIME_BUCKETS,
               bounds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gap_s [L] int seconds (negative -> 0) -> bucket ids [L] long in [0, num_buckets):
    floor(log2(1 + gap)) clamped. bounds: ``bucket_bounds(num_buckets)`` on gap_s's device, which
    makes it one ``torch.bucketize`` (exact in integers; fewer ops than the float formula)."""
    if bounds is not None and not gap_s.dtype.is_floating_point:
        return torch.bucketize(gap_s, bounds, right=True)
    g = gap_s.clamp_min(0).double()
    return torch.floor(torch.log2(1.0 + g)).long().clamp(max=num_buckets - 1)


def time_gaps(
    timestamps: torch.Tensor, offsets: torch.Tensor, request_ts: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """timestamps [L] jagged by offsets [B+1], request_ts [B] or None ->
    (gap_prev [L], gap_next [L], is_first [L] bool, next_unknown [L] bool)."""
    gap_prev, gap_next, is_first, next_unknown = _gaps(timestamps, offsets, request_ts)
    gap_prev = torch.where(is_first, 0, gap_prev)
    if next_unknown is None:
        next_unknown = torch.zeros_like(is_first)
    else:
        gap_next = torch.where(next_unknown, 0, gap_next)
    return gap_prev, gap_next, is_first, next_unknown


def _gaps(
    timestamps: torch.Tensor, offsets: torch.Tensor, request_ts: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``time_gaps`` without its masking, in the fewest kernels (a serving request runs ~200):
    gap_prev [L] is undefined where is_first, gap_next [L] where next_unknown [L] (None: every
    token's next time is known, request_ts given)."""
    total = timestamps.numel()
    rows, pos = jagged_index(offsets, total)
    is_first = pos == 0
    # element i ends its row when i + 1 starts one (empty rows start nothing) or i is the last
    # element: is_first shifted by one, wrapping is_first[0] (always True) onto the last element
    is_last = torch.roll(is_first, -1)
    gap_prev = timestamps - torch.roll(timestamps, 1)
    nxt = torch.roll(timestamps, -1)
    if request_ts is not None:
        return gap_prev, torch.where(is_last, request_ts.to(timestamps.dtype)[rows], nxt) - timestamps, is_first, None
    return gap_prev, nxt - timestamps, is_first, is_last


class TimeFeatures(nn.Module):
    """Sum of two small embeddings of the log-bucketed gaps -> [L, dim]."""

    # called besides forward (candidate tokens): FSDP2 unshards the tables around it too
    fsdp_forward_methods = ("appended",)

    def __init__(self, dim: int, num_buckets: int = NUM_TIME_BUCKETS, init_scale: float = 0.1) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.prev = nn.Embedding(num_buckets + 1, dim)  # extra row: first event of the row
        self.next = nn.Embedding(num_buckets + 1, dim)  # extra row: prediction time unknown
        for e in (self.prev, self.next):
            nn.init.uniform_(e.weight, -init_scale, init_scale)
        self.register_buffer("bounds", bucket_bounds(num_buckets), persistent=False)  # log_bucket's

    def forward(
        self, timestamps: torch.Tensor, offsets: torch.Tensor, request_ts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """timestamps [L] jagged by offsets [B+1], request_ts [B] (optional) -> [L, dim]."""
        gap_prev, gap_next, is_first, unknown = _gaps(timestamps, offsets, request_ts)
        nb = self.num_buckets  # the special row
        # scalar branches of torch.where, no masking of the gaps first: no kernel more than needed
        b_prev = torch.where(is_first, nb, log_bucket(gap_prev, nb, self._bounds(gap_prev)))
        b_next = log_bucket(gap_next, nb, self._bounds(gap_next))
        if unknown is not None:
            b_next = torch.where(unknown, nb, b_next)
        return self.prev(b_prev) + self.next(b_next)

    def appended(self, gap_prev: torch.Tensor, is_first: torch.Tensor) -> torch.Tensor:
        """Time feature [N, dim] of tokens appended to their rows at request time (candidates):
        gap_prev [N] seconds from the row's last event (ignored where is_first [N], an empty row),
        the gap to the next event unknown."""
        nb = self.num_buckets
        b_prev = torch.where(is_first, nb, log_bucket(gap_prev, nb, self._bounds(gap_prev)))
        return self.prev(b_prev) + self.next.weight[nb]  # every token: the "unknown" row [dim]

    def _bounds(self, gap: torch.Tensor) -> Optional[torch.Tensor]:
        """The bucket bounds in gap's integer type (None: the float formula)."""
        b = getattr(self, "bounds", None)
        if b is None or b.device != gap.device or gap.dtype.is_floating_point:
            return None
        return b if b.dtype == gap.dtype else b.to(gap.dtype)
