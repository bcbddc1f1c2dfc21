"""PinFM training losses: sampled softmax over shared negatives, vectorised over jagged rows.

Every query token t (hidden state h_t [D]) is scored against its positive(s) and one shared set of
M negatives = in-batch targets (sampled) ++ uniformly sampled ids (``neg_item_id``):

    logit(t, i) = sim(h_t, e_i) / temperature  - [negatives only] logQ_i
    ce(t, pos)  = -logit(t, pos) + log(exp(logit(t, pos)) + sum_{n not masked} exp(logit(t, n)))

sim is the cosine when ``l2_norm`` (else the dot product).

logQ (``logq_correction``): negatives are drawn from a mixture, so each negative i is corrected by
the log of its expected number of occurrences in the whole negative set,
    logQ_i = log(M_b * q_b(i) + K_u / num_items),
q_b(i) = i's share of the batch's next-token targets (or of ``item_counts`` when given), M_b the
number of in-batch negatives, K_u the number of uniform negatives; a term is present only when its
pool is on. With one pool this is log(M_b * share) resp. log(K_u / num_items): the shifts of the
classic in-batch and uniform corrections (a pool-wide constant only differs when pools are mixed).

Full catalogue (``full_catalogue``): the negatives are all I items, column i = item i, no logQ,
and the next-token loss is the exact softmax cross-entropy over the catalogue
    ce(t, pos) = -logit(t, pos) + logsumexp_i logit(t, i)
(with ``user_masking`` the other items of the row are removed from the sum, the positive kept).

History bias (``history_bias``): one learned scalar w (similarity units; the model's
``history_bias`` parameter, passed as ``LossInputs.history_bias``) is added, as w / temperature, to
logit(t, i) of every item i that occurs in t's row at or before t (positive or negative). The data
decides its sign: where users do not repeat items (ML-1M ratings) it learns a large negative value
and the softmax stops spending mass on the history; where they do (re-purchases, re-plays) it learns a
positive one. Evaluation adds the same w to the history items' scores (``train/evaluate.py``). It
needs ``user_masking=false`` (masking removes the history negatives the bias is learned from).

Masking: with ``user_masking`` a negative whose id occurs anywhere in the token's row gets -inf
(computed per row [B, M], then gathered to tokens); this includes every positive of the row. Without
it, only negatives equal to the next-token positive are masked (accidental hits), and only for the
next-token loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from pinfm_rec.model.jagged import jagged_index
from pinfm_rec.spec import FieldError, bounds


@dataclass
class LossSpec:
    temperature: float = field(default=0.05, metadata=bounds(gt=0))
    l2_norm: bool = True
    # batch targets sampled as shared negatives (0 = off)
    in_batch_negatives: int = field(default=1024, metadata=bounds(ge=0))
    use_sampled_negatives: bool = True  # the neg_item_id rows
    logq_correction: bool = True
    user_masking: bool = True
    engaged_actions: List[int] = field(default_factory=lambda: [1, 2], metadata=bounds(ge=0))
    positives_only_engaged: bool = True
    next_token_weight: float = field(default=1.0, metadata=bounds(ge=0))
    # each of the next K engaged items is a positive for h_t
    multi_token_k: int = field(default=0, metadata=bounds(ge=0))
    multi_token_weight: float = field(default=0.0, metadata=bounds(ge=0))
    # engaged items within this many seconds after t are positives
    future_window_s: int = field(default=0, metadata=bounds(ge=0))
    future_weight: float = field(default=0.0, metadata=bounds(ge=0))
    # cap on future-window positives per token (memory O(L * cap))
    future_max_targets: int = field(default=32, metadata=bounds(ge=1))
    # exact softmax over the whole catalogue: the model passes every item id as the negatives
    # (neg_ids == arange(num_items)); in-batch negatives and logQ are then off. Memory is
    # O(tokens * I) fp32 logits (+ their softmax for backward): 25.6k tokens x 3.4k items (ML-1M)
    # = 0.35 GB; for catalogues beyond a few 10^4 items use the sampled negatives instead.
    full_catalogue: bool = False
    # a learned scalar added to the logit of every item already in the token's prefix (module doc)
    history_bias: bool = False

    def __post_init__(self) -> None:
        if self.history_bias and self.user_masking:
            raise FieldError(
                "history_bias", "true with user_masking=true: masking removes the row's items from the "
                "negatives, so the bias would only ever raise positives; set user_masking=false"
            )
        if not self.full_catalogue and self.in_batch_negatives <= 0 and not self.use_sampled_negatives:
            raise FieldError(
                "in_batch_negatives", "0 with use_sampled_negatives=false leaves no negatives: set "
                "in_batch_negatives > 0, use_sampled_negatives=true (with data.num_negatives_per_row > 0) "
                "or full_catalogue=true"
            )
        for k_key, k, w_key, w in (("multi_token_k", self.multi_token_k, "multi_token_weight", self.multi_token_weight),
                                   ("future_window_s", self.future_window_s, "future_weight", self.future_weight)):
            if (k > 0) != (w > 0):
                raise FieldError(
                    w_key, f"{w} with {k_key}={k}: set both > 0 to use the objective, or both to 0"
                )


def _safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim; -inf (with finite gradients) where every entry is -inf."""
    dead = torch.isneginf(x).all(-1)  # [Q]
    x = torch.where(dead[..., None], torch.zeros_like(x), x)
    return torch.where(dead, torch.full_like(dead, float("-inf"), dtype=x.dtype), torch.logsumexp(x, -1))


def _row_membership(
    rows: torch.Tensor, ids: torch.Tensor, num_rows: int, cand: torch.Tensor, num_items: int
) -> torch.Tensor:
    """[B, M] bool: cand[m] occurs among ids of row b (ids [L] jagged with row ids rows [L])."""
    if ids.numel() == 0 or cand.numel() == 0:
        return torch.zeros(num_rows, cand.numel(), dtype=torch.bool, device=cand.device)
    keys = torch.sort(rows * num_items + ids).values  # [L]
    q = torch.arange(num_rows, device=ids.device)[:, None] * num_items + cand[None, :]  # [B, M]
    at = torch.searchsorted(keys, q).clamp(max=keys.numel() - 1)
    return keys[at] == q


def _next_qualifying(
    qual: torch.Tensor, row_end: torch.Tensor, k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each token t, the positions of the next k qualifying tokens after t in its row.

    Returns (idx [L, k] long, valid [L, k] bool). Vectorised via the global qualifying rank.
    """
    total = qual.numel()
    qpos = torch.nonzero(qual).squeeze(1)  # [Q] ascending
    if qpos.numel() == 0 or k <= 0:
        z = torch.zeros(total, max(k, 0), dtype=torch.long, device=qual.device)
        return z, z.bool()
    rank = torch.cumsum(qual.long(), 0)  # [L] qualifying tokens at or before t
    r = rank[:, None] + torch.arange(k, device=qual.device)[None, :]  # [L, k]
    valid = r < qpos.numel()
    idx = qpos[r.clamp(max=qpos.numel() - 1)]  # [L, k]
    return idx, valid & (idx < row_end[:, None])


@dataclass
class LossInputs:
    """What the losses read of one batch: trunk outputs and the ids/embeddings of its tokens.

    h [L, D] trunk outputs in the item-embedding space, jagged by offsets [B+1]; item_ids,
    actions [L] and timestamps [L] (optional: only the future-window objective needs them);
    item_emb [L, D] embeddings of item_ids (positives and in-batch negatives come from it);
    neg_ids [K_u], neg_emb [K_u, D] the sampled negatives (None: none in this batch);
    history_bias [1] the learned history bias w in similarity units (None: off; module doc).
    """

    h: torch.Tensor
    offsets: torch.Tensor
    item_ids: torch.Tensor
    actions: torch.Tensor
    item_emb: torch.Tensor
    timestamps: Optional[torch.Tensor] = None
    neg_ids: Optional[torch.Tensor] = None
    neg_emb: Optional[torch.Tensor] = None
    history_bias: Optional[torch.Tensor] = None


@dataclass
class _Targets:
    """Positives of each objective. rows [L] row of each token; nt_tok/nt_pos [T] next-token
    query token and its positive; groups {objective: (idx [L, K], valid [L, K])} of the
    multi-positive objectives; prefix: the first occurrences of the row's ids (history bias only)."""

    rows: torch.Tensor
    nt_tok: torch.Tensor
    nt_pos: torch.Tensor
    groups: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    prefix: Optional["_Prefix"] = None


class _Prefix:
    """Where each id first occurs in each row: answers "is id i in row b at or before position p"
    for the history bias. rows [L], ids [L] jagged by offsets [B+1]; id_space bounds the ids."""

    def __init__(self, rows: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, id_space: int) -> None:
        self.id_space, self.num_rows = id_space, offsets.numel() - 1
        self.pos = torch.arange(ids.numel(), device=ids.device) - offsets[rows]  # [L] position in its row
        keys, order = torch.sort(rows * id_space + ids, stable=True)  # equal keys keep position order
        self.keys, self.first = keys, self.pos[order]  # [L]: the first of a run of equal keys is the first occurrence

    def first_pos(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """First position of ids in rows (broadcast shapes) -> int64, a huge value where absent."""
        q = rows * self.id_space + ids
        if self.keys.numel() == 0:
            return torch.full_like(q, torch.iinfo(torch.int64).max)
        at = torch.searchsorted(self.keys, q).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[at] == q, self.first[at], torch.iinfo(torch.int64).max)

    def seen(self, tok: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[N, K] bool: ids [N, K] occur in the row of token tok [N] (rows [L]) at or before it."""
        return self.first_pos(rows[tok][:, None], ids) <= self.pos[tok][:, None]

    def seen_rows(self, tok: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """[N, M] bool: the shared candidates cand [M] seen at or before each token tok [N]; the
        first positions are computed per row ([B, M]) and gathered to the tokens."""
        b = torch.arange(self.num_rows, device=cand.device)[:, None]
        first = self.first_pos(b, cand[None, :]).clamp(max=torch.iinfo(torch.int32).max).int()  # [B, M]
        return first[rows[tok]] <= self.pos[tok][:, None].int()


def _with_bias(logits: torch.Tensor, seen: torch.Tensor, bias: torch.Tensor, tau: float) -> torch.Tensor:
    """logits + bias / tau where seen (same shape)."""
    return logits + seen.to(logits.dtype) * (bias.float() / tau)


@dataclass
class _Negatives:
    """The shared negatives: ids [M], emb [M, D] (normalised like the queries); m_b in-batch and
    k_u sampled ones (M = m_b + k_u)."""

    ids: torch.Tensor
    emb: torch.Tensor
    m_b: int
    k_u: int


def sequence_losses(
    spec: LossSpec,
    inputs: LossInputs,
    *,
    num_items: int,
    item_counts: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    id_space: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Next-token (+ optional multi-token / future-window) sampled-softmax losses of ``inputs``.

    num_items is the uniform sampler's range (logQ); item_counts [num_items] optional train counts
    for the in-batch logQ; id_space (default num_items) bounds every id (row-membership keys).
    Returns scalar tensors: "next_token", "multi_token", "future_token" (those enabled), "loss"
    (weighted total), "num_targets" (number of next-token targets, no grad). Memory O(L * (M + K)).
    Runs in fp32 with autocast off.
    """
    with torch.autocast(device_type=inputs.h.device.type, enabled=False):
        hn, en = _normalize(spec, inputs.h), _normalize(spec, inputs.item_emb)
        tg = _targets(spec, inputs)
        if inputs.history_bias is not None:
            tg.prefix = _Prefix(tg.rows, inputs.item_ids, inputs.offsets, max(num_items, id_space or 0))
        negs = _negatives(spec, inputs, tg, en, num_items, generator)
        logq = _logq(spec, inputs, tg, negs, num_items, item_counts)
        q_of_tok, lse, neg_logits = _negative_logsumexp(
            spec, inputs, tg, negs, hn, logq, max(num_items, id_space or 0)
        )
        return _reduce(spec, inputs, tg, negs, hn, en, q_of_tok, lse, neg_logits)


def _normalize(spec: LossSpec, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1) if spec.l2_norm else x.float()


def _targets(spec: LossSpec, inputs: LossInputs) -> _Targets:
    """Positives: the next token when it qualifies (engaged), and the multi-token / future-window
    positives (the next qualifying tokens of the row, within the window)."""
    actions, offsets = inputs.actions, inputs.offsets
    total, dev = inputs.item_ids.numel(), inputs.h.device
    rows, _ = jagged_index(offsets, total)  # [L]
    row_end = offsets[1:][rows]  # [L] exclusive end of each token's row
    if spec.positives_only_engaged:
        qual = torch.isin(actions, torch.tensor(spec.engaged_actions, dtype=actions.dtype, device=dev))  # [L]
    else:
        qual = torch.ones(total, dtype=torch.bool, device=dev)
    has_next = (torch.arange(total, device=dev) + 1) < row_end
    nt_tok = torch.nonzero(has_next & torch.roll(qual, -1)).squeeze(1)  # [T]
    groups = {}
    if spec.multi_token_k > 0 and spec.multi_token_weight > 0:
        groups["multi_token"] = _next_qualifying(qual, row_end, spec.multi_token_k)
    if spec.future_window_s > 0 and spec.future_weight > 0:
        ts = inputs.timestamps
        if ts is None:
            raise ValueError("future-token loss needs timestamps")
        idx, valid = _next_qualifying(qual, row_end, spec.future_max_targets)
        groups["future_token"] = (idx, valid & ((ts[idx] - ts[:, None]) <= spec.future_window_s))
    return _Targets(rows=rows, nt_tok=nt_tok, nt_pos=nt_tok + 1, groups=groups)


def _negatives(
    spec: LossSpec, inputs: LossInputs, tg: _Targets, en: torch.Tensor, num_items: int,
    generator: Optional[torch.Generator],
) -> _Negatives:
    """In-batch negatives (next-token targets, subsampled to ``in_batch_negatives``) ++ the
    sampled ids (all items with ``full_catalogue``)."""
    neg_ids, n_t, full = inputs.neg_ids, tg.nt_tok.numel(), spec.full_catalogue
    if full and (neg_ids is None or neg_ids.numel() != num_items):
        raise ValueError(
            f"loss.full_catalogue needs neg_ids == arange(num_items={num_items}), got "
            f"{0 if neg_ids is None else neg_ids.numel()} ids"
        )
    ids, embs = [], []
    if spec.in_batch_negatives > 0 and n_t > 0 and not full:
        sel = tg.nt_pos
        if n_t > spec.in_batch_negatives:
            perm = torch.randperm(n_t, device=sel.device, generator=generator)[: spec.in_batch_negatives]
            sel = sel[perm]
        ids.append(inputs.item_ids[sel])
        embs.append(en[sel])
    m_b = ids[0].numel() if ids else 0
    k_u = 0
    if (spec.use_sampled_negatives or full) and neg_ids is not None and neg_ids.numel() > 0:
        k_u = neg_ids.numel()
        ids.append(neg_ids)
        embs.append(_normalize(spec, inputs.neg_emb))
    if not ids:
        if n_t > 0:
            raise ValueError(
                "sequence_losses: this batch has next-token targets but no negatives (in-batch negatives "
                "off and no sampled ids: is data.num_negatives_per_row 0 while the loss expects them?)"
            )
        return _Negatives(inputs.item_ids.new_zeros(0), en.new_zeros(0, en.shape[-1]), 0, 0)
    return _Negatives(torch.cat(ids), torch.cat(embs), m_b, k_u)  # [M], [M, D]


def _logq(
    spec: LossSpec, inputs: LossInputs, tg: _Targets, negs: _Negatives, num_items: int,
    item_counts: Optional[torch.Tensor],
) -> Optional[torch.Tensor]:
    """logQ [M]: log of each negative's expected occurrences in the negative set (module doc)."""
    if not spec.logq_correction or negs.ids.numel() == 0 or spec.full_catalogue:
        return None
    dev = inputs.h.device
    expected = torch.zeros(negs.ids.numel(), device=dev)
    if negs.m_b > 0:
        if item_counts is not None:
            c = item_counts.to(device=dev, dtype=torch.float32)
            share = c[negs.ids] / c.sum().clamp_min(1.0)
        else:
            tgt = torch.sort(inputs.item_ids[tg.nt_pos]).values
            cnt = torch.searchsorted(tgt, negs.ids, right=True) - torch.searchsorted(tgt, negs.ids)
            share = cnt.float() / tg.nt_tok.numel()
        expected = expected + negs.m_b * share
    if negs.k_u > 0:
        expected = expected + negs.k_u / float(num_items)
    return torch.log(expected.clamp_min(1e-12))  # [M]


def _negative_logsumexp(
    spec: LossSpec, inputs: LossInputs, tg: _Targets, negs: _Negatives, hn: torch.Tensor,
    logq: Optional[torch.Tensor], id_space: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of the query tokens (tokens with any positive) against the negatives, logQ-shifted
    and user-masked -> (query index of each token q_of_tok [L], logsumexp [Q], logits [Q, M])."""
    need = torch.zeros(inputs.item_ids.numel(), dtype=torch.bool, device=hn.device)
    need[tg.nt_tok] = True
    for _, valid in tg.groups.values():
        need |= valid.any(1)
    q_tok = torch.nonzero(need).squeeze(1)  # [Q]
    q_of_tok = torch.cumsum(need.long(), 0) - 1  # [L] query index of each needed token
    neg_logits = hn[q_tok] @ negs.emb.t() / spec.temperature  # [Q, M]
    if logq is not None:
        neg_logits = neg_logits - logq
    if tg.prefix is not None:
        seen = tg.prefix.seen_rows(q_tok, tg.rows, negs.ids)  # [Q, M]
        neg_logits = _with_bias(neg_logits, seen, inputs.history_bias, spec.temperature)
    if spec.user_masking:
        b = inputs.offsets.numel() - 1
        row_mask = _row_membership(tg.rows, inputs.item_ids, b, negs.ids, id_space)  # [B, M]
        neg_logits = neg_logits.masked_fill(row_mask[tg.rows[q_tok]], float("-inf"))
    return q_of_tok, _safe_logsumexp(neg_logits), neg_logits


def _reduce(
    spec: LossSpec, inputs: LossInputs, tg: _Targets, negs: _Negatives, hn: torch.Tensor,
    en: torch.Tensor, q_of_tok: torch.Tensor, lse: torch.Tensor, neg_logits: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """Cross-entropy of each objective (mean over its tokens) and their weighted total."""
    tau, n_t = spec.temperature, tg.nt_tok.numel()
    out: Dict[str, torch.Tensor] = {}
    s_pos = (hn[tg.nt_tok] * en[tg.nt_pos]).sum(-1) / tau  # [T]
    if tg.prefix is not None:
        seen = tg.prefix.seen(tg.nt_tok, tg.rows, inputs.item_ids[tg.nt_pos][:, None])[:, 0]  # [T]
        s_pos = _with_bias(s_pos, seen, inputs.history_bias, tau)
    qi = q_of_tok[tg.nt_tok]
    pos_in_lse = spec.full_catalogue and not spec.user_masking  # lse already sums the positive's column
    if pos_in_lse:
        ce = lse[qi] - s_pos  # [T]
    else:
        if spec.user_masking:
            lse_nt = lse[qi]
        else:  # accidental hits only
            hit = inputs.item_ids[tg.nt_pos][:, None] == negs.ids[None, :]  # [T, M]
            lse_nt = _safe_logsumexp(neg_logits[qi].masked_fill(hit, float("-inf")))
        ce = torch.logaddexp(s_pos, lse_nt) - s_pos  # [T]
    out["next_token"] = ce.sum() / max(n_t, 1)
    total_loss = spec.next_token_weight * out["next_token"]
    # multi-positive objectives: mean over each token's positives, then over tokens
    for name, (idx, valid) in tg.groups.items():
        tok = torch.nonzero(valid.any(1)).squeeze(1)  # [T']
        idx, valid = idx[tok], valid[tok]  # [T', K]
        s = torch.einsum("td,tkd->tk", hn[tok], en[idx]) / tau  # [T', K]
        if tg.prefix is not None:
            s = _with_bias(s, tg.prefix.seen(tok, tg.rows, inputs.item_ids[idx]), inputs.history_bias, tau)
        lse_k = lse[q_of_tok[tok]][:, None]
        ce_k = (lse_k if pos_in_lse else torch.logaddexp(s, lse_k)) - s  # [T', K]
        ce_k = torch.where(valid, ce_k, torch.zeros_like(ce_k))
        per_tok = ce_k.sum(1) / valid.sum(1).clamp_min(1)  # [T']
        out[name] = per_tok.sum() / max(tok.numel(), 1)
        w = spec.multi_token_weight if name == "multi_token" else spec.future_weight
        total_loss = total_loss + w * out[name]
    out["loss"] = total_loss
    out["num_targets"] = torch.tensor(float(n_t), device=inputs.h.device)
    return out
