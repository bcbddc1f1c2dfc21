"""PinFM: sparse embeddings (TorchRec EC) -> input sum (+ time features) -> causal trunk ->
output head, trained with sampled softmax over shared item embeddings.

Single-device code: the EC is created on ``device`` ("meta" by default, materialised by DMP);
dense parts live on ``dense_device``. One EC call per forward (``embed_tokens``) serves inputs,
positives (``item_id`` rows) and sampled negatives (``neg_item_id`` rows). The encoder for
ranking (``encoder.py``) builds on the same public pieces: ``embed_tokens``, ``project_inputs``,
``trunk``, ``user_vectors``, ``normalize``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from pinfm_rec.data.batch import SequenceBatch
from pinfm_rec.features import ACTION_KEY, EC_FEATURES, ITEM_KEY, NEG_ITEM_KEY, TOKEN_KEYS, vocab_sizes
from pinfm_rec.model.embedding import (
    ITEM_TABLE,
    EmbeddingSpec,
    build_embedding_collection,
    check_ids,
    table_sizes,
)
from pinfm_rec.model.features import TimeFeatures
from pinfm_rec.model.jagged import last_index
from pinfm_rec.model.managed import ManagedTables, with_slots
from pinfm_rec.model.quant_lookup import is_quant_ec, quant_ec_lookup
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
        lpk = kjt._length_per_key  # known (host) per-key lengths: keep them, no host sync later
        kjt = KeyedJaggedTensor(
            keys=keys + missing,
            values=kjt.values(),
            weights=kjt.weights_or_none(),
            lengths=lengths,
            stride=b,
            length_per_key=None if lpk is None else list(lpk) + [0] * len(missing),
        )
        keys = keys + missing
    order = [keys.index(f) for f in features]
    if order != list(range(len(keys))):
        kjt = kjt.permute(order, _order_tensor(order, kjt.values().device))
    return kjt


_ORDER_TENSORS: Dict[Tuple[Tuple[int, ...], torch.device], torch.Tensor] = {}


def _order_tensor(order, device: torch.device) -> Optional[torch.Tensor]:
    """The permute order as a device tensor, made once per (order, device): KJT.permute would copy
    the Python list to the device on every call (a host->device copy per forward, which a CUDA
    graph cannot capture). None under torch.compile / export (permute builds it)."""
    if torch.compiler.is_compiling() or device.type == "meta":
        return None
    key = (tuple(order), device)
    t = _ORDER_TENSORS.get(key)
    if t is None:
        t = torch.tensor(order, dtype=torch.int, device=device)
        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():  # once per (order, device): visible to every stream afterwards
            torch.cuda.current_stream(device).synchronize()
        _ORDER_TENSORS[key] = t
    return t


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


@dataclass
class TokenEmbeddings:
    """What ``PinFM.embed_tokens`` returns for a KJT of B rows.

    x [L, d_model]: trunk inputs of the history tokens; offsets [B+1]; kjt: the KJT after the id
    check (hashed ids in ``id_mode=hash``, slot ids in ``managed``); emb: the EC output, {feature: JaggedTensor} of raw
    table rows [*, dim] (lookup features such as ``neg_item_id`` are read from here).
    """

    x: torch.Tensor
    offsets: torch.Tensor
    kjt: KeyedJaggedTensor
    emb: Dict[str, JaggedTensor]


class HistoryBias(nn.Module):
    """The learned history bias w [1] (similarity units) of ``model.loss.history_bias``: added to the
    logit of every item already in the token's history (``losses.py`` module doc). A module of its own
    so FSDP2 can place it (no parameter sits next to the tables); call it to read w."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self) -> torch.Tensor:
        return self.weight * 1.0  # a fresh tensor: FSDP2 frees the unsharded parameter after forward


class PinFM(nn.Module):
    """PinFM foundation model (pretraining objective + user/item encoders for eval).

    vocab: the vocabulary sizes of the registry's tables, as a mapping {"num_items": ..,
    "num_actions": .., "num_surfaces": ..} or an object with those fields (DatasetInfo,
    RankingInfo); see ``pinfm_rec.features``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        vocab: Any,
        item_counts: Optional[torch.Tensor] = None,
        device: str | torch.device = "meta",
        dense_device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.vocab = vocab_sizes(vocab)
        self.num_items = self.vocab["num_items"]
        self.sizes = table_sizes(spec.embedding, self.vocab)
        dim, d_model = spec.embedding.dim, spec.trunk.d_model
        self.ec = build_embedding_collection(spec.embedding, self.vocab, device=device)
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
        if spec.loss.full_catalogue and spec.embedding.id_mode == "managed":
            raise ValueError("model.loss.full_catalogue needs dense item ids; with embedding.id_mode=managed "
                             "use sampled / in-batch negatives")
        if spec.embedding.id_mode == "managed":
            item_counts = None  # counts are per dense id; managed rows are slots of raw ids
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
        # learned bias of the items already in the history (similarity units; losses.py module doc)
        self.history_bias = HistoryBias().to(dd) if spec.loss.history_bias else None

    # ---- shared pieces (also the encoder's) ----
    def embed_tokens(
        self,
        kjt: KeyedJaggedTensor,
        timestamps: Optional[torch.Tensor] = None,
        request_ts: Optional[torch.Tensor] = None,
        ids_checked: bool = False,
    ) -> TokenEmbeddings:
        """One EC call for every registry feature of ``kjt`` -> trunk inputs of its history tokens.

        kjt: B rows with ``item_id`` (required) and optionally the other token features (a missing
        one leaves its term out of the sum) and lookup features (``neg_item_id``, looked up in the
        same call, read from ``.emb``); other keys are ignored. timestamps [L] (None: no time
        features), request_ts [B] (the time the last token predicts for; None: unknown).
        ids_checked: the ids were range-checked on the host (``data/host_sizes.check_ids_on_host``;
        id mode "error"): the device-side check and its host sync are skipped.
        """
        if ITEM_KEY not in kjt.keys():
            raise ValueError(f"history KJT needs the feature {ITEM_KEY!r}, it has {list(kjt.keys())}")
        if not (ids_checked and self.spec.embedding.id_mode == "error"):
            kjt = check_ids(kjt, self.sizes, self.spec.embedding.id_mode)
        emb, kjt = self.lookup(kjt)  # the one EC call
        offsets = emb[ITEM_KEY].offsets()  # [B+1]
        x = emb[ITEM_KEY].values()  # [L, dim]
        for key in TOKEN_KEYS:
            if key != ITEM_KEY and key in kjt.keys():
                x = x + emb[key].values()
        if self.time is not None and timestamps is not None:
            x = x + self.time(timestamps, offsets, request_ts)
        return TokenEmbeddings(self.project_inputs(x), offsets, kjt, emb)

    def lookup(self, kjt: KeyedJaggedTensor) -> Tuple[Dict[str, JaggedTensor], KeyedJaggedTensor]:
        """The EC call on ``kjt``'s registry features -> ({feature: rows}, ``kjt`` with the ids the
        rows were read at: item ids replaced by their slots in ``id_mode=managed``)."""
        if isinstance(self.ec, ManagedTables):
            emb, slots = self.ec(to_ec_kjt(kjt))
            return emb, with_slots(kjt, slots)
        ec_kjt = to_ec_kjt(kjt)
        if is_quant_ec(self.ec):  # serving tables (int8/int4): the TBE without torchrec's host sync
            emb = quant_ec_lookup(self.ec, ec_kjt)
            if emb is not None:
                return emb, kjt
        return self.ec(ec_kjt), kjt

    def project_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Summed table rows [N, dim] -> trunk inputs [N, d_model] (input scale + projection)."""
        return self.in_proj(x * self.input_scale)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors of the item-embedding space, normalised like the loss (fp32)."""
        return F.normalize(x.float(), dim=-1) if self.spec.loss.l2_norm else x.float()

    def user_vectors(self, h: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Trunk hidden h [L, d_model] jagged by offsets [B+1] -> user vectors [B, dim]: the output
        head at each row's last token, normalised like the loss; zeros for empty rows."""
        lengths = offsets[1:] - offsets[:-1]  # [B]
        if h.shape[0] == 0:
            return h.new_zeros(lengths.numel(), self.spec.embedding.dim).float()
        u = self.normalize(self.head(h[last_index(offsets)]))  # [B, dim]
        return torch.where((lengths > 0)[:, None], u, 0.0)  # scalar branch: no fill kernel

    def _embed(self, batch: SequenceBatch, all_items_as_negatives: bool = False) -> TokenEmbeddings:
        """all_items_as_negatives: the ``neg_item_id`` feature becomes arange(num_items) (the loss's
        full catalogue), looked up in the same EC call."""
        kjt = batch.features
        if all_items_as_negatives:
            ids = torch.arange(self.num_items, device=kjt.values().device)
            kjt = with_feature_values(kjt, NEG_ITEM_KEY, ids)
        return self.embed_tokens(kjt, batch.timestamps, batch.target_timestamp)

    # ---- training ----
    def forward(self, batch: SequenceBatch) -> Dict[str, torch.Tensor]:
        """Losses of one batch: {"next_token", ... , "loss" (weighted total), "num_targets"}."""
        t = self._embed(batch, all_items_as_negatives=self.spec.loss.full_catalogue)
        h = self.head(self.trunk(t.x, t.offsets, batch.max_len))  # [L, dim]
        inputs = LossInputs(
            h=h,
            offsets=t.offsets,
            item_ids=t.kjt[ITEM_KEY].values(),
            actions=t.kjt[ACTION_KEY].values(),
            item_emb=t.emb[ITEM_KEY].values(),
            timestamps=batch.timestamps,
            neg_ids=t.kjt[NEG_ITEM_KEY].values() if NEG_ITEM_KEY in t.kjt.keys() else None,
            neg_emb=t.emb[NEG_ITEM_KEY].values(),
            history_bias=None if self.history_bias is None else self.history_bias(),
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
        t = self._embed(batch)
        return self.user_vectors(self.trunk(t.x, t.offsets, batch.max_len), t.offsets)

    def encode_context(self, batch: SequenceBatch) -> Tuple[torch.Tensor, KVCache]:
        """Histories of a batch -> (trunk hidden [L, d_model], KVCache) for DCAT scoring."""
        t = self._embed(batch)
        return self.trunk.encode_context(t.x, t.offsets, batch.max_len)

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
        return self.normalize(self.lookup(kjt)[0][ITEM_KEY].values())
