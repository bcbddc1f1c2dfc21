"""Retrieval and ranking metrics.

Retrieval (pretraining eval, full ranking over all items): HR@K and NDCG@K from the 0-based rank of
the held-out item among all I items — own code (``target_ranks``, ``hr_ndcg_sums``), summed here and
reduced by the caller.

Ranking (fine-tuning eval): ``RankingMetrics`` feeds TorchRec's metric computations
(``torchrec.metrics``: AUC, GAUC, NE with log loss, calibration). Their states are torchmetrics
states, reduced across ranks (all-gather for AUC, sum for the others) when computed, so every rank
gets the global figure. Definitions (TorchRec's):

* auc: ROC AUC over all candidates (ties are not averaged: distinct scores expected).
* gauc: mean over requests of the request's AUC, each request counted once (the MIND scorer's
  "AUC"); requests with one class only or one score for every candidate are left out.
* ne: normalized entropy = log loss / entropy of the base rate p (-p log p - (1-p) log(1-p)).
* logloss: mean binary cross-entropy in nats (TorchRec reports bits; multiplied by ln 2 here so it
  reads like the training loss).
* calibration: sum of predicted probabilities / number of positives (1 = calibrated).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.gauc import GAUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric

from ..errors import DependencyError


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target among all items.

    scores: [B, I] float; target: [B] int64 item ids. Returns [B] int64 = number of items scored
    strictly higher than the target (ties resolved in the target's favour, as SASRec/GR do).
    """
    t = scores.gather(1, target.view(-1, 1))  # [B, 1]
    return (scores > t).sum(dim=1)


def hr_ndcg_sums(ranks: torch.Tensor, weights: torch.Tensor, ks: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Weighted sums of HR@K and NDCG@K (divide by the weight sum for the mean).

    ranks: [B] int64 0-based; weights: [B] float (0 for padding rows). Returns {"hr@K", "ndcg@K", "count"}.
    """
    r = ranks.to(torch.float64)
    w = weights.to(torch.float64)
    out = {"count": w.sum()}
    for k in ks:
        hit = (r < k).to(torch.float64)
        out[f"hr@{k}"] = (hit * w).sum()
        out[f"ndcg@{k}"] = (hit / torch.log2(r + 2.0) * w).sum()
    return out


_TASK = "ctr"
_WINDOW = 1 << 50  # TorchRec's AUC is a window metric: a window larger than any eval keeps every candidate


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class RankingMetrics:
    """AUC, GAUC, NE, log loss, calibration (and AUC of "new" candidates) of one eval pass.

    ``update`` once per batch with the candidates of whole requests (a request's candidates never
    split across updates or ranks); ``compute`` on every rank returns the global values. Counts
    (candidates, requests, new candidates) are summed across ranks with ``all_reduce``.
    """

    def __init__(self, device: torch.device, process_group: Optional[dist.ProcessGroup] = None):
        world, rank = _world()
        kw = dict(world_size=world, my_rank=rank, batch_size=1, tasks=[RecTaskInfo(name=_TASK)],
                  window_size=_WINDOW, compute_on_all_ranks=True, process_group=process_group)
        self.device, self.process_group = device, process_group
        self._auc = AUCMetric(**kw).to(device)
        self._new_auc = AUCMetric(**kw).to(device)
        self._gauc = GAUCMetric(**kw).to(device)
        self._ne = NEMetric(include_logloss=True, **kw).to(device)
        self._cal = CalibrationMetric(**kw).to(device)
        self._counts = torch.zeros(4, dtype=torch.float64, device=device)  # candidates, requests, new, positives

    @staticmethod
    def _feed(metric, p: torch.Tensor, y: torch.Tensor, **kw) -> None:
        metric.update(predictions={_TASK: p}, labels={_TASK: y}, weights={_TASK: torch.ones_like(p)}, **kw)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, num_candidates: torch.Tensor,
               new: Optional[torch.Tensor] = None) -> None:
        """logits, labels: [C] (request-major); num_candidates: [U] candidates per request (sum C);
        new: [C] bool, candidates whose item is absent from the pretraining data."""
        num_candidates = num_candidates[num_candidates > 0]
        if logits.numel() == 0:
            return
        p = torch.sigmoid(logits.float())  # [C]
        y = labels.float()
        for m in (self._auc, self._ne, self._cal):
            self._feed(m, p, y)
        self._feed(self._gauc, p, y, num_candidates=num_candidates)
        n_new = 0.0
        if new is not None and bool(new.any()):
            self._feed(self._new_auc, p[new], y[new])
            n_new = float(new.sum())
        self._counts += torch.tensor([p.numel(), num_candidates.numel(), n_new, float(y.sum())],
                                     dtype=torch.float64, device=self._counts.device)

    @torch.no_grad()
    def compute(self) -> Dict[str, float]:
        """{auc, gauc, ne, logloss, calibration, new_auc, count, requests}; nan where undefined
        (no candidates, no new candidates, no request with both classes)."""
        counts = self._counts.clone()
        if _world()[0] > 1:
            dist.all_reduce(counts, group=self.process_group)
        n, reqs, n_new, pos = (float(v) for v in counts.cpu())
        gauc, ne = _compute(self._gauc), _compute(self._ne)
        nan = float("nan")
        one_class = n == 0 or pos == 0 or pos == n
        return {
            "auc": nan if one_class else _value(_compute(self._auc), "window_auc"),
            "gauc": nan if _value(gauc, "lifetime_gauc_num_samples") == 0 else _value(gauc, "lifetime_gauc"),
            "ne": nan if one_class else _value(ne, "lifetime_ne"),
            "logloss": nan if n == 0 else _value(ne, "lifetime_logloss") * math.log(2.0),
            "calibration": nan if pos == 0 else _value(_compute(self._cal), "lifetime_calibration"),
            "new_auc": nan if n_new == 0 else _value(_compute(self._new_auc), "window_auc"),
            "count": n,
            "requests": reqs,
        }


def _compute(metric) -> Dict[str, torch.Tensor]:
    """``metric.compute()``, with the known torchmetrics mismatch turned into one clear line:
    newer torchmetrics (seen: 1.9.0 on the GPU image) squeeze compute() results through
    lightning_utilities, which rejects TorchRec's frozen ``MetricComputationReport`` ("A frozen dataclass was passed ...")."""
    try:
        return metric.compute()
    except ValueError as e:
        if "frozen dataclass" not in str(e):
            raise
        import torchmetrics
        raise DependencyError(
            f"torchrec.metrics needs torchmetrics==1.0.3 (TorchRec's own pin); this Python has torchmetrics "
            f"{torchmetrics.__version__}, whose compute() rejects TorchRec's metric reports: "
            "pip install torchmetrics==1.0.3") from e


def _value(result: Dict[str, torch.Tensor], name: str) -> float:
    """The single-task value of ``name`` (e.g. "lifetime_ne") in a ``RecMetric.compute()`` result,
    whose keys read "<namespace>-<task>|<name>"."""
    return float(next(v for k, v in result.items() if k.endswith("|" + name)))
