"""PinFM trunk: pre-norm causal transformer over jagged user sequences, with a KV cache for
scoring candidates against an encoded history (DCAT).

Jagged tensors travel as ``(values [L, ...], offsets [B+1])``; rows are padded on the right to
[B, N, ...] only around the attention, so ``is_causal=True`` alone is correct for real tokens
(padded query rows produce finite garbage that is dropped when unpadding).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, List, Literal, Optional, Tuple, get_args

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from pinfm_rec.model.hstu import HSTULayer
from pinfm_rec.model.jagged import jagged_index, pad_heads, pad_jagged, unpad_jagged
from pinfm_rec.spec import FieldError, bounds

Attention = Literal["sdpa", "pytorch"]  # pytorch: explicit softmax, for reference/debugging
ATTENTION_CHOICES = get_args(Attention)
# transformer: pre-norm softmax attention + FFN (DCAT crossing through the Triton op);
# hstu: HSTU blocks (model/hstu.py: SiLU attention, relative position bias, gating; PyTorch crossing)
Block = Literal["transformer", "hstu"]


@dataclass
class TrunkSpec:
    d_model: int = field(default=64, metadata=bounds(gt=0))
    n_layers: int = field(default=2, metadata=bounds(ge=1))
    n_heads: int = field(default=2, metadata=bounds(ge=1))
    ffn_mult: int = field(default=4, metadata=bounds(ge=1))
    dropout: float = field(default=0.2, metadata=bounds(ge=0, lt=1))
    # context positions 0..max_len-1; a candidate sits at n_r <= max_len. Must be >= data.max_len
    # (spec_checks.cross_check): the data's max_len is the one that cuts histories.
    max_len: int = field(default=200, metadata=bounds(ge=1))
    attention: Attention = "sdpa"
    block: Block = "transformer"
    # recompute each layer's activations in backward (torch.utils.checkpoint per layer) instead of
    # keeping them: long sequences (max_len in the thousands) for ~1/3 more compute
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.n_heads > 0 and self.d_model % self.n_heads:
            raise FieldError("n_heads", f"{self.n_heads} does not divide d_model ({self.d_model}); "
                                        f"choose n_heads among the divisors of d_model")


@dataclass
class KVCache:
    """Per-layer keys/values of an encoded history.

    k, v: n_layers tensors [L, H, Dh] (QKV projection of the layer's normed input; positions are
        already in the input). offsets: [U+1]. max_len: N, the longest history (host int).
    """

    k: List[torch.Tensor]
    v: List[torch.Tensor]
    offsets: torch.Tensor
    max_len: int


def _no_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q  # empty batch: [0, H, Dh]


class TrunkLayer(nn.Module):
    def __init__(self, spec: TrunkSpec) -> None:
        super().__init__()
        d = spec.d_model
        self.n_heads = spec.n_heads
        self.head_dim = d // spec.n_heads
        self.dropout = spec.dropout
        self.attention = spec.attention
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, spec.ffn_mult * d),
            nn.GELU(),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.ffn_mult * d, d),
        )
        self.drop = nn.Dropout(spec.dropout)

    def forward(
        self, x: torch.Tensor, attend: Callable[..., torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block: x [T, D] -> (layer output [T, D], k [T, H, Dh], v [T, H, Dh]).

        ``attend(q, k, v) -> [T, H, Dh]`` is the attention of the caller (causal self-attention
        over jagged rows, or the DCAT crossing over a KV cache). Going through ``forward`` (not
        the helpers below) is what lets DDP/FSDP2 hooks see every use of the block's weights.
        """
        q, k, v = self.qkv_heads(x)
        return self.finish(x, attend(q, k, v)), k, v

    def qkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] (residual stream) -> q, k, v [T, H, Dh] of the normed input."""
        qkv = self.qkv(self.ln1(x)).view(x.shape[0], 3, self.n_heads, self.head_dim)  # [T,3,H,Dh]
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [T, D] residual, attn [T, H, Dh] attention output -> [T, D] layer output."""
        x = x + self.drop(self.out(attn.flatten(1)))  # [T, D]
        return x + self.drop(self.mlp(self.ln2(x)))

    def causal_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flat_idx: torch.Tensor, b: int, n: int
    ) -> torch.Tensor:
        """q, k, v [L, H, Dh] jagged -> causal self-attention output [L, H, Dh] (per row)."""
        qp, kp, vp = pad_heads(flat_idx, b, n, q, k, v)  # [B, H, N, Dh] x 3
        p = self.dropout if self.training else 0.0
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(qp, kp, vp, dropout_p=p, is_causal=True)
        else:
            s = qp @ kp.transpose(-1, -2) / math.sqrt(self.head_dim)  # [B, H, N, N]
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            s = s.masked_fill(~causal, float("-inf"))
            o = F.dropout(s.softmax(-1), p, self.training) @ vp  # [B, H, N, Dh]
        return unpad_jagged(o.transpose(1, 2), flat_idx)  # [L, H, Dh]


class Trunk(nn.Module):
    """Pre-norm causal transformer with learned absolute positions (added inside the trunk)."""

    # entry points besides forward (FSDP2 unshards the trunk's own weights around them)
    fsdp_forward_methods = ("encode_context", "score_candidates", "forward_appended")

    def __init__(self, spec: TrunkSpec) -> None:
        super().__init__()
        if spec.d_model % spec.n_heads:
            raise ValueError(f"d_model {spec.d_model} not divisible by n_heads {spec.n_heads}")
        if spec.attention not in ATTENTION_CHOICES:
            raise ValueError(f"trunk.attention must be one of {ATTENTION_CHOICES}, got {spec.attention!r}")
        self.spec = spec
        self.pos_emb = nn.Embedding(spec.max_len + 1, spec.d_model)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.in_drop = nn.Dropout(spec.dropout)
        if spec.block == "hstu":
            self.layers = nn.ModuleList(
                HSTULayer(spec.d_model, spec.n_heads, spec.max_len, spec.dropout) for _ in range(spec.n_layers))
        else:
            self.layers = nn.ModuleList(TrunkLayer(spec) for _ in range(spec.n_layers))
        self.final_ln = nn.LayerNorm(spec.d_model)

    def _check_len(self, max_len: int, slack: int = 0) -> None:
        if max_len > self.spec.max_len + slack:
            raise ValueError(
                f"sequence length {max_len} exceeds trunk.max_len {self.spec.max_len}; "
                f"truncate histories in the loader or raise trunk.max_len"
            )

    def _encode(
        self, x: torch.Tensor, offsets: torch.Tensor, max_len: int, keep_cache: bool, slack: int = 0
    ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        self._check_len(max_len, slack)
        total, b = x.shape[0], offsets.numel() - 1
        rows, pos = jagged_index(offsets, total)
        flat_idx = rows * max_len + pos  # [L]
        h = self.in_drop(x + self.pos_emb(pos))  # [L, D]
        ks: List[torch.Tensor] = []
        vs: List[torch.Tensor] = []
        for layer in self.layers:
            if total == 0:
                attend = _no_attention
            else:  # causal self-attention within each row: [L, H, Dh]
                attend = functools.partial(layer.causal_attention, flat_idx=flat_idx, b=b, n=max_len)
            if self.spec.activation_checkpointing and self.training and torch.is_grad_enabled():
                h, k, v = torch.utils.checkpoint.checkpoint(layer, h, attend, use_reentrant=False)
            else:
                h, k, v = layer(h, attend)  # [L, D], [L, H, Dh] x 2
            if keep_cache:
                ks.append(k)
                vs.append(v)
        return self.final_ln(h), ks, vs

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        """x [L, D] jagged by offsets [B+1] (max_len = N, longest row) -> hidden [L, D]."""
        return self._encode(x, offsets, max_len, keep_cache=False)[0]

    def forward_appended(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        """Like ``forward`` for rows = a history (<= trunk.max_len tokens) + one appended candidate
        at position n_r (so rows may hold max_len + 1 tokens): the "candidate appended to the
        sequence" reference of ``score_candidates``. x [L, D], offsets [B+1] -> [L, D]."""
        return self._encode(x, offsets, max_len, keep_cache=False, slack=1)[0]

    def encode_context(
        self, x: torch.Tensor, offsets: torch.Tensor, max_len: int
    ) -> Tuple[torch.Tensor, KVCache]:
        """Histories x [L, D] jagged by offsets [U+1] -> (hidden [L, D], KVCache)."""
        h, ks, vs = self._encode(x, offsets, max_len, keep_cache=True)
        return h, KVCache(k=ks, v=vs, offsets=offsets, max_len=max_len)

    def score_candidates(
        self,
        cand_x: torch.Tensor,
        cand_offsets: torch.Tensor,
        cache: KVCache,
        *,
        kernel: str = "auto",
        max_ctx: int = 0,
        max_cands: Optional[int] = None,
        attn_fn: Optional[Callable[..., torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Candidates cand_x [C, D] jagged by cand_offsets [U+1] -> hidden [C, D].

        Candidate j of request r sits at position n_r (r's history length) and attends r's cached
        history plus itself (never other candidates), in every layer. Equal (in eval mode) to
        ``forward(history_r ++ [cand_j])[-1]``. Gradients flow into the history through the cache.
        attn_fn: replaces ``pinfm_rec.kernels.dcat.dcat_attention`` (same signature); None imports it.
        """
        if attn_fn is None:
            from pinfm_rec.kernels.dcat import dcat_attention as attn_fn  # lazy: optional dependency
        if len(cache.k) != len(self.layers):
            raise ValueError(f"cache has {len(cache.k)} layers, trunk has {len(self.layers)}")
        self._check_len(cache.max_len)
        c = cand_x.shape[0]
        if max_cands is None:  # one device sync per call, not one per layer inside the op
            n_req = cand_offsets.numel() - 1
            max_cands = int((cand_offsets[1:] - cand_offsets[:-1]).max()) if n_req > 0 else 0
        cand_rows, _ = jagged_index(cand_offsets, c)  # [C]
        ctx_len = cache.offsets[1:] - cache.offsets[:-1]  # [U]
        h = self.in_drop(cand_x + self.pos_emb(ctx_len[cand_rows]))  # [C, D]
        scale = 1.0 / math.sqrt(self.spec.d_model // self.spec.n_heads)
        for layer, k_ctx, v_ctx in zip(self.layers, cache.k, cache.v):
            if isinstance(layer, HSTULayer):  # pointwise attention: its own (PyTorch) crossing pass
                attend = functools.partial(
                    layer.cross_attention, k_ctx=k_ctx, v_ctx=v_ctx, cand_offsets=cand_offsets,
                    ctx_offsets=cache.offsets, max_ctx_len=cache.max_len, max_cands=max_cands)
                h, _, _ = layer(h, attend)
                continue

            def attend(q, k, v, k_ctx=k_ctx, v_ctx=v_ctx):  # q, k, v [C, H, Dh] -> [C, H, Dh]
                return attn_fn(
                    q, k, v, k_ctx, v_ctx, cand_offsets, cache.offsets,
                    max_ctx=max_ctx, scale=scale, max_cands=max_cands,
                    max_ctx_len=cache.max_len, kernel=kernel,
                )

            h, _, _ = layer(h, attend)
        return self.final_ln(h)
