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
from pinfm_rec.data.host_sizes import HostSizes


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
    max_cands: host int, the most candidates of one request (the loader knows it; it saves the
        DCAT crossing a device sync), or None (computed on demand).
    host: per-request sizes on the host (``data/host_sizes.py``; the scorer sets it), or None.
    cand_cold: [C] bool, True where the candidate's item is cold (``data.cold_item_min_count``): the
        models withhold its id signal (the ranker's candidate-id bag is empty, the encoder's candidate
        item embedding zero); None = every candidate's id is used.
    ranker_sparse: the ranker's sparse KJT (``rankers.dlrm.ranker_features``) built on the host
        for ``ranker_bag_len`` (the scorer's ``prepare``: a serving request's features arrive
        built, as a ranking service's feature pipeline sends them), or None (built on the device
        from the deduplicated batch, as in training). Edit a prepared batch's candidates or history
        and this must go (``dataclasses.replace(batch, ranker_sparse=None)``): the forward checks
        only the bag length, the candidate count and that no candidate is cold.
    ranker_bag_len: the history-bag length ``ranker_sparse`` was built for.
    packed: ``serve.packing.PackedInputs`` when the tensors are views of one device buffer (the
        scorer's one-copy transfer; ``serve/packing.py``), else None. Mapping the tensors (``to``,
        ``pin_memory``) drops it.
    """

    history: SequenceBatch
    cand_item: torch.Tensor
    cand_offsets: torch.Tensor
    labels: torch.Tensor
    dense: torch.Tensor
    cand_new: torch.Tensor
    weights: Optional[torch.Tensor] = None
    max_cands: Optional[int] = None
    host: Optional[HostSizes] = None
    cand_cold: Optional[torch.Tensor] = None
    ranker_sparse: Optional[KeyedJaggedTensor] = None
    ranker_bag_len: Optional[int] = None
    packed: Optional[object] = None

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
        out["packed"] = None  # the mapped tensors are no longer views of the packed buffer
        return RankingBatch(**out)

    def to(self, device: torch.device, non_blocking: bool = False) -> "RankingBatch":
        return self._map(lambda v: v.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "RankingBatch":
        return self._map(lambda v: v.pin_memory())


def flatten_batch(batch: RankingBatch) -> RankingBatch:
    """The flat layout: every candidate becomes its own request carrying a copy of its request's
    history (U' = C rows, each with 1 candidate). Runs on the batch's device; request_ids are
    kept (candidate j keeps its request's id), so per-request metrics are unchanged."""
    hist = batch.history
    rows = batch.expand_index()  # [C]
    c = batch.num_candidates
    kjt = hist.features
    offsets = kjt[kjt.keys()[0]].offsets()  # [U+1]
    lengths = offsets[1:] - offsets[:-1]
    cl = lengths[rows]  # [C]
    rep = torch.zeros(c + 1, dtype=torch.long, device=cl.device)
    rep[1:] = torch.cumsum(cl, 0)
    total = int(rep[-1])
    r_rows = torch.repeat_interleave(torch.arange(c, device=cl.device), cl, output_size=total)
    src = offsets[:-1][rows][r_rows] + (torch.arange(total, device=cl.device) - rep[:-1][r_rows])  # [sum n_r]
    keys = list(kjt.keys())
    values = torch.cat([kjt[k].values()[src] for k in keys])
    new_kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=cl.repeat(len(keys)), stride=c)
    tts = hist.target_timestamp[rows] if hist.target_timestamp is not None else None
    new_hist = SequenceBatch(features=new_kjt, timestamps=hist.timestamps[src], request_ids=hist.request_ids[rows],
                             max_len=hist.max_len, target_timestamp=tts)
    co = torch.arange(c + 1, dtype=batch.cand_offsets.dtype, device=batch.cand_offsets.device)
    return RankingBatch(history=new_hist, cand_item=batch.cand_item, cand_offsets=co, labels=batch.labels,
                        dense=batch.dense, cand_new=batch.cand_new, weights=batch.weights,
                        max_cands=1 if c else 0, cand_cold=batch.cand_cold)


def random_ranking_batch(
    gen: torch.Generator, hist_lens, cand_lens, *, num_items: int = 50, num_actions: int = 4,
    num_surfaces: int = 3, num_dense: int = 2,
) -> RankingBatch:
    """A random RankingBatch (CPU) with the given history [U] and candidate [U] counts (0 allowed):
    for tests and benchmarks."""
    from pinfm_rec.data.batch import ACTION_KEY, ITEM_KEY, SURFACE_KEY

    hl = torch.tensor(list(hist_lens), dtype=torch.long)
    cl = torch.tensor(list(cand_lens), dtype=torch.long)
    u, total, c = hl.numel(), int(hl.sum()), int(cl.sum())
    values = torch.cat([
        torch.randint(0, num_items, (total,), generator=gen),
        torch.randint(0, num_actions, (total,), generator=gen),
        torch.randint(0, num_surfaces, (total,), generator=gen),
    ])
    kjt = KeyedJaggedTensor(keys=[ITEM_KEY, ACTION_KEY, SURFACE_KEY], values=values, lengths=hl.repeat(3), stride=u)
    ts = torch.cumsum(torch.randint(1, 5000, (total,), generator=gen), 0)
    req_ts = torch.full((u,), (int(ts[-1]) if total else 0) + 100, dtype=torch.long)
    hist = SequenceBatch(features=kjt, timestamps=ts, request_ids=torch.arange(u), max_len=int(hl.max()) if u else 0,
                         target_timestamp=req_ts)
    co = torch.zeros(u + 1, dtype=torch.long)
    co[1:] = torch.cumsum(cl, 0)
    return RankingBatch(
        history=hist, cand_item=torch.randint(0, num_items, (c,), generator=gen), cand_offsets=co,
        labels=torch.randint(0, 2, (c,), generator=gen).float(), dense=torch.randn(c, num_dense, generator=gen),
        cand_new=torch.zeros(c, dtype=torch.bool), weights=torch.ones(c),
        max_cands=int(cl.max()) if u else 0)
