"""The pretrained PinFM encoder joined to an unchanged TorchRec ranker (DLRM / DLRM_DCN).

The ranker keeps its own sparse features in its own ``EmbeddingBagCollection`` (the candidate's
item id and the bag of the request's last history items) and its dense arch. The encoder's
per-candidate features ``[C, out_dim]`` are appended to the ranker's dense features, so the
ranker's ``dense_in_features`` grows by ``out_dim`` and nothing else about it changes:

    logits [C] = ranker(dense_features = cat(batch.dense [C, F], encoder(batch) [C, out_dim]),
                        sparse_features = ranker_features(batch))     # KJT with C rows

Plugging the encoder into your own TorchRec model is the same three lines (see
``docs/finetune.md``): run ``encoder(batch)`` on the request-deduplicated batch, concatenate
its output to whatever per-candidate dense input your model has, and expand per-request sparse
features on the device with ``batch.expand_index()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.batch import ITEM_KEY
from pinfm_rec.data.ranking_batch import RankingBatch
from pinfm_rec.model.embedding import check_ids
from pinfm_rec.model.encoder import PinFMEncoder
from pinfm_rec.model.jagged import gather_rows, jagged_index, shared_index
from pinfm_rec.spec import FieldError, bounds

CAND_FEATURE = "r_cand_item"
HIST_FEATURE = "r_hist_items"
RANKER_TABLES = {"t_r_cand": CAND_FEATURE, "t_r_hist": HIST_FEATURE}


@dataclass
class RankerSpec:
    """The TorchRec ranker (owned by rankers/dlrm.py)."""

    arch: Literal["dlrm", "dlrm_dcn"] = "dlrm"  # torchrec.models.dlrm, unchanged
    embedding_dim: int = field(default=32, metadata=bounds(ge=1))  # = dense_arch[-1] (DLRM requires it)
    dense_arch: List[int] = field(default_factory=lambda: [64, 32], metadata=bounds(ge=1))
    over_arch: List[int] = field(default_factory=lambda: [64, 32, 1], metadata=bounds(ge=1))
    dcn_num_layers: int = field(default=2, metadata=bounds(ge=1))
    dcn_low_rank_dim: int = field(default=16, metadata=bounds(ge=1))
    # the ranker's own history feature: the last N history items (0 = off)
    history_bag_len: int = field(default=50, metadata=bounds(ge=0))

    def __post_init__(self) -> None:
        if not self.dense_arch or self.dense_arch[-1] != self.embedding_dim:
            raise FieldError(
                "dense_arch", f"must end with ranker.embedding_dim={self.embedding_dim} (DLRM interacts "
                f"them), got {self.dense_arch}"
            )
        if not self.over_arch or self.over_arch[-1] != 1:
            raise FieldError("over_arch", f"must end with 1 (one logit), got {self.over_arch}")


def build_ranker(
    spec: RankerSpec, num_items: int, dense_in_features: int, device: str | torch.device = "meta",
    dense_device: str | torch.device = "cpu",
) -> nn.Module:
    """An unchanged ``DLRM`` / ``DLRM_DCN`` whose EmbeddingBagCollection (on ``device``) holds the
    candidate-item table and the history-bag table (mean pooling)."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    tables = [
        EmbeddingBagConfig(
            num_embeddings=num_items, embedding_dim=spec.embedding_dim, name=name, feature_names=[feat],
            pooling=PoolingType.SUM if feat == CAND_FEATURE else PoolingType.MEAN,
        )
        for name, feat in RANKER_TABLES.items()
        if feat == CAND_FEATURE or spec.history_bag_len > 0
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device))
    kw = dict(embedding_bag_collection=ebc, dense_in_features=dense_in_features,
              dense_arch_layer_sizes=list(spec.dense_arch), over_arch_layer_sizes=list(spec.over_arch),
              dense_device=torch.device(dense_device))
    if spec.arch == "dlrm_dcn":
        model = DLRM_DCN(dcn_num_layers=spec.dcn_num_layers, dcn_low_rank_dim=spec.dcn_low_rank_dim, **kw)
    else:
        model = DLRM(**kw)
    place_interaction_indices(model, dense_device)  # training and serving: no H2D copy per forward
    return model


def init_encoder_inputs(ranker: nn.Module, num_dense: int, out_dim: int) -> None:
    """``encoder.fusion_init=zero``: the first Linear of ``ranker.dense_arch`` (inputs = the F=num_dense
    dense features, then the encoder's out_dim features) gets zero weights on the encoder's columns,
    and its F columns and bias are rescaled by sqrt((F + out_dim) / F), from nn.Linear's
    U(+-1/sqrt(F + out_dim)) to the ranker alone's U(+-1/sqrt(F)). At init the ranker's output
    then does not depend on the encoder and is distributed as the ranker alone's; the encoder's
    columns get gradients (its features are not 0) and grow only as far as training pulls them."""
    lin = next((m for m in ranker.dense_arch.modules() if isinstance(m, nn.Linear)), None)
    if lin is None or lin.in_features != num_dense + out_dim:
        raise ValueError(f"init_encoder_inputs: the ranker's first dense Linear takes "
                         f"{None if lin is None else lin.in_features} inputs, expected {num_dense} + {out_dim}")
    with torch.no_grad():
        if num_dense > 0:
            scale = ((num_dense + out_dim) / num_dense) ** 0.5
            lin.weight[:, :num_dense] *= scale
            if lin.bias is not None:
                lin.bias *= scale
        lin.weight[:, num_dense:] = 0


def ranker_features(batch: RankingBatch, history_bag_len: int) -> KeyedJaggedTensor:
    """KJT with C rows (one per candidate), expanded on the device from the deduplicated batch:
    ``r_cand_item`` (1 id per row) and ``r_hist_items`` (the last ``history_bag_len`` history
    items of the candidate's request). A cold candidate (``batch.cand_cold`` [C], data.cold_item_min_count)
    has an empty ``r_cand_item`` bag: its SUM-pooled id embedding is 0 and its id row gets no gradient.
    A batch that carries this KJT built on the host for the same bag length and candidate count
    (``batch.ranker_sparse``, the scorer's ``prepare``, never with cold candidates) returns it: the
    same ids, no device work. (A prepared batch whose candidates or history are edited afterwards
    must drop it: ``dataclasses.replace(batch, ranker_sparse=None)``.)"""
    pre = batch.ranker_sparse
    if pre is not None and batch.ranker_bag_len == history_bag_len and batch.cand_cold is None \
            and pre.stride() == batch.num_candidates:
        return pre
    c = batch.num_candidates
    dev = batch.cand_item.device
    keys = [CAND_FEATURE]
    if batch.cand_cold is None:
        values = [batch.cand_item.long()]
        lengths = [torch.ones(c, dtype=torch.long, device=dev)]
        lpk: Optional[List[int]] = [c]  # per-key lengths on the host when batch.host has them (no sync in the EBC)
    else:
        warm = ~batch.cand_cold  # [C]
        values = [batch.cand_item.long()[warm]]
        lengths = [warm.long()]
        lpk = None
    if history_bag_len > 0:
        hist = batch.history.features[ITEM_KEY]
        # the last history_bag_len items of each candidate's request, expanded per candidate
        total = batch.host.bag_total(history_bag_len) if batch.host is not None else None
        rows = jagged_index(batch.cand_offsets, c)[0]  # = batch.expand_index(), shared with the encoder's
        index, off = gather_rows(hist.offsets(), rows, keep_last=history_bag_len, total=total)
        keys.append(HIST_FEATURE)
        values.append(hist.values()[index])
        lengths.append(off[1:] - off[:-1])
        lpk = None if total is None or lpk is None else lpk + [total]
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=c,
                             length_per_key=lpk)


def ranker_features_host(batch: RankingBatch, history_bag_len: int) -> KeyedJaggedTensor:
    """``ranker_features`` of a CPU batch in numpy (a scoring request's host preparation: a few
    array ops instead of ~20 small torch ops: ~5x less host time on a CPU), the same KJT value for value,
    with its per-key lengths and offsets cached (the torch code with cold candidates, ``cand_cold``)."""
    if batch.cand_cold is not None or batch.cand_item.device.type != "cpu":
        kjt = ranker_features(batch, history_bag_len)
    else:
        import numpy as np

        c = batch.num_candidates
        co = batch.cand_offsets.numpy()
        values = [batch.cand_item.long().numpy()]
        lengths = [np.ones(c, dtype=np.int64)]
        if history_bag_len > 0:
            hist = batch.history.features[ITEM_KEY]
            ho = hist.offsets().numpy()
            per_req = np.diff(co)  # candidates per request [U]
            keep = np.minimum(np.diff(ho), history_bag_len)  # [U] bag length per request
            lc = np.repeat(keep, per_req)  # [C]
            start = np.repeat(ho[1:] - keep, per_req)  # [C] first kept history element
            ends = np.cumsum(lc)
            m = int(ends[-1]) if c else 0
            index = np.repeat(start - (ends - lc), lc) + np.arange(m)  # [M]
            values.append(hist.values().numpy()[index])
            lengths.append(lc.astype(np.int64))
        kjt = KeyedJaggedTensor(
            keys=[CAND_FEATURE] + ([HIST_FEATURE] if history_bag_len > 0 else []),
            values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate(lengths)), stride=c,
            length_per_key=[int(v.size) for v in values])
    kjt.offsets(), kjt.length_per_key(), kjt.offset_per_key()  # cached on the KJT: no device work later
    return kjt


class RankerWithEncoder(nn.Module):
    """An unchanged TorchRec ranker + (optionally) the PinFM encoder feeding its dense input.

    forward(batch) -> {"loss": weighted BCE (mean), "bce": the same (detached), "num_targets": C};
    logits(batch) -> [C].
    """

    def __init__(self, ranker: nn.Module, encoder: Optional[PinFMEncoder], history_bag_len: int,
                 freeze_encoder: bool = False, num_items: Optional[int] = None,
                 id_mode: str = "error") -> None:
        """num_items: rows of the ranker's item tables; when given, the ranker's ids are checked
        (``id_mode`` "error": a clear error naming the feature and id) or hashed ("hash") like
        the encoder's, before they reach the EmbeddingBagCollection."""
        super().__init__()
        self.ranker_sizes = (
            {CAND_FEATURE: int(num_items), HIST_FEATURE: int(num_items)} if num_items else None
        )
        self.id_mode = id_mode
        self.ranker = ranker
        self.encoder = encoder
        self.history_bag_len = history_bag_len
        self.freeze_encoder = freeze_encoder
        self.mode = "dcat"  # "flat": the encoder appends each candidate to its history (baseline)

    def logits(self, batch: RankingBatch) -> torch.Tensor:
        """batch (U requests, C candidates) -> logits [C]."""
        with shared_index():  # the candidate/token indices are built once per forward
            return self._logits(batch)

    def _logits(self, batch: RankingBatch) -> torch.Tensor:
        dense = batch.dense.float()
        if self.encoder is not None:
            feats = self.encoder(batch, mode=self.mode, frozen=self.freeze_encoder)
            dense = torch.cat([dense, feats.to(dense.dtype)], -1)  # [C, F + out_dim]
        sparse = ranker_features(batch, self.history_bag_len)
        checked = batch.host is not None and batch.host.ids_checked and self.id_mode == "error"
        if self.ranker_sizes is not None and not checked:  # checked on the host: no device check (a sync)
            sparse = check_ids(sparse, self.ranker_sizes, self.id_mode)
        return self.ranker(dense, sparse).squeeze(-1).float()

    def forward(self, batch: RankingBatch) -> Dict[str, torch.Tensor]:
        logits = self.logits(batch)
        w = batch.weights if batch.weights is not None else torch.ones_like(logits)
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels.float(), reduction="none")
        loss = (bce * w).sum() / w.sum().clamp_min(1.0)
        return {"loss": loss, "bce": loss.detach(), "num_targets": w.sum().detach()}


def place_interaction_indices(model: nn.Module, device: torch.device) -> None:
    """Moves every DLRM ``InteractionArch.triu_indices`` to ``device``. It is a non-persistent
    buffer created on the CPU by ``DLRM.__init__`` (no device argument), and a ranker built with
    ``dense_device=cuda`` is never ``.to()``-moved as a whole, so it stays there: every forward on a
    GPU then indexes with a host tensor, an H2D copy per call that a CUDA graph cannot capture
    (measured on an H100: capture failed at torchrec/models/dlrm.py:220)."""
    device = torch.device(device)
    for m in model.modules():
        t = m._buffers.get("triu_indices")  # a registered buffer in torchrec 1.6.1 and 1.8
        if t is not None and t.device != device:
            m._buffers["triu_indices"] = t.to(device)
