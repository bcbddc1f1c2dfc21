"""Ranking evaluation: AUC, GAUC (per request), NE, log loss, calibration and AUC on new candidates
only, through TorchRec's metric computations (train/metrics.py ``RankingMetrics``), reduced across ranks."""
from __future__ import annotations

from typing import Dict, Iterable

import torch

from pinfm_rec.train.metrics import RankingMetrics


@torch.no_grad()
def evaluate_ranking(model, batches: Iterable, device: torch.device, autocast_dtype=None,
                     max_batches: int = 0) -> Dict[str, float]:
    """Metrics of ``model.logits(batch) -> [C]`` over ``batches`` (RankingBatch), all ranks.

    Returns auc, gauc, ne, logloss, calibration, new_auc (candidates whose item is absent from the
    pretraining data), count (candidates), requests. Rows with weight 0 (rank padding) are ignored.
    Every rank must call it (the metrics are reduced across ranks).
    """
    was = model.training
    model.eval()
    metrics = RankingMetrics(device)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model.logits(batch).float()  # [C]
        keep = batch.weights > 0 if batch.weights is not None else torch.ones_like(logits, dtype=torch.bool)
        per_request = torch.zeros(batch.num_requests, dtype=torch.long, device=device).index_add_(
            0, batch.expand_index(), keep.long())  # [U] kept candidates per request (contiguous)
        metrics.update(logits[keep], batch.labels[keep], per_request, batch.cand_new[keep])
    model.train(was)
    return metrics.compute()
