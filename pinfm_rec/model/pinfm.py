"""PinFM: sparse embeddings (TorchRec EC) -> input sum (+ time features) -> causal trunk ->
output head, trained with sampled softmax over shared item embeddings.

Single-device code: the EC is created on ``device`` ("meta" by default, materialised by DMP);
dense parts live on ``dense_device``. One EC call per forward serves inputs, positives
(``item_id`` rows) and sampled negatives (``neg_item_id`` rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from pinfm_rec.data.batch import ACTION_KEY, ITEM_KEY, NEG_ITEM_KEY, SURFACE_KEY, SequenceBatch
from pinfm_rec.model.embedding import (
    EC_FEATURES,
    ITEM_TABLE,
    EmbeddingSpec,
    build_embedding_collection,
    check_ids,
    table_sizes,
)
from pinfm_rec.model.features import TimeFeatures
from pinfm_rec.model.jagged import last_index
from pinfm_rec.model.losses import LossInputs, LossSpec, sequence_losses
from pinfm_rec.model.trunk import KVCache, Trunk, TrunkSpec


@dataclass
class ModelSpec:
    embedding: EmbeddingSpec = field(default_factory=EmbeddingSpec)
    trunk: TrunkSpec = field(default_factory=TrunkSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    time_features: bool = True
    # Linear(d_model, dim) from the trunk's output to the item-embedding space; false = the
    # trunk output is scored against the item table directly (SASRec), needs d_model == dim
    output_head: bool = True


def to_ec_kjt(kjt: KeyedJaggedTensor, features=EC_FEATURES) -> KeyedJaggedTensor:
    """KJT with exactly the EC's features in the EC's order (missing ones empty, same stride).

    A sharded EC caches the key order of its first input, so every call must use one order.
    """
    keys = list(kjt.keys())
    missing = [f for f in features if f not in keys]
    if missing:
        b = kjt.stride()
        lengths = torch.cat(
            [kjt.lengths(), kjt.lengths().new_zeros(b * len(missing))]
        )
        kjt = KeyedJaggedTensor(
            keys=keys + missing,
            values=kjt.values(),
            weights=kjt.weights_or_none(),
            lengths=lengths,
            stride=b,
        )
        keys = keys + missing
    order = [keys.index(f) for f in features]
    if order != list(range(len(keys))):
        kjt = kjt.permute(order)
    return kjt


def with_feature_values(kjt: KeyedJaggedTensor, key: str, values: torch.Tensor) -> KeyedJaggedTensor:
    """``kjt`` with feature ``key`` replaced by ``values`` [M] (spread over the B rows; the rows of
    a negatives feature carry no meaning). Other features are unchanged; same stride."""
    b = kjt.stride()
    m = values.numel()
    lengths = torch.full((b,), m // b, dtype=torch.long, device=values.device)
    lengths[: m % b] += 1
    jts = {k: jt for k, jt in kjt.to_dict().items() if k != key}
    jts[key] = JaggedTensor(values=values, lengths=lengths)
    return KeyedJaggedTensor.from_jt_dict(jts)


class PinFM(nn.Module):
    """PinFM foundation model (pretraining objective + user/item encoders for eval)."""

    def __init__(
        self,
        spec: ModelSpec,
        num_items: int,
        num_actions: int,
        num_surfaces: int,
        item_counts: Optional[torch.Tensor] = None,
        device: str | torch.device = "meta",
        dense_device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.num_items = int(num_items)
        self.sizes = table_sizes(spec.embedding, num_items, num_actions, num_surfaces)
        dim, d_model = spec.embedding.dim, spec.trunk.d_model
        self.ec = build_embedding_collection(
            spec.embedding, num_items, num_actions, num_surfaces, device=device
        )
        dd = torch.device(dense_device)
        self.time = (
            TimeFeatures(dim, init_scale=spec.embedding.init_scale or 0.03).to(dd)
            if spec.time_features
            else None
        )
        # small tables (fast angular learning of the l2-normalised item vectors) but O(1) inputs:
        # the summed input is scaled by sqrt(dim) (+0.03 HR@10 on ML-1M at 60 epochs vs no scale)
        self.input_scale = float(dim) ** 0.5
        self.in_proj = nn.Linear(dim, d_model).to(dd) if dim != d_model else nn.Identity()
        self.trunk = Trunk(spec.trunk).to(dd)
        if spec.loss.full_catalogue and self.sizes[ITEM_TABLE] < self.num_items:
            raise ValueError(
                f"model.loss.full_catalogue needs an item table of >= num_items ({self.num_items}) "
                f"rows, it has {self.sizes[ITEM_TABLE]}: hashed ids would repeat rows in the softmax"
            )
        if not spec.output_head and d_model != dim:
            raise ValueError(
                f"model.output_head=false needs model.trunk.d_model ({d_model}) == "
                f"model.embedding.dim ({dim})"
            )
        # back to the item-embedding space
        self.head = nn.Linear(d_model, dim).to(dd) if spec.output_head else nn.Identity()
        if item_counts is not None:
            item_counts = item_counts.to(device=dd, dtype=torch.float32)
            if item_counts.numel() < self.sizes[ITEM_TABLE]:
                raise ValueError(
                    f"item_counts has {item_counts.numel()} entries, the item table "
                    f"{self.sizes[ITEM_TABLE]}"
                )
        self.register_buffer("item_counts", item_counts, persistent=False)

    # ---- shared pieces ----
    def _embed(
        self, batch: SequenceBatch, all_items_as_negatives: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor, KeyedJaggedTensor, Dict[str, JaggedTensor]]:
        """-> (token inputs x [L, d_model], offsets [B+1], checked KJT, EC output).

        all_items_as_negatives: the ``neg_item_id`` feature becomes arange(num_items) (the loss's
        full catalogue), looked up in the same EC call.
        """
        kjt = batch.features
        if all_items_as_negatives:
            ids = torch.arange(self.num_items, device=kjt.values().device)
            kjt = with_feature_values(kjt, NEG_ITEM_KEY, ids)
        kjt = check_ids(kjt, self.sizes, self.spec.embedding.id_mode)
        emb = self.ec(to_ec_kjt(kjt))  # the one EC call
        items = emb[ITEM_KEY]
        offsets = items.offsets()  # [B+1]
        x = items.values() + emb[ACTION_KEY].values() + emb[SURFACE_KEY].values()  # [L, dim]
        if self.time is not None:
            x = x + self.time(batch.timestamps, offsets, batch.target_timestamp)
        return self.in_proj(x * self.input_scale), offsets, kjt, emb

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1) if self.spec.loss.l2_norm else x.float()

    # ---- training ----
    def forward(self, batch: SequenceBatch) -> Dict[str, torch.Tensor]:
        """Losses of one batch: {"next_token", ... , "loss" (weighted total), "num_targets"}."""
        x, offsets, kjt, emb = self._embed(batch, all_items_as_negatives=self.spec.loss.full_catalogue)
        h = self.head(self.trunk(x, offsets, batch.max_len))  # [L, dim]
        inputs = LossInputs(
            h=h,
            offsets=offsets,
            item_ids=kjt[ITEM_KEY].values(),
            actions=kjt[ACTION_KEY].values(),
            item_emb=emb[ITEM_KEY].values(),
            timestamps=batch.timestamps,
            neg_ids=kjt[NEG_ITEM_KEY].values() if NEG_ITEM_KEY in kjt.keys() else None,
            neg_emb=emb[NEG_ITEM_KEY].values(),
        )
        return sequence_losses(
            self.spec.loss, inputs, num_items=self.num_items, item_counts=self.item_counts,
            id_space=self.sizes[ITEM_TABLE],
        )

    # ---- eval / serving ----
    def encode_users(self, batch: SequenceBatch) -> torch.Tensor:
        """User embedding [B, dim]: output at each row's last token, normalised like the loss.

        Rows with an empty history get zeros.
        """
        x, offsets, _, _ = self._embed(batch)
        h = self.head(self.trunk(x, offsets, batch.max_len))  # [L, dim]
        lengths = offsets[1:] - offsets[:-1]  # [B]
        last = last_index(offsets)
        if h.shape[0] == 0:
            return h.new_zeros(lengths.numel(), h.shape[-1]).float()
        u = self._normalize(h[last])  # [B, dim]
        return torch.where((lengths > 0)[:, None], u, torch.zeros_like(u))

    def encode_context(self, batch: SequenceBatch) -> Tuple[torch.Tensor, KVCache]:
        """Histories of a batch -> (trunk hidden [L, d_model], KVCache) for DCAT scoring."""
        x, offsets, _, _ = self._embed(batch)
        return self.trunk.encode_context(x, offsets, batch.max_len)

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """item_ids [I] -> [I, dim] output-space item embeddings (normalised like the loss).

        Looks up through the EC with a KJT holding ALL of its features (others empty), so it
        works on a sharded EC; with a sharded EC every rank must call it (collective).
        """
        n = item_ids.numel()
        dev = item_ids.device
        lengths = torch.zeros(len(EC_FEATURES), dtype=torch.long, device=dev)  # stride 1
        lengths[EC_FEATURES.index(ITEM_KEY)] = n
        kjt = KeyedJaggedTensor(
            keys=list(EC_FEATURES),
            values=item_ids.long(),
            lengths=lengths,
            stride=1,
            length_per_key=[n if f == ITEM_KEY else 0 for f in EC_FEATURES],
        )
        kjt = check_ids(kjt, self.sizes, self.spec.embedding.id_mode)
        return self._normalize(self.ec(kjt)[ITEM_KEY].values())
