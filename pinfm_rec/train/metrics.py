"""Ranking and classification metrics.

Retrieval (pretraining eval, full ranking over all items): HR@K and NDCG@K from the 0-based rank of
the held-out item among all I items. Classification (fine-tuning): AUC, GAUC (per request), logloss.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch


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


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of one group (Mann–Whitney U with average ranks for ties); nan if one class only.

    scores, labels: [N].
    """
    scores = scores.double().flatten()
    labels = labels.double().flatten()
    n_pos = float(labels.sum())
    n_neg = float(labels.numel() - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s_sorted = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inv, counts = torch.unique(s_sorted, return_inverse=True, return_counts=True)
    if uniq.numel() != s_sorted.numel():
        sum_ranks = torch.zeros_like(uniq).index_add_(0, inv, torch.arange(1, scores.numel() + 1, dtype=torch.float64))
        avg = sum_ranks / counts
        ranks[order] = avg[inv]
    u = float(ranks[labels > 0.5].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def gauc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """Group AUC: per-request AUC weighted by the request's number of candidates, over requests
    that have both a positive and a negative. scores, labels, groups: [C]."""
    total, weight = 0.0, 0.0
    for g in torch.unique(groups):
        m = groups == g
        a = auc(scores[m], labels[m])
        if a == a:  # not nan
            n = float(m.sum())
            total += a * n
            weight += n
    return total / weight if weight else float("nan")


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy from logits. logits, labels: [C]."""
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float()))
