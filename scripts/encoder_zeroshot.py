"""Zero-shot check of a pretrained encoder on a ranking dataset, before fine-tuning anything:
does the pretraining objective's own score of a candidate rank the dataset's impressions?

    PINFM_DATA_DIR=../shared/data .venv/bin/python scripts/encoder_zeroshot.py \\
        --spec specs/finetune/mind.yaml --checkpoint runs/pre-mind/encoder [--splits valid test]

Per split, GAUC of ``PinFMEncoder.affinity`` (cos(user vector of the
request's history, candidate item embedding) / tau, with the spec's ``encoder.unseen_items``: rows
absent from the pretraining corpus zeroed or kept) over all candidates and over the warm ones only
(item in the pretraining corpus; each request keeps its warm candidates), the warm fractions, and as
references the GAUC of each of the data's dense features alone. Prints one JSON object.

GAUC here = mean over requests with both labels and more than one distinct score of the request's
AUC with TIES AVERAGED (``tie_gauc``). TorchRec's GAUC (train/metrics.py, the fine-tuning metric)
orders tied scores by their position instead, which is harmless for model logits but not for a
score that is exactly 0 for most candidates (zeroed cold items) or for count features.

If the affinity's GAUC is at 0.5 where the fine-tuning test happens, the pretrained item/user
geometry carries no ranking signal there (e.g. the candidates are mostly items pretraining never
saw), and no amount of fine-tuning recipe will transfer it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pinfm_rec.data.ranking import build_ranking_loader, prepare_ranking  # noqa: E402
from pinfm_rec.model.encoder import PinFMEncoder  # noqa: E402
from pinfm_rec.spec import load_spec  # noqa: E402
from pinfm_rec.train.finetune import FinetuneSpec  # noqa: E402
from pinfm_rec.train.unseen_items import pretraining_corpus, unseen_items, zero_unseen_items  # noqa: E402


def request_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of one request, tied scores counted 1/2 (Mann-Whitney with average ranks)."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # first index of each run of equal scores
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(s.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based average ranks
    pos = labels > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tie_gauc(scores: np.ndarray, labels: np.ndarray, request: np.ndarray) -> tuple:
    """(mean request AUC over requests with both labels and > 1 distinct score, requests counted);
    ``request`` [N] the request of each candidate (any ids). (nan, 0) when none qualifies."""
    aucs = []
    for r in np.unique(request):
        m = request == r
        y, x = labels[m], scores[m]
        if 0 < y.sum() < y.size and x.min() < x.max():
            aucs.append(request_auc(x, y))
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


def zero_shot(spec: FinetuneSpec, checkpoint: str, splits=("valid", "test")) -> dict:
    info = prepare_ranking(spec.data)
    enc = PinFMEncoder.from_pretrained(checkpoint, vocab={"num_items": info.num_items}, device="cpu").eval()
    corpus = pretraining_corpus(checkpoint, info.pretrain_dir)
    cold = unseen_items(corpus, info.num_items)
    if spec.encoder.unseen_items == "zero":
        zero_unseen_items(enc, cold)
    warm_item = np.ones(info.num_items, bool)
    warm_item[cold] = False
    names = list(info.dense_features) or [f"dense_{i}" for i in range(info.num_dense)]
    out = {"checkpoint": checkpoint, "corpus": corpus, "unseen_items": spec.encoder.unseen_items}
    for split in splits:
        cols = {k: [] for k in ("score", "label", "request", "warm", "dense")}
        offset = 0
        loader = build_ranking_loader(spec.data, info, split, seed=spec.seed)
        with torch.no_grad():
            for b in loader:
                keep = (b.weights > 0).numpy() if b.weights is not None else np.ones(b.num_candidates, bool)
                cols["score"].append(enc.affinity(b).numpy()[keep])
                cols["label"].append(b.labels.numpy()[keep])
                cols["request"].append(b.expand_index().numpy()[keep] + offset)
                cols["warm"].append(warm_item[b.cand_item.numpy()][keep])
                cols["dense"].append(b.dense.float().numpy()[keep])
                offset += b.num_requests
        x, y, r, w, d = (np.concatenate(cols[k]) for k in ("score", "label", "request", "warm", "dense"))
        g_all, n_all = tie_gauc(x, y, r)
        g_warm, n_warm = tie_gauc(x[w], y[w], r[w])
        out[split] = {
            "affinity_gauc": round(g_all, 4), "requests": n_all,
            "affinity_gauc_warm_only": round(g_warm, 4), "requests_warm_only": n_warm,
            "warm_fraction": round(float(w.mean()), 4),
            "warm_fraction_of_positives": round(float(w[y > 0].mean()), 4) if (y > 0).any() else float("nan"),
            "candidates": int(y.size),
            "dense_feature_gauc": {k: round(tie_gauc(d[:, i], y, r)[0], 4) for i, k in enumerate(names)},
        }
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="a fine-tuning spec (its data and encoder.unseen_items)")
    ap.add_argument("--checkpoint", required=True, help="the pretrained encoder (runs/<pretrain run>/encoder)")
    ap.add_argument("--splits", nargs="+", default=["valid", "test"], choices=["train", "valid", "test"])
    ap.add_argument("overrides", nargs="*", help="dotted spec overrides (data.max_len=50 ...)")
    args = ap.parse_args(argv)
    spec = load_spec(FinetuneSpec, args.spec, args.overrides)
    print(json.dumps(zero_shot(spec, args.checkpoint, tuple(args.splits)), indent=1))


if __name__ == "__main__":
    main()
