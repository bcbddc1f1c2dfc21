"""Ranking evaluation: AUC, GAUC (per request), logloss, and AUC on new candidates only."""
from __future__ import annotations

from typing import Dict, Iterable

import numpy as np
import torch
import torch.distributed as dist

from pinfm_rec.train.metrics import auc, gauc, logloss


def _gather(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Concatenate each rank's arrays (sizes may differ between ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return arrays
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, arrays)
    return {k: np.concatenate([o[k] for o in out]) for k in arrays}


@torch.no_grad()
def evaluate_ranking(model, batches: Iterable, device: torch.device, autocast_dtype=None,
                     max_batches: int = 0) -> Dict[str, float]:
    """Metrics of ``model.logits(batch) -> [C]`` over ``batches`` (RankingBatch), all ranks.

    Returns auc, gauc, logloss, new_auc (candidates whose item is absent from the pretraining data),
    count (candidates), requests. Rows with weight 0 (rank padding) are ignored.
    """
    was = model.training
    model.eval()
    parts = {k: [] for k in ("logit", "label", "group", "new")}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model.logits(batch).float()  # [C]
        keep = batch.weights > 0 if batch.weights is not None else torch.ones_like(logits, dtype=torch.bool)
        groups = batch.history.request_ids[batch.expand_index()]  # [C]
        parts["logit"].append(logits[keep].cpu().numpy())
        parts["label"].append(batch.labels[keep].float().cpu().numpy())
        parts["group"].append(groups[keep].cpu().numpy())
        parts["new"].append(batch.cand_new[keep].cpu().numpy())
    model.train(was)
    arrays = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    a = _gather(arrays)
    lg, lb = torch.from_numpy(a["logit"]), torch.from_numpy(a["label"])
    grp, new = torch.from_numpy(a["group"]), torch.from_numpy(a["new"]).bool()
    out = {
        "auc": auc(lg, lb),
        "gauc": gauc(lg, lb, grp),
        "logloss": logloss(lg, lb) if lg.numel() else float("nan"),
        "new_auc": auc(lg[new], lb[new]) if bool(new.any()) else float("nan"),
        "count": float(lg.numel()),
        "requests": float(torch.unique(grp).numel()),
    }
    return out
