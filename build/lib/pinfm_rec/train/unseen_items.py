"""Fine-tuning: the pretrained item rows that pretraining never trained.

An item absent from the pretraining corpus keeps its random init in the pretrained item table
(U(-init_scale, init_scale)), so the encoder sees noise for it: a random direction in the crossing
input and a retrieval score cos(u, e) / tau with a spread of ~1/(sqrt(dim) tau) (2.5 at dim 64,
tau 0.05), of the same order as the scores of real items. On MIND 86% of the test candidates (news
first shown after the train period) are such items against 18% of train candidates, so the ranker
learns to trust a feature that is mostly noise at test time.

``zero_unseen_items`` zeroes those rows after the pretrained weights are loaded: an unseen
candidate then enters the encoder exactly like a candidate whose id was dropped
(``encoder.cand_id_dropout``): candidate-type vector + time feature, retrieval score 0; an unseen
history item adds no item vector to its token. Rows the fine-tuning data trains move away from 0
as usual.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import yaml

from pinfm_rec.data.schema import read_event_columns
from pinfm_rec.features import FEATURE_TABLE, ITEM_KEY
from pinfm_rec.model.pinfm import PinFM

ITEM_TABLE = FEATURE_TABLE[ITEM_KEY]


def pretraining_corpus(checkpoint: str, default: str) -> str:
    """The prepared dir the encoder at ``checkpoint`` was pretrained on (``data.path`` of the
    spec.yaml saved beside it, when that is a prepared dir), else ``default``."""
    p = os.path.join(checkpoint, "spec.yaml")
    if os.path.isfile(p):
        with open(p) as f:
            path = ((yaml.safe_load(f) or {}).get("data") or {}).get("path") or ""
        if path and os.path.isfile(os.path.join(path, "events.parquet")):
            return path
    return default


def unseen_items(pretrain_dir: str, num_items: int) -> np.ndarray:
    """Sorted item ids in [0, num_items) with no event in the prepared corpus ``pretrain_dir``."""
    items = read_event_columns(pretrain_dir, columns=("item_id",))["item_id"]
    counts = np.bincount(items.astype(np.int64), minlength=num_items)[:num_items]
    return np.flatnonzero(counts == 0)


def _zero_rows(t: torch.Tensor, row0: int, rows: np.ndarray) -> int:
    """Zero the global ``rows`` that fall in a local block of ``t`` starting at global row ``row0``."""
    local = rows[(rows >= row0) & (rows < row0 + t.shape[0])] - row0
    if local.size:
        t[torch.from_numpy(local).to(t.device)] = 0
    return int(local.size)


def zero_unseen_items(model: torch.nn.Module, rows: np.ndarray) -> int:
    """Zero ``rows`` of the item table of every ``PinFM`` in ``model`` (DMP-sharded or not; each
    rank writes its local shards, any sharding). Returns the number of rows zeroed on this rank."""
    n = 0
    rows = np.asarray(rows, dtype=np.int64)
    for fm in (m for m in model.modules() if isinstance(m, PinFM)):
        state = fm.state_dict()
        for key, w in state.items():
            if not key.endswith(f"{ITEM_TABLE}.weight"):
                continue
            if hasattr(w, "local_shards"):  # ShardedTensor (table/row/column-wise)
                for s in w.local_shards():
                    n += _zero_rows(s.tensor, int(s.metadata.shard_offsets[0]), rows)
            elif hasattr(w, "to_local"):  # DTensor: rows of the local part from its placement offsets
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
                n += _zero_rows(w.to_local(), int(offset[0]), rows)
            else:
                with torch.no_grad():
                    n += _zero_rows(w, 0, rows)
        fm.load_state_dict(state)
    return n
