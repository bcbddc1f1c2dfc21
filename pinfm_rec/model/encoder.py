"""PinFMEncoder: the pretrained PinFM as a feature extractor for ranking models.

Per batch of U requests with C candidates (a ``RankingBatch``, or TorchRec KJTs: a history KJT and
a candidates KJT of U rows each, see ``model/requests.py``):

1. one EC call (``PinFM.embed_tokens``) looks up the histories (item/action/surface, U rows) and the candidates (under the
   item table's second feature ``neg_item_id``, lengths = candidates per request);
2. context pass: ``trunk.encode_context`` runs each history ONCE and caches K/V per layer;
3. crossing pass: ``trunk.score_candidates`` (DCAT kernel) — candidate j of request r attends r's
   cache plus itself, never the other candidates;
4. features per candidate: [crossing output (d_model), retrieval score cos(u_r, e_j) / tau (1)]
   projected to ``out_dim``; plus the pooled user vector u [U, dim] (the pretrained next-item
   query of the last history token).

``mode="flat"`` computes the same thing the expensive way (each candidate appended to its
request's history, full causal forward): the reference for tests and the baseline for benchmarks.

A candidate token is the candidate's item embedding + a learned candidate-type vector (init 0)
+ the time feature of its gap to the last history event (the request time); it sits at position
n_r.

``forward`` returns the features [C, out_dim] (one fx-opaque call, so TorchRec's train pipeline can
trace a model holding the encoder); ``encode`` returns (features, user vectors).
``from_pretrained`` builds it from an export, ``freeze`` / ``sharding_constraints`` serve a user's
own training code and planner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.ranking_batch import RankingBatch
from pinfm_rec.errors import EncoderError
from pinfm_rec.features import NEG_ITEM_KEY, TOKEN_KEYS
from pinfm_rec.model.pinfm import ModelSpec, PinFM
from pinfm_rec.model.jagged import append_tokens, gather_rows, jagged_index, last_index
from pinfm_rec.model.requests import Requests, requests_from_batch, requests_from_kjt
from pinfm_rec.spec import FieldError, bounds

MODES = ("dcat", "flat")


@dataclass
class EncoderSpec:
    """How the pretrained encoder joins a ranker (owned by model/encoder.py)."""

    init: Literal["pretrained", "random", "none"] = "pretrained"  # none: the ranker alone
    checkpoint: str = ""  # pretraining checkpoint dir or encoder export (init=pretrained)
    freeze: bool = False  # no gradient into tables or trunk (the projection still trains)
    # encoder lr = lr_mult * lr (dense) and * embedding_lr (tables)
    lr_mult: float = field(default=1.0, metadata=bounds(ge=0))
    # train-time prob. of zeroing a candidate's item embedding (cold candidates, data.cold_item_min_count,
    # are zeroed in training and evaluation alike)
    cand_id_dropout: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    out_dim: int = field(default=32, metadata=bounds(ge=1))  # D_out, features per candidate
    kernel: Literal["auto", "triton", "pytorch", "sdpa"] = "auto"  # the DCAT kernel
    # candidates attend the last max_ctx history tokens (0 = all)
    max_ctx: int = field(default=0, metadata=bounds(ge=0))
    # fine-tuning recipe, init=pretrained: "zero" the item rows pretraining never trained (items
    # absent from its corpus keep random init: noise features; train/unseen_items.py)
    unseen_items: Literal["keep", "zero"] = "keep"
    # init of the projection to out_dim: "zero" starts the features at exactly 0, so a ranker fed
    # them starts as the ranker alone and the encoder's contribution grows only as far as training
    # pulls it (zero-init adapter); "default": nn.Linear's init
    proj_init: Literal["default", "zero"] = "default"
    # fine-tuning recipe: "zero" starts the ranker's first dense layer with zero weights on the
    # encoder's out_dim inputs and its own F dense inputs at the ranker alone's init scale (fan-in F,
    # not F + out_dim): the ranker + encoder starts as a draw of the ranker alone, and the encoder's
    # weights grow by gradient (rankers/dlrm.init_encoder_inputs)
    fusion_init: Literal["default", "zero"] = "default"

    def __post_init__(self) -> None:
        if self.fusion_init == "zero" and self.proj_init == "zero":
            raise FieldError("fusion_init", "zero with proj_init=zero: both factors of the encoder's path into "
                                            "the ranker would start at 0 and neither would get a gradient; "
                                            "zero one of them")


@torch.fx.wrap
def _encoder_features(encoder: "PinFMEncoder", batch, candidates, request_ts, mode: str, frozen) -> torch.Tensor:
    """The encoder's features as one leaf call for torch.fx tracing (its jagged bookkeeping and
    host-side sizes are not symbolically traceable)."""
    return encoder._run(batch, candidates, request_ts, mode, frozen)[0]


class AddVector(nn.Module):
    """x [N, D] -> x + weight [D] (a learned type vector, zero-initialised). A module rather than a
    bare Parameter on the encoder, so data-parallel wrappers (FSDP2 units) can own it."""

    def __init__(self, dim: int, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class PinFMEncoder(nn.Module):
    """Pretrained PinFM -> per-candidate features [C, out_dim] and user vectors [U, dim]."""

    def __init__(
        self,
        model_spec: ModelSpec,
        spec: EncoderSpec,
        vocab: Any,
        device: str | torch.device = "meta",
        dense_device: str | torch.device = "cpu",
        feature_names: Optional[Mapping[str, str]] = None,
    ) -> None:
        """vocab: vocabulary sizes of the pretrained tables (``pinfm_rec.features.vocab_sizes``: a
        mapping such as an export's encoder_meta.json, or dataset info). feature_names: KJT key
        of each registry feature in your history/candidate KJTs (``model/requests.py``)."""
        super().__init__()
        self.spec = spec
        self.feature_names = dict(feature_names or {})
        self.fm = PinFM(model_spec, vocab, device=device, dense_device=dense_device)
        dim, d_model = model_spec.embedding.dim, model_spec.trunk.d_model
        self.cand_type = AddVector(dim, device=dense_device)
        self.proj = nn.Linear(d_model + 1, spec.out_dim).to(dense_device)
        if spec.proj_init == "zero":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        self.temperature = model_spec.loss.temperature

    @property
    def out_dim(self) -> int:
        return self.spec.out_dim

    # ---- construction from an export, freezing, sharding ----
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        out_dim: int = 32,
        freeze: bool = False,
        kernel: str = "auto",
        vocab: Optional[Mapping[str, int]] = None,
        feature_names: Optional[Mapping[str, str]] = None,
        device: str | torch.device = "cpu",
        dense_device: str | torch.device = "cpu",
        **spec_kw: Any,
    ) -> "PinFMEncoder":
        """The encoder exported by ``pinfm pretrain`` (``runs/<name>/encoder``) or a pretraining
        checkpoint: architecture and vocabulary sizes are read from ``path``.

        On a real ``device`` the pretrained weights are loaded now; on ``"meta"`` (tables to be
        sharded by DMP) call ``pinfm_rec.model.pretrained.load_pretrained(dmp, path)`` after
        sharding (collective). vocab: your sizes, checked against the export's (EncoderError
        naming ``vocab`` on a mismatch). spec_kw: other ``EncoderSpec`` fields (cand_id_dropout,
        max_ctx, lr_mult).
        """
        from pinfm_rec.model.pretrained import check_vocab, load_pretrained, read_pretrained

        model_spec, saved = read_pretrained(path)
        if vocab is not None:
            check_vocab(path, dict(vocab), saved)
        spec = EncoderSpec(init="pretrained", checkpoint=path, out_dim=out_dim, freeze=freeze, kernel=kernel,
                           **spec_kw)
        enc = cls(model_spec, spec, saved, device=device, dense_device=dense_device, feature_names=feature_names)
        if torch.device(device).type != "meta":
            load_pretrained(enc, path)
        if freeze:
            enc.freeze()
        return enc

    def freeze(self, frozen: bool = True) -> "PinFMEncoder":
        """No gradient into the pretrained part (tables, trunk, time features); the candidate-type
        vector and the projection still train. Dense pretrained parameters get requires_grad=False
        (so DDP/optimizers skip them); tables (fused optimizer) are skipped by running the
        pretrained part without grad."""
        self.spec.freeze = frozen
        for p in self.fm.parameters():
            if p.device.type != "meta":
                p.requires_grad_(not frozen)
        return self

    def sharding_constraints(self) -> Dict[str, Any]:
        """``{table name: torchrec ParameterConstraints}`` of the encoder's tables, for your own
        ``EmbeddingShardingPlanner(constraints=...)``: the sharding each table's ``TableSpec``
        names (all of table_wise/row_wise/column_wise for ``auto``) and the fused kernel."""
        from torchrec.distributed.embedding_types import EmbeddingComputeKernel
        from torchrec.distributed.planner.types import ParameterConstraints

        from pinfm_rec.model.embedding import SHARDING_CHOICES, table_shardings

        fixed = table_shardings(self.fm.spec.embedding)
        auto = [s for s in SHARDING_CHOICES if s != "auto"]
        return {
            table: ParameterConstraints(
                sharding_types=[fixed[table]] if table in fixed else list(auto),
                compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            )
            for table in self.fm.sizes
        }

    # ---- inputs ----
    def _cand_time(self, batch: Requests, offsets: torch.Tensor) -> torch.Tensor:
        """[C, dim] time feature of each candidate token: gap from the last history event to the
        request ("first event" when the history is empty or the request time unknown)."""
        rows = batch.expand_index()  # [C]
        lengths = offsets[1:] - offsets[:-1]
        ts, req_ts = batch.timestamps, batch.request_ts
        if req_ts is None:
            req_ts, lengths = torch.zeros_like(lengths), torch.zeros_like(lengths)
        last_ts = ts[last_index(offsets)] if ts.numel() else torch.zeros_like(lengths)
        return self.fm.time.appended((req_ts - last_ts)[rows], lengths[rows] == 0)

    def _inputs(self, batch: Requests):
        """One EC call for histories and candidates -> (history inputs x [L, d_model], offsets
        [U+1], candidate inputs [C, d_model], candidate item embeddings [C, dim])."""
        fm = self.fm
        hist = batch.features
        cand_len = batch.cand_offsets[1:] - batch.cand_offsets[:-1]  # [U]
        cand_kjt = KeyedJaggedTensor(keys=[NEG_ITEM_KEY], values=batch.cand_item.long(), lengths=cand_len,
                                     stride=batch.num_requests, length_per_key=[batch.cand_item.numel()])
        keys = [k for k in hist.keys() if k in TOKEN_KEYS]
        order = [hist.keys().index(k) for k in keys]
        if order != list(range(len(hist.keys()))):  # (a permute copies its order to the device)
            hist = hist.permute(order)
        kjt = KeyedJaggedTensor.concat([hist, cand_kjt])
        ts = batch.timestamps
        t = fm.embed_tokens(kjt, ts, batch.request_ts, ids_checked=batch.host is not None and batch.host.ids_checked)
        e_cand = t.emb[NEG_ITEM_KEY].values()  # [C, dim]
        if self.training and self.spec.cand_id_dropout > 0:
            keep = torch.rand(e_cand.shape[0], 1, device=e_cand.device) >= self.spec.cand_id_dropout
            e_cand = e_cand * keep
        if batch.cand_cold is not None:  # data.cold_item_min_count: a cold candidate enters as a dropped id
            e_cand = e_cand * (~batch.cand_cold).unsqueeze(-1).to(e_cand.dtype)
        cx = self.cand_type(e_cand)
        if fm.time is not None and ts is not None:
            cx = cx + self._cand_time(batch, t.offsets)
        return t.x, t.offsets, fm.project_inputs(cx), e_cand

    # ---- forward ----
    def forward(
        self,
        batch: Union[RankingBatch, KeyedJaggedTensor],
        candidates: Optional[KeyedJaggedTensor] = None,
        request_ts: Optional[torch.Tensor] = None,
        *,
        mode: str = "dcat",
        frozen: Optional[bool] = None,
    ) -> torch.Tensor:
        """U requests with C candidates -> per-candidate features [C, out_dim], ready to
        concatenate with dense features (``encode`` also returns the user vectors [U, dim]).

        Either a ``RankingBatch``, or TorchRec inputs: ``batch`` = the history KJT (U rows, keys
        mapped by ``self.feature_names``; item ids required, action/surface/timestamp optional),
        ``candidates`` = KJT of U rows with the candidate item ids of each request, ``request_ts``
        [U] optional (see ``model/requests.py``). Features are in candidate order (request-major).
        mode "dcat": context pass once per request + DCAT crossing. mode "flat": every candidate
        appended to its history, full causal forward (same result; the reference/baseline).
        frozen: no gradient into the pretrained part (tables, trunk); the projection still trains.
            None = ``spec.freeze``.
        One opaque call for torch.fx (``_encoder_features``), so TorchRec's train pipeline can
        trace a model that holds the encoder: the encoder's own tables are looked up inside it.
        """
        return _encoder_features(self, batch, candidates, request_ts, mode, frozen)

    def encode(self, batch, candidates=None, request_ts=None, **options) -> Tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s arguments -> (features [C, out_dim], user vectors [U, dim])."""
        return self._run(batch, candidates, request_ts, **options)

    def affinity(self, batch, candidates=None, request_ts=None) -> torch.Tensor:
        """Zero-shot score of each candidate [C]: the pretraining objective's logit of the candidate
        as the request's next item, cos(u_r, e_c) / tau (user vector of the history's last token,
        item embedding normalised like the loss). 0 where the candidate's item row is 0 (e.g. zeroed
        by ``encoder.unseen_items=zero``) or the history is empty. ``forward``'s arguments; context
        pass only (no crossing). In training mode ``cand_id_dropout`` applies (use eval mode)."""
        req = self._requests(batch, candidates, request_ts)
        x, offsets, _, e_cand = self._inputs(req)
        h, _ = self.fm.trunk.encode_context(x, offsets, req.max_len)
        user = self.fm.user_vectors(h, offsets)  # [U, dim]
        return (user[req.expand_index()] * self.fm.normalize(e_cand)).sum(-1) / self.temperature

    def _requests(self, batch, candidates, request_ts) -> Requests:
        if isinstance(batch, RankingBatch):
            if candidates is not None or request_ts is not None:
                raise EncoderError("candidates/request_ts: give them with a history KJT, not with a RankingBatch")
            return requests_from_batch(batch)
        if candidates is None:
            raise EncoderError("candidates: a KJT of the candidate item ids per request is needed with a history KJT")
        return requests_from_kjt(batch, candidates, request_ts, self.feature_names)

    def _run(
        self, batch, candidates, request_ts, mode: str = "dcat", frozen: Optional[bool] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        req = self._requests(batch, candidates, request_ts)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if frozen is None:
            frozen = self.spec.freeze
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            hc, sim, user = self._encode(req, mode)
        return self.proj(torch.cat([hc.float(), sim], -1)), user  # [C, out_dim], [U, dim]

    def _encode(self, batch: Requests, mode: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (crossing output [C, d_model], retrieval score [C, 1], user vectors [U, dim])."""
        fm = self.fm
        trunk = fm.trunk
        x, offsets, cx, e_cand = self._inputs(batch)
        lengths = offsets[1:] - offsets[:-1]  # [U]
        n = batch.max_len
        if mode == "dcat":
            h, cache = trunk.encode_context(x, offsets, n)  # [L, d_model]
            hc = trunk.score_candidates(
                cx, batch.cand_offsets, cache, kernel=self.spec.kernel, max_ctx=self.spec.max_ctx,
                max_cands=batch.max_cands,
            )  # [C, d_model]
        else:
            rows = batch.expand_index()  # [C]
            rep, rep_off = gather_rows(offsets, rows, total=None if batch.host is None else batch.host.dup_total())
            xr = x[rep]  # [sum_c n_r, d_model]: history repeated per candidate
            xa, off_a = append_tokens(xr, rep_off, cx)
            ha = trunk.forward_appended(xa, off_a, n + 1)  # [sum_c (n_r + 1), d_model]
            hc = ha[off_a[1:] - 1]  # [C, d_model]
            h = torch.zeros(x.shape[0], hc.shape[-1], dtype=ha.dtype, device=ha.device)
            if x.shape[0] and ha.shape[0]:  # history outputs from each request's first candidate (causal)
                first = batch.cand_offsets[:-1].clamp(max=max(rows.numel() - 1, 0))
                has = (batch.cand_offsets[1:] > batch.cand_offsets[:-1]) & (lengths > 0)
                src_rows, src_pos = jagged_index(offsets, x.shape[0])
                ok = has[src_rows]
                src = off_a[first[src_rows]] + src_pos
                h = torch.where(ok[:, None], ha[src.clamp(max=ha.shape[0] - 1)], h)
        user = fm.user_vectors(h, offsets)  # [U, dim]
        rows = batch.expand_index()
        sim = (user[rows] * fm.normalize(e_cand)).sum(-1, keepdim=True) / self.temperature  # [C, 1]
        return hc, sim, user
