"""Jagged-tensor helpers shared by the trunk, features, losses, encoder and rankers.

A jagged tensor travels as ``(values [L, *S], offsets [B+1])``: row b holds
``values[offsets[b]:offsets[b+1]]``. Nothing here syncs with the device unless it says so.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional, Tuple

import torch

_scope = threading.local()  # .cache: {id(offsets): (offsets, total, rows, pos)} inside shared_index()


@contextlib.contextmanager
def shared_index() -> Iterator[None]:
    """Inside it, ``jagged_index`` of the same offsets tensor (same object, same total) is built
    once and shared (a forward asks for the same candidate/token indices several times). The cache
    lives for the ``with`` block only (so a CUDA graph captured inside records the index ops) and
    is off under torch.compile / export."""
    outer = getattr(_scope, "cache", None)
    _scope.cache = {} if outer is None else outer
    try:
        yield
    finally:
        _scope.cache = outer


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """lengths [B] -> offsets [B+1] (int64, starting at 0)."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    offsets[1:] = torch.cumsum(lengths, 0)
    return offsets


def jagged_index(offsets: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row id and position in row of each jagged element: (row [L], pos [L]). No host sync.
    Shared within a ``shared_index()`` block."""
    cache = getattr(_scope, "cache", None)
    if cache is not None and not torch.compiler.is_compiling() and isinstance(total, int):
        hit = cache.get(id(offsets))
        if hit is not None and hit[0] is offsets and hit[1] == total:
            return hit[2], hit[3]
        rows, pos = _jagged_index(offsets, total)
        cache[id(offsets)] = (offsets, total, rows, pos)  # holds offsets: its id stays unique
        return rows, pos
    return _jagged_index(offsets, total)


def _jagged_index(offsets: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # element i is in row r when offsets[r] <= i < offsets[r+1]: r = #{row ends <= i} (empty rows
    # have end == start and are skipped); 4 kernels (repeat_interleave of lengths took 7)
    i = torch.arange(total, device=offsets.device)  # [L]
    rows = torch.searchsorted(offsets[1:].contiguous(), i, right=True)  # [L]
    pos = i - offsets[rows]  # [L]
    return rows, pos


def last_index(offsets: torch.Tensor) -> torch.Tensor:
    """Index [B] of each row's last element (0 for an empty row: mask with lengths > 0)."""
    return (offsets[1:] - 1).clamp_min(0)


def pad_jagged(values: torch.Tensor, flat_idx: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """[L, *S] jagged -> [B, N, *S] right-padded with zeros (flat_idx = row * N + pos).
    When L == B * N every row is full (rows hold at most N): a reshape, no copy (one request
    per call in serving, full training windows); the result may then alias ``values`` (callers
    only read it)."""
    if values.shape[0] == b * n:  # a shape check: no sync
        return values.reshape((b, n) + tuple(values.shape[1:]))
    out = values.new_zeros((b * n,) + tuple(values.shape[1:]))
    out = out.index_copy(0, flat_idx, values)  # [B*N, *S]
    return out.view((b, n) + tuple(values.shape[1:]))  # [B, N, *S]


def pad_heads(
    flat_idx: torch.Tensor, b: int, n: int, *xs: torch.Tensor
) -> Tuple[torch.Tensor, ...]:
    """Each of xs [L, H, Dh] jagged -> [B, H, N, Dh] right-padded with zeros (attention layout)."""
    return tuple(pad_jagged(x, flat_idx, b, n).transpose(1, 2) for x in xs)


def unpad_jagged(dense: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """[B, N, *S] -> [L, *S] (inverse of pad_jagged; L == B * N: every row full, a reshape)."""
    flat = dense.reshape((-1,) + tuple(dense.shape[2:]))  # [B*N, *S]
    return flat if flat_idx.shape[0] == flat.shape[0] else flat[flat_idx]  # [L, *S]


def gather_rows(
    offsets: torch.Tensor, rows: torch.Tensor, keep_last: Optional[int] = None, total: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows [R]`` of a jagged tensor (repeats allowed), each cut to its last ``keep_last``
    elements -> (index [M] into its values, offsets [R+1] of the gathered tensor).

    ``values[index]`` jagged by the returned offsets is the gathered tensor. total: M when the
    caller knows it on the host (``HostSizes``); None costs one host sync.
    """
    lengths = (offsets[1:] - offsets[:-1])[rows]  # [R]
    if keep_last is not None:
        lengths = lengths.clamp(max=keep_last)
    new_off = lengths_to_offsets(lengths)  # [R+1]
    if total is None:
        total = new_off[-1].item()  # the host sync (an unbacked size under torch.export)
    r, pos = jagged_index(new_off, total)  # [M]
    start = offsets[1:][rows] - lengths  # [R] first kept element of each gathered row
    return start[r] + pos, new_off


def append_tokens(
    values: torch.Tensor, offsets: torch.Tensor, extra: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """values [L, *S] jagged by offsets [B+1], extra [B, *S] -> (values [L+B, *S] with extra[b]
    appended to row b, offsets [B+1])."""
    b = offsets.numel() - 1
    new_off = lengths_to_offsets(offsets[1:] - offsets[:-1] + 1)
    rows, pos = jagged_index(offsets, values.shape[0])
    out = values.new_zeros((values.shape[0] + b,) + tuple(values.shape[1:]))
    out = out.index_copy(0, new_off[:-1][rows] + pos, values)
    return out.index_copy(0, new_off[1:] - 1, extra), new_off
