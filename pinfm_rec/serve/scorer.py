"""Scoring request-grouped inputs with a fine-tuned ranker (``pinfm score``).

Per batch of U requests (C candidates, L history tokens): the encoder encodes each request's
context once (per-layer K/V cache, ``Trunk.encode_context``), scores all its candidates with DCAT
(``Trunk.score_candidates``), and the ranker turns [dense features, encoder features] into one
logit per candidate: the model's own ``RankerWithEncoder.logits`` in eval mode under
``torch.no_grad`` (no dropout, no candidate-id dropout), so scores equal the training-time forward.

Bucketed shapes: with ``buckets=True`` every batch is padded with padding requests (empty or
filler histories, filler candidates; their scores are dropped) so that U, L, C, the longest
history N and the most candidates per request are powers of two (N capped at the run's max_len):
a compiled hot path (``compile_hot_path``, torch.compile with static shapes) then meets a few
shapes instead of one per batch. Requests never interact (attention is within a request, DCAT
per candidate, the ranker per candidate), so padding leaves real scores unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.batch import SequenceBatch
from pinfm_rec.data.host_sizes import HostSizes
from pinfm_rec.data.ranking_batch import RankingBatch
from pinfm_rec.model.jagged import lengths_to_offsets
from pinfm_rec.model.trunk import TrunkLayer
from pinfm_rec.rankers.dlrm import place_interaction_indices, ranker_features_host
from pinfm_rec.serve.packing import pack
from pinfm_rec.serve.precision import precast_linears
from pinfm_rec.serve.requests_io import RequestFile, write_scores


def pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << max(0, math.ceil(math.log2(max(n, minimum, 1))))


def _split_even(total: int, parts: int, cap: int) -> torch.Tensor:
    """[parts] counts summing to ``total``, each <= cap (total <= parts * cap), filled front first."""
    out = []
    left = total
    for _ in range(parts):
        out.append(min(cap, left))
        left -= out[-1]
    return torch.tensor(out, dtype=torch.long)


def bucket_sizes(batch: RankingBatch, n_cap: int) -> Tuple[int, int, int, int, int]:
    """Bucket shape (U, L, C, N, max_cands) for ``batch``: powers of two, N capped at ``n_cap``
    (the trunk's max_len), with room for at least one padding request holding the filler tokens."""
    hist = batch.history
    u, c, total = batch.num_requests, batch.num_candidates, hist.timestamps.numel()
    n_b = min(pow2(hist.max_len, 8), n_cap)
    l_b, c_b = pow2(total, 8), pow2(c, 8)
    u_b = pow2(u + max(1, math.ceil((l_b - total) / n_b)), 2)
    max_c = pow2(max(batch.max_cands or 0, math.ceil((c_b - c) / (u_b - u))), 1)
    return u_b, l_b, c_b, n_b, max_c


def pad_batch(batch: RankingBatch, n_cap: int, sizes: Optional[Tuple[int, int, int, int, int]] = None) -> RankingBatch:
    """``batch`` (CPU) padded to ``sizes`` = (U, L, C, N, max_cands) (default ``bucket_sizes``):
    padding requests after the real ones, their tokens/candidates after the real ones, so the
    real candidates keep positions [0, C). Padding requests hold at most N tokens and max_cands
    candidates each (a ValueError when the sizes leave no room)."""
    hist = batch.history
    kjt = hist.features
    keys = list(kjt.keys())
    u, c = batch.num_requests, batch.num_candidates
    lengths = kjt[keys[0]].lengths()
    total = hist.timestamps.numel()
    u_b, l_b, c_b, n_b, max_c = sizes or bucket_sizes(batch, n_cap)
    pad_l, pad_c, p = l_b - total, c_b - c, u_b - u
    if p < 1 or pad_l < 0 or pad_c < 0 or pad_l > p * n_b or pad_c > p * max_c or hist.max_len > n_b \
            or (batch.max_cands or 0) > max_c:
        raise ValueError(f"batch (U={u}, L={total}, C={c}, N={hist.max_len}, max_cands={batch.max_cands}) does not "
                         f"fit the shape (U, L, C, N, max_cands)={(u_b, l_b, c_b, n_b, max_c)} with >= 1 "
                         f"padding request")
    pad_len = _split_even(pad_l, p, n_b)  # [P] filler tokens per padding request
    pad_cn = _split_even(pad_c, p, max_c)  # [P] filler candidates per padding request
    zl = torch.zeros(pad_l, dtype=torch.long)
    values = torch.cat([torch.cat([kjt[k].values(), zl]) for k in keys])
    new_kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=torch.cat([lengths, pad_len]).repeat(len(keys)),
                                stride=u_b)
    req_ts = hist.target_timestamp
    new_hist = SequenceBatch(
        features=new_kjt, timestamps=torch.cat([hist.timestamps, zl]),
        request_ids=torch.cat([hist.request_ids, torch.full((p,), -1, dtype=torch.long)]), max_len=n_b,
        target_timestamp=None if req_ts is None else torch.cat([req_ts, torch.zeros(p, dtype=req_ts.dtype)]))
    cand_len = torch.cat([batch.cand_offsets[1:] - batch.cand_offsets[:-1], pad_cn])
    zc = torch.zeros(pad_c)
    return RankingBatch(
        history=new_hist, cand_item=torch.cat([batch.cand_item, batch.cand_item.new_zeros(pad_c)]),
        cand_offsets=lengths_to_offsets(cand_len), labels=torch.cat([batch.labels, zc]),
        dense=torch.cat([batch.dense, batch.dense.new_zeros(pad_c, batch.dense.shape[1])]),
        cand_new=torch.cat([batch.cand_new, torch.zeros(pad_c, dtype=torch.bool)]),
        weights=torch.cat([batch.weights if batch.weights is not None else torch.ones(c), zc]), max_cands=max_c)


def compile_hot_path(model) -> None:
    """torch.compile (static shapes) the dense per-token work of the encoder's transformer blocks
    (LayerNorm + QKV projection, output projection + FFN) and the ranker's MLPs; the attention
    (causal SDPA, the DCAT op) and the jagged bookkeeping stay as they are."""
    enc = model.encoder
    if enc is not None:
        for layer in enc.fm.trunk.layers:
            if isinstance(layer, TrunkLayer):
                layer.qkv_heads = torch.compile(layer.qkv_heads, dynamic=False)
                layer.finish = torch.compile(layer.finish, dynamic=False)
    for name in ("dense_arch", "over_arch"):
        arch = getattr(model.ranker, name, None)
        if arch is not None:
            setattr(model.ranker, name, torch.compile(arch, dynamic=False))


def host_id_check(model):
    """``batch -> None`` range-checking a CPU batch's ids on the host for ``model`` (encoder and
    ranker tables), or None when an id mode other than "error" (hash, managed) leaves the
    mapping to the forward."""
    from pinfm_rec.data.host_sizes import check_ids_on_host

    enc = model.encoder
    if enc is not None and enc.fm.spec.embedding.id_mode != "error":
        return None
    ranker_sizes = getattr(model, "ranker_sizes", None)
    if ranker_sizes is not None and getattr(model, "id_mode", "error") != "error":
        return None
    sizes = enc.fm.sizes if enc is not None else {}
    return lambda batch: check_ids_on_host(batch, sizes, ranker_sizes)


def history_cap(model, max_len: int) -> int:
    """The longest history a bucket may pad to: the encoder's trunk.max_len (else ``max_len``)."""
    return model.encoder.fm.trunk.spec.max_len if model.encoder is not None else max_len


class Scorer:
    """Batched scoring of a loaded fine-tuned model (``model_io.load_finetuned``).

    ``logits(batch)`` = ``forward(prepare(batch))`` read back: ``prepare`` does the host work
    (padding, id checks, host sizes, transfer), ``forward`` the device work without host syncs;
    cuda_graphs: replay a CUDA graph of ``forward`` per bucketed shape (``serve/graphs.py``).
    pack: ``prepare`` moves a batch as one buffer (``serve/packing.py``; one transfer, and one copy
    per graph replay, instead of one per tensor); None: on a CUDA device.
    autocast: the dtype ``forward`` runs under; the model's ``nn.Linear`` weights are then cast to it
    in place, once (``serve/precision.py``: the casts autocast would repeat on every call, same
    scores): use the model through this Scorer, or under the same autocast, afterwards.
    """

    def __init__(self, model, max_len: int, device: str | torch.device = "cpu", *, buckets: bool = True,
                 compile: bool = False, autocast: Optional[torch.dtype] = None, cuda_graphs: bool = False,
                 pack: Optional[bool] = None) -> None:
        self.model = model.eval()
        self.device = torch.device(device)
        # pack: move each batch as one buffer (serve/packing.py); None = on a CUDA device
        self.pack = self.device.type == "cuda" if pack is None else bool(pack)
        self.max_len = max_len  # history cut (the run's data.max_len)
        self.n_cap = history_cap(model, max_len)
        self.buckets = buckets
        self.autocast = autocast
        if autocast is not None:  # Linear weights in the autocast dtype once, not cast per call
            precast_linears(self.model, autocast)
        self.shapes: set = set()  # distinct (U, L, C, N, max_cands) seen: what a compiled path compiles for
        self._id_check = host_id_check(self.model)
        # a RankerWithEncoder's sparse features are built in prepare (on the host), not per forward
        self._bag_len = getattr(self.model, "history_bag_len", None) if hasattr(self.model, "ranker") else None
        place_interaction_indices(self.model, self.device)
        if compile:
            compile_hot_path(self.model)
        self.graphs = None
        if cuda_graphs:
            from pinfm_rec.serve.graphs import GraphedLogits

            self.graphs = GraphedLogits.create(self.model, self.device, self.autocast)

    def prepare(self, batch: RankingBatch) -> RankingBatch:
        """Host side of a CPU batch: bucket padding, ids range-checked on the host (id mode
        "error"), host sizes (``RankingBatch.host``), the KJT's per-key lengths/offsets and the
        ranker's sparse KJT (``RankingBatch.ranker_sparse``) computed here, then the transfer
        (one packed buffer when ``pack``). The device batch it returns needs no host sync."""
        if self.buckets:
            batch = pad_batch(batch, self.n_cap)
        checked = self._id_check is not None
        if checked:
            self._id_check(batch)
        kjt = batch.history.features
        kjt.length_per_key(), kjt.offset_per_key(), kjt.offsets()  # cached on the KJT: travel with .to()
        batch = dataclasses.replace(batch, host=HostSizes.of(batch, ids_checked=checked))
        if self._bag_len is not None and batch.cand_cold is None:  # the ranker's KJT built here, as a
            # feature pipeline sends it (cold candidates: built by the forward, which masks them)
            sparse = ranker_features_host(batch, self._bag_len)  # = the forward's ranker_features
            batch = dataclasses.replace(batch, ranker_sparse=sparse, ranker_bag_len=self._bag_len)
        h = batch.history
        self.shapes.add((batch.num_requests, h.timestamps.numel(), batch.num_candidates, h.max_len, batch.max_cands))
        if self.pack:  # one pinned buffer, one transfer (and one copy per graph replay): serve/packing.py
            return pack(batch, self.device)
        return batch.to(self.device, non_blocking=True)

    @torch.no_grad()
    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """A prepared (device) batch -> logits [C'] on the device (C' with padding candidates):
        no host sync on the way (tests/test_serve_host.py)."""
        if self.graphs is not None:
            return self.graphs(batch)
        if self.autocast is None:  # no autocast context per call (nor one for devices it lacks: meta)
            return self.model.logits(batch)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.model.logits(batch)

    def logits(self, batch: RankingBatch) -> torch.Tensor:
        """A CPU batch of U requests -> logits [C] (CPU float32), in the batch's candidate order."""
        scores, event = self.launch(batch)
        if event is not None:
            event.synchronize()  # the one sync: the scores
        return scores

    def launch(self, batch: RankingBatch):
        """``logits`` without waiting: a CPU batch -> (scores [C] float32 on the host, event).
        On a CUDA device the scores are copied into pinned host memory behind the forward and
        are valid once ``event.synchronize()`` returned; elsewhere they are ready (event None)."""
        c = batch.num_candidates
        out = self.forward(self.prepare(batch))[:c].float()
        if self.device.type != "cuda":
            return out.cpu(), None
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)  # queued behind the forward, before the next batch's
        event = torch.cuda.Event()
        event.record()
        return host, event

    def score_file(self, req: RequestFile, out_path: str, requests_per_batch: int = 256) -> Dict[str, float]:
        """Score every request of ``req`` and write ``out_path`` (``requests_io.write_scores``).
        Pipelined by one batch: the host prepares (and launches) batch i+1 while the device
        computes batch i, whose scores are read after that launch. Returns counts and throughput."""
        t0 = time.perf_counter()
        rows, logits = [], []

        def collect(done):
            r, scores, event = done
            if event is not None:
                event.synchronize()
            logits.append(scores.numpy().copy())
            rows.append(r)

        pending = None
        for batch, r in req.batches(requests_per_batch, self.max_len):
            nxt = (r, *self.launch(batch))
            if pending is not None:
                collect(pending)
            pending = nxt
        if pending is not None:
            collect(pending)
        rows_a = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        logit_a = np.concatenate(logits) if logits else np.zeros(0, np.float32)
        wall = time.perf_counter() - t0
        write_scores(out_path, req, rows_a, logit_a)
        out = {"requests": int(rows_a.size), "candidates": int(logit_a.size), "wall_s": wall,
               "candidates_per_s": logit_a.size / max(wall, 1e-9), "shapes": len(self.shapes)}
        if self.graphs is not None:
            out.update(cuda_graphs=len(self.graphs.graphs),
                       cuda_graph_failures=sorted(set(self.graphs.failed.values())))
        return out
