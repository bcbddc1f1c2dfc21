"""Leave-one-out splits (SASRec protocol) as index ranges over a request-sorted event array.

For a request with events e[0..n-1] (chronological):

    train  history e[:-2]                       (next-item targets are inside the history)
    valid  history e[:-2], target e[-2]
    test   history e[:-1], target e[-1]

Histories keep their last ``max_len`` (N) events. With ``train_windows`` the train split instead
covers a long history e[:-2] with windows of at most N events: the last N events, then windows
ending one event after the start of the next (later) one (stride N - 1, one event of overlap: that
event is the earlier window's last target and the later window's first input), so every next-token
target of e[:-2] is trained exactly once (the default keeps only the last window: SASRec drops the rest). The rows of a
request stay adjacent, in time order. Nothing is copied: a split is, per row, a
half-open event range [start, end) plus the target event index, all int64 positions into the
event columns. Requests with fewer than ``min_events`` events are left out of every split. Rows
whose history would be empty (n <= 2 for train/valid, n == 1 for test; only possible when
``min_events`` < 3) are dropped and counted in ``SplitRows.num_empty_dropped``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitRows:
    """Rows of one split. R rows, in increasing request order.

    request_id: [R] int64 dense request ids.
    start, end: [R] int64 event range of the (truncated) history; end - start in [1, N].
    target: [R] int64 event index of the held-out item (valid/test), None for train.
    """

    split: str
    request_id: np.ndarray
    start: np.ndarray
    end: np.ndarray
    target: Optional[np.ndarray]
    num_empty_dropped: int = 0
    num_short_dropped: int = 0

    def __len__(self) -> int:
        return int(self.request_id.size)

    @property
    def lengths(self) -> np.ndarray:
        """[R] history lengths."""
        return self.end - self.start


def request_offsets(request_id: np.ndarray, num_requests: Optional[int] = None) -> np.ndarray:
    """[U + 1] event offsets of each request from sorted ``request_id`` [E] (dense ids)."""
    counts = np.bincount(request_id, minlength=num_requests or 0)
    return np.r_[0, np.cumsum(counts)].astype(np.int64)


def leave_one_out(offsets: np.ndarray, split: str, max_len: int, min_events: int = 1,
                  train_windows: bool = False) -> SplitRows:
    """Rows of ``split`` (train | valid | test) from request ``offsets`` [U + 1]; see module doc."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    first, stop = offsets[:-1], offsets[1:]
    n = stop - first
    ok = n >= max(1, min_events)
    short = int((~ok & (n > 0)).sum())
    if split == "test":
        end, target = stop - 1, stop - 1
    else:
        end, target = stop - 2, stop - 2
    nonempty = end > first
    empty = int((ok & ~nonempty).sum())
    keep = np.flatnonzero(ok & nonempty)
    end = end[keep]
    start = np.maximum(first[keep], end - max_len)
    if train_windows and split == "train":
        if max_len < 2:
            raise ValueError(f"train_windows needs max_len >= 2 (a window of 1 event has no target), got {max_len}")
        return _train_windows(keep, first[keep], end, max_len, empty, short)
    return SplitRows(split=split, request_id=keep.astype(np.int64), start=start.astype(np.int64),
                     end=end.astype(np.int64), target=None if split == "train" else target[keep].astype(np.int64),
                     num_empty_dropped=empty, num_short_dropped=short)


def _train_windows(req: np.ndarray, first: np.ndarray, end: np.ndarray, max_len: int,
                   empty: int, short: int) -> SplitRows:
    """Train rows covering [first, end) of each request with windows of <= max_len events."""
    n = end - first  # >= 1
    stride = max(max_len - 1, 1)
    k = np.maximum(1, -(-(n - 1) // stride))  # windows per request
    rid = np.repeat(np.arange(req.size), k)
    j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)  # 0 = latest window
    j = np.repeat(k, k) - 1 - j  # time order inside a request: earliest window first
    w_end = end[rid] - j * stride
    w_start = np.maximum(first[rid], w_end - max_len)
    return SplitRows(split="train", request_id=req[rid].astype(np.int64), start=w_start.astype(np.int64),
                     end=w_end.astype(np.int64), target=None, num_empty_dropped=empty, num_short_dropped=short)


def gather_index(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """[L] event indices of the concatenated ranges [start[b], end[b]) (L = sum of lengths)."""
    lengths = end - start
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    row_first = np.cumsum(lengths) - lengths  # position of each row's first token in the output
    return np.arange(total, dtype=np.int64) + np.repeat(start - row_first, lengths)


def train_item_counts(item_id: np.ndarray, offsets: np.ndarray, num_items: int, max_len: int,
                      min_events: int = 1, train_windows: bool = False) -> np.ndarray:
    """[num_items] int64 occurrences of each item in the train rows exactly as the loader emits
    them (histories e[:-2], truncated to the last ``max_len`` events, or all windows with
    ``train_windows``): the empirical item
    distribution seen by training, used for logQ correction of sampled softmax."""
    rows = leave_one_out(offsets, "train", max_len, min_events, train_windows)
    return np.bincount(item_id[gather_index(rows.start, rows.end)], minlength=num_items).astype(np.int64)
