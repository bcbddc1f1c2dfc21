"""Full-ranking retrieval evaluation (leave-one-out HR@K / NDCG@K over ALL items).

Correct with sharded tables: every rank looks up its slice of the item ids through the (sharded)
EmbeddingCollection, the slices are all-gathered into the full item matrix [I, D], each rank ranks
its own users against all items, and the weighted metric sums are all-reduced. No history item is
filtered from the ranking (SASRec's protocol) unless ``exclude_history``: then the items of the
row's history score -inf (except the target), as generative-recommenders' eval does
(``filter_invalid_ids``) for its published SASRec/HSTU figures. A model trained with
``model.loss.history_bias`` adds its learned bias to the scores of the row's history items (the
model's own scoring, as in training; not a filter).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import JaggedTensor

from pinfm_rec.features import ITEM_KEY
from pinfm_rec.parallel import all_gather_cat, all_reduce_sum
from pinfm_rec.train.metrics import hr_ndcg_sums, target_ranks


@torch.no_grad()
def all_item_embeddings(model, num_items: int, device: torch.device, chunk: int = 32768,
                        catalogue: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output-space embeddings of every item, on every rank (collective). catalogue [I]: the raw id
    of each item (data.raw_ids; the model looks up raw ids), None: the ids are 0..I-1.

    Returns [I, D]. Each round, rank r looks up ids [round*W*S + r*S, ... + S) (padded with id 0 past
    the end so every rank sends a non-empty, equal-sized request), then the rounds are gathered.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    chunk = max(1, min(chunk, math.ceil(num_items / world)))
    rounds = math.ceil(num_items / (world * chunk))
    parts = []
    for c in range(rounds):
        start = c * world * chunk + rank * chunk
        ids = torch.arange(start, start + chunk, device=device)
        ids = torch.where(ids < num_items, ids, torch.zeros_like(ids))
        if catalogue is not None:
            ids = catalogue.to(device)[ids]
        emb = model.item_embeddings(ids).float()  # [S, D]
        parts.append(all_gather_cat(emb))  # [W*S, D]
    return torch.cat(parts, 0)[:num_items]


@torch.no_grad()
def evaluate_retrieval(
    model,
    batches: Iterable,
    num_items: int,
    device: torch.device,
    ks: Sequence[int] = (10, 50, 200),
    max_batches: int = 0,
    autocast_dtype=None,
    exclude_history: bool = False,
    catalogue: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """HR@K and NDCG@K of the held-out target among all ``num_items`` items (minus the row's
    history items when ``exclude_history``).

    model: the unwrapped PinFM (``dmp.module``) with ``encode_users(batch) -> [B, D]`` and
    ``item_embeddings(ids [I]) -> [I, D]``. batches: SequenceBatch with target_item [B], weights [B].
    Every rank must iterate the same number of batches (the loader guarantees it).
    catalogue [I]: raw item ids (data.raw_ids: batches carry raw ids): the catalogue ranked is these
    ids, each scored by the row it maps to (embedding.id_mode=managed: its slot, or the shared
    unknown-item row if it was never admitted or evicted).
    """
    was_training = model.training
    model.eval()
    items = all_item_embeddings(model, num_items, device, catalogue=catalogue)  # [I, D]
    to_index = _catalogue_index(catalogue, device) if catalogue is not None else None
    bias_module = getattr(model, "history_bias", None)
    bias = None if bias_module is None else bias_module().detach().float()  # [1]
    sums: Dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            users = model.encode_users(batch)  # [B, D]
        scores = users.float() @ items.t()  # [B, I]
        if to_index is not None:  # raw ids -> catalogue positions
            hist = batch.features[ITEM_KEY]
            batch = SimpleNamespace(target_item=to_index(batch.target_item), weights=batch.weights, features={
                ITEM_KEY: JaggedTensor(values=to_index(hist.values()), lengths=hist.lengths())})
        if bias is not None:
            scores = add_history_bias(scores, batch, bias)
        if exclude_history:
            scores = mask_history(scores, batch)
        ranks = target_ranks(scores, batch.target_item)
        w = batch.weights if batch.weights is not None else torch.ones_like(ranks, dtype=torch.float32)
        for k, v in hr_ndcg_sums(ranks, w, ks).items():
            sums[k] = sums.get(k, 0) + v.to(device)
    model.train(was_training)
    if not sums:
        return {}
    keys = sorted(sums)
    vec = all_reduce_sum(torch.stack([sums[k].to(torch.float64) for k in keys]))
    tot = dict(zip(keys, vec.tolist()))
    count = tot.pop("count")
    out = {k: v / max(count, 1.0) for k, v in tot.items()}
    out["count"] = count
    if bias is not None:
        out["history_bias"] = float(bias)  # the learned w, logged beside the metrics
    return out


def _catalogue_index(catalogue: torch.Tensor, device: torch.device):
    """raw ids [N] -> their positions [N] in ``catalogue`` [I] (ids outside it: position 0)."""
    sorted_raw, order = catalogue.to(device).sort()

    def to_index(raw: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(sorted_raw, raw).clamp(max=sorted_raw.numel() - 1)
        return torch.where(sorted_raw[pos] == raw, order[pos], torch.zeros_like(pos))

    return to_index


def add_history_bias(scores: torch.Tensor, batch, bias: torch.Tensor) -> torch.Tensor:
    """scores [B, I] -> the same with ``bias`` [1] added once to each distinct history item of row b."""
    hist = batch.features[ITEM_KEY]
    rows = torch.repeat_interleave(torch.arange(scores.shape[0], device=scores.device), hist.lengths())  # [L]
    seen = torch.zeros_like(scores, dtype=torch.bool).index_put((rows, hist.values()), torch.tensor(True, device=scores.device))
    return scores + seen.to(scores.dtype) * bias.float()


def mask_history(scores: torch.Tensor, batch) -> torch.Tensor:
    """scores [B, I] -> the same with every history item of row b at -inf, the target kept."""
    hist = batch.features[ITEM_KEY]
    rows = torch.repeat_interleave(torch.arange(scores.shape[0], device=scores.device), hist.lengths())  # [L]
    tgt = batch.target_item[:, None]  # [B, 1]
    keep = scores.gather(1, tgt)
    scores = scores.index_put((rows, hist.values()), torch.tensor(float("-inf"), device=scores.device))
    return scores.scatter(1, tgt, keep)
