"""CUDA graphs of the scoring forward, one per bucketed shape (``Scorer(cuda_graphs=True)``,
``pinfm score --cuda-graphs``, ``python -m pinfm_rec.serve.bench --cuda-graphs``).

With bucketed shapes (``scorer.pad_batch``) and a forward that never syncs with the host
(``RankingBatch.host``; tests/test_serve_host.py), ``RankerWithEncoder.logits`` of a prepared
device batch is the same sequence of kernels for every batch of one signature: the tensor shapes
and dtypes plus the host sizes the forward reads (N, max_cands, per-key lengths, the ranker's bag
size). ``GraphedLogits`` captures that sequence once per signature into a ``torch.cuda.CUDAGraph``
(warm-up on a side stream, then capture; one memory pool shared by all graphs) and afterwards
copies each new batch into the captured input buffers and replays: one launch instead of
hundreds of kernel launches and their Python/dispatch cost. A packed batch (``serve/packing.py``,
what ``Scorer.prepare`` makes on a GPU) is refreshed with one copy of its buffer instead of one
copy per tensor (about a dozen launches on the host before the replay can start).

Known limit (not measured on a GPU yet): with the ranker's history bag
(``finetune.history_bag_len`` > 0) the bag's size, sum over requests of min(n_r, K) * c_r, is part of
the signature, and ``pad_batch`` does not fix it, so ragged traffic captures a graph per distinct bag
size (at most ``MAX_GRAPHS`` kept, least recently used dropped). Buckets of fixed bag size are the
next step.

A signature whose capture fails (an op that cannot be captured: an H2D copy of a Python list, a
sync) is scored eagerly from then on; ``failed`` keeps the reason and a warning names it once. On a
CPU device there is nothing to capture: ``create`` warns once and returns None (eager scoring).
"""
from __future__ import annotations

import traceback
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .hostprof import innermost_site
from .packing import batch_tensors, packed_layout

CPU_MESSAGE = "--cuda-graphs needs a CUDA device: scoring on {device} eagerly (no graphs)"
MAX_GRAPHS = 64  # graphs kept; past it the least recently used one is dropped


def signature(batch, model=None) -> Tuple:
    """What a captured graph depends on: tensor shapes/dtypes (for a packed batch, its buffer's
    layout, computed when it was packed) and the host sizes the forward reads (the ranker's
    history-bag size for ``model``'s bag length; the repeated-history size in the flat mode).
    Batches of one bucket with full histories share a signature; a packed and an unpacked batch
    never do (their inputs are refreshed differently)."""
    kjt = batch.history.features
    host = batch.host
    hs = None
    if host is not None:
        k = getattr(model, "history_bag_len", 0)
        hs = (host.ids_checked, host.bag_total(k) if k else 0,
              host.dup_total() if getattr(model, "mode", "dcat") == "flat" else 0)
    layout = packed_layout(batch)
    tensors = ("packed", layout) if layout is not None else \
        tuple((tuple(t.shape), t.dtype) for t in batch_tensors(batch))
    return (tensors, tuple(kjt.keys()), tuple(kjt._length_per_key or ()), batch.history.max_len, batch.max_cands, hs)


def _where(e: BaseException) -> str:
    """The innermost frame of ``e``'s traceback in pinfm_rec, kernels, torchrec or fbgemm_gpu: the op
    that could not be captured (else the innermost frame)."""
    return innermost_site(traceback.extract_tb(e.__traceback__),
                          ("pinfm_rec", "kernels/", "torchrec", "fbgemm_gpu"), skip="graphs.py")


class GraphedLogits:
    """``model.logits`` of prepared device batches through one CUDA graph per signature."""

    def __init__(self, model, device: torch.device, autocast: Optional[torch.dtype]) -> None:
        self.model = model
        self.device = device
        self.autocast = autocast
        self.graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, List[torch.Tensor], torch.Tensor]] = {}
        self.failed: Dict[Tuple, str] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0

    @classmethod
    def create(cls, model, device: torch.device, autocast: Optional[torch.dtype] = None) -> Optional["GraphedLogits"]:
        """A GraphedLogits on a CUDA device; on any other device a warning and None (the CPU
        fallback: the scorer runs eagerly, nothing else changes)."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            warnings.warn(CPU_MESSAGE.format(device=device), stacklevel=3)
            return None
        return cls(model, device, autocast)

    def _eager(self, batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None,
                            cache_enabled=False):
            return self.model.logits(batch)

    def _capture(self, batch) -> Tuple[torch.cuda.CUDAGraph, List[torch.Tensor], torch.Tensor]:
        static = batch  # its tensors become the graph's input buffers (kept alive by the entry)
        inputs = batch_tensors(static)  # listed before the warm-up, which may fill KJT caches
        packed = packed_layout(static) is not None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy inits, kernel autotune/JIT outside the capture
                self._eager(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._eager(static)
        if len(batch_tensors(static)) != len(inputs):
            raise RuntimeError("the warm-up changed the batch's tensors (a KJT without offsets/lengths: "
                               "prepare batches with Scorer.prepare)")
        if packed:  # the inputs are views of one buffer: replays refresh that buffer (its first entry)
            inputs = [static.packed.buffer] + inputs
        return graph, inputs, out

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        """A prepared device batch -> logits (a fresh tensor; the graph's output is copied)."""
        key = signature(batch, self.model)
        entry = self.graphs.get(key)
        if entry is None:
            if key in self.failed:
                return self._eager(batch)
            if len(self.graphs) >= MAX_GRAPHS:  # drop the least recently used graph (and its inputs)
                self.graphs.pop(next(iter(self.graphs)))
            try:
                entry = self.graphs[key] = self._capture(batch)
            except Exception as e:  # noqa: BLE001 - an uncapturable forward: eager from now on
                torch.cuda.synchronize(self.device)
                self.failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]} (at {_where(e)})"
                warnings.warn(f"CUDA graph capture failed, scoring this shape eagerly: {self.failed[key]}")
                return self._eager(batch)
            entry[0].replay()  # the captured run only recorded: compute this batch's logits
            self.replays += 1
            return entry[2].clone()
        graph, inputs, out = entry
        self.graphs[key] = self.graphs.pop(key)  # most recently used last (LRU order)
        if key[0][:1] == ("packed",):  # same layout as the captured batch's buffer: one copy refreshes all
            inputs[0].copy_(batch.packed.buffer, non_blocking=True)
        else:
            for dst, src in zip(inputs, batch_tensors(batch), strict=True):
                dst.copy_(src, non_blocking=True)
        graph.replay()
        self.replays += 1
        return out.clone()
