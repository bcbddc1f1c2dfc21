"""One buffer per scoring batch: every tensor the forward reads packed into one byte buffer.

A prepared ``RankingBatch`` holds about a dozen small tensors (the history KJT's values, lengths
and offsets, timestamps, request ids and times, candidate ids and offsets, dense features, ...).
Moved one by one, that is a dozen host-to-device copies per batch, and a CUDA graph replay
(``serve/graphs.py``) adds a dozen more copies into the graph's input buffers, each a launch
on the host's critical path before the replay can start. ``pack`` lays the tensors out in one
byte buffer (each at a ``ALIGN``-byte offset, so every view keeps the alignment vectorised
kernels and FBGEMM expect), moves that buffer in one copy (pinned host memory for a CUDA
target) and rebuilds the batch over views of it; a graph then refreshes all its inputs with one
copy (``GraphedLogits``). The batch's values, shapes, dtypes and the KJT's cached host sizes are
unchanged: the forward cannot tell a packed batch from a moved one (the few tensors it does not
read from the buffer, ``cand_cold`` and the history's eval-only fields, are moved alone).

``RankingBatch.packed`` carries the buffer and the layout (``PackedInputs``). Anything that maps
the batch's tensors (``RankingBatch.to``, ``pin_memory``) drops it; a batch whose tensors were
replaced another way (``dataclasses.replace``) no longer matches its views, which
``PackedInputs.holds`` checks before a graph trusts the one-copy path (the batch is then refreshed
tensor by tensor).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

ALIGN = 64  # bytes: each packed tensor starts at a multiple of it (a cache line; >= 16 for vector loads)
_KJT_TENSORS = ("_values", "_weights", "_lengths", "_offsets")
_HISTORY_FIELDS = ("features", "timestamps", "request_ids", "target_timestamp")
_BATCH_FIELDS = ("cand_item", "cand_offsets", "labels", "dense", "cand_new", "weights", "ranker_sparse")

Layout = Tuple[Tuple[int, Tuple[int, ...], torch.dtype], ...]  # (byte offset, shape, dtype) per tensor


@dataclasses.dataclass(frozen=True, eq=False)
class PackedInputs:
    """buffer: [nbytes] uint8, the batch's tensors' one storage; layout: (byte offset, shape, dtype)
    per tensor in ``batch_tensors`` order; views: those tensors (the batch's own objects)."""

    buffer: torch.Tensor
    layout: Layout
    views: Tuple[torch.Tensor, ...]

    def holds(self, tensors: List[torch.Tensor]) -> bool:
        """True when ``tensors`` (a batch's ``batch_tensors``) are exactly this buffer's views."""
        return len(tensors) == len(self.views) and all(a is b for a, b in zip(tensors, self.views))


def _kjt_tensors(kjt: KeyedJaggedTensor) -> List[torch.Tensor]:
    return [t for t in (getattr(kjt, n, None) for n in _KJT_TENSORS) if isinstance(t, torch.Tensor)]


def batch_tensors(batch) -> List[torch.Tensor]:
    """Every tensor a prepared RankingBatch holds that the forward may read, in a fixed order
    (the KJT's cached lengths/offsets too): what a CUDA graph copies in and ``pack`` packs."""
    out: List[torch.Tensor] = []
    h = batch.history
    for v in [getattr(h, f) for f in _HISTORY_FIELDS] + [getattr(batch, f) for f in _BATCH_FIELDS]:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, KeyedJaggedTensor):
            out.extend(_kjt_tensors(v))
    return out


def map_batch_tensors(batch, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``batch`` with every tensor of ``batch_tensors`` replaced by ``fn(t)`` (same order); each
    KJT keeps its cached host sizes (a shallow copy with its tensors swapped, its JaggedTensor
    cache cleared). ``packed`` is dropped (the caller sets the new one)."""

    def one(v):
        if isinstance(v, torch.Tensor):
            return fn(v)
        if isinstance(v, KeyedJaggedTensor):
            kjt = copy.copy(v)
            for n in _KJT_TENSORS:
                t = getattr(v, n, None)
                if isinstance(t, torch.Tensor):
                    setattr(kjt, n, fn(t))
            if hasattr(kjt, "_jt_dict"):
                kjt._jt_dict = None  # its JaggedTensors would point at the old tensors
            return kjt
        return v

    h = batch.history
    hist = {f: one(getattr(h, f)) for f in _HISTORY_FIELDS}
    out = {f: one(getattr(batch, f)) for f in _BATCH_FIELDS}
    return dataclasses.replace(batch, history=dataclasses.replace(h, **hist), packed=None, **out)


def layout_of(tensors: List[torch.Tensor]) -> Tuple[Layout, int]:
    """(layout, total bytes rounded up to ``ALIGN``) of ``tensors`` packed at ``ALIGN``-byte offsets."""
    layout, off = [], 0
    for t in tensors:
        off = -(-off // ALIGN) * ALIGN
        layout.append((off, tuple(t.shape), t.dtype))
        off += t.numel() * t.element_size()
    return tuple(layout), max(-(-off // ALIGN) * ALIGN, ALIGN)


_PAD = torch.zeros(ALIGN, dtype=torch.uint8)


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(out))


def views_of(buf: torch.Tensor, layout: Layout) -> List[torch.Tensor]:
    """The tensors of ``layout`` over the byte buffer ``buf`` (one typed view per dtype, then one
    ``as_strided`` per tensor)."""
    typed = {}
    out = []
    for off, shape, dtype in layout:
        t = typed.get(dtype)
        if t is None:
            t = typed[dtype] = buf.view(dtype)  # buf's length is a multiple of ALIGN: any itemsize divides it
        out.append(t.as_strided(shape, _contiguous_strides(shape), off // t.element_size()))
    return out


def pack(batch, device: torch.device | str, non_blocking: bool = True):
    """A CPU batch -> the same batch on ``device`` over one packed buffer (``batch.packed``): one
    concatenation into (pinned, for CUDA) host memory, one transfer, instead of a transfer per
    tensor. A batch already on a device, or with a KJT carrying inverse indices (not part of
    ``batch_tensors``), is moved tensor by tensor instead (``batch.to``, not packed)."""
    device = torch.device(device)
    tensors = batch_tensors(batch)
    if any(getattr(k, "_inverse_indices", None) is not None for k in (batch.history.features, batch.ranker_sparse)) \
            or any(t.device.type != "cpu" for t in tensors):  # (a batch already on a device: moved as is)
        return batch.to(device, non_blocking=non_blocking)
    # tensors the scoring forward does not take from the buffer: moved alone (cand_cold: serving
    # refuses cold masking; the history's target_item / weights: eval-only fields)
    h = batch.history
    batch = dataclasses.replace(
        batch, cand_cold=None if batch.cand_cold is None else batch.cand_cold.to(device, non_blocking=non_blocking),
        history=dataclasses.replace(h, **{f: getattr(h, f).to(device, non_blocking=non_blocking)
                                          for f in ("target_item", "weights") if getattr(h, f) is not None}))
    layout, nbytes = layout_of(tensors)
    parts, pos = [], 0
    for (off, _, _), t in zip(layout, tensors):
        if off > pos:
            parts.append(_PAD[:off - pos])
        # (an empty tensor may carry stride 0, from numpy, which a dtype view refuses)
        b = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else _PAD[:0]
        parts.append(b)
        pos = off + b.numel()
    if nbytes > pos:
        parts.append(_PAD[:nbytes - pos])
    pin = device.type == "cuda" and torch.cuda.is_available()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    torch.cat(parts, out=host)
    buf = host.to(device, non_blocking=non_blocking and pin) if device != host.device else host
    views = iter(views_of(buf, layout))
    out = map_batch_tensors(batch, lambda t: next(views))
    return dataclasses.replace(out, packed=PackedInputs(buf, layout, tuple(batch_tensors(out))))


def packed_layout(batch) -> Optional[Layout]:
    """The batch's packed layout when its tensors are still its buffer's views, else None."""
    p = getattr(batch, "packed", None)
    return p.layout if p is not None and p.holds(batch_tensors(batch)) else None
