"""HSTU block (Zhai et al. 2024, "Actions Speak Louder than Words", generative-recommenders):
pointwise SiLU attention with a learned relative-position bias and a gated output, no FFN.

Per layer, with x [T, D] the residual stream and H heads of width Dh = D / H::

    u, v, q, k = split(SiLU(Linear(LayerNorm(x))))          each [T, H, Dh]
    a[i, j]    = SiLU(q_i . k_j + bias_h[i - j]) / N_max      for j <= i in the same row (else 0)
    y          = x + Dropout(Linear(u * LayerNorm(sum_j a[i, j] v_j)))

N_max is the trunk's ``max_len`` (a constant, so training and serving scale scores alike; GR
divides by the padded length, which is that constant in its ML-1M configs). The attention is not
normalised over keys, so it needs no softmax max/sum and a candidate's crossing pass is exactly
the appended-token forward: ``cross_attention`` scores candidates against a cached history.

Same interface as ``TrunkLayer``: ``forward(x, attend) -> (out, k, v)`` where ``attend(q, k, v)``
is ``causal_attention`` (jagged rows) or ``cross_attention`` (candidates over a KV cache).
Kernels: PyTorch (padded dense scores, fine up to a few thousand tokens per row); the Triton DCAT
op implements the softmax block only.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pinfm_rec.model.jagged import jagged_index, pad_heads, pad_jagged, unpad_jagged


class HSTULayer(nn.Module):
    """One HSTU block over a jagged residual stream x [T, D] (T = L tokens or C candidates)."""

    def __init__(self, d_model: int, n_heads: int, max_len: int, dropout: float, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} not divisible by n_heads {n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.max_len = max_len
        self.uvqk = nn.Linear(d_model, 4 * d_model, bias=False)
        nn.init.normal_(self.uvqk.weight, std=0.02)
        self.out = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # bias_h[dist] for dist = i - j in [0, max_len] (a candidate sits at position n_r <= max_len)
        self.rel_bias = nn.Parameter(torch.randn(n_heads, max_len + 1) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def forward(
        self, x: torch.Tensor, attend: Callable[..., torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> (layer output [T, D], k [T, H, Dh], v [T, H, Dh])."""
        u, q, k, v = self.uqkv_heads(x)
        return self.finish(x, attend(q, k, v), u), k, v

    def uqkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """x [T, D] -> u, q, k, v [T, H, Dh] (SiLU of one projection of the normed input)."""
        h = F.silu(self.uvqk(F.layer_norm(x, (self.d_model,))))  # [T, 4D]
        u, v, q, k = h.view(x.shape[0], 4, self.n_heads, self.head_dim).unbind(1)  # 4 x [T, H, Dh]
        return u, q, k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x [T, D] residual, attn and gate u [T, H, Dh] -> [T, D]."""
        y = u.flatten(1) * F.layer_norm(attn.flatten(1), (self.d_model,))  # [T, D]
        return x + self.drop(self.out(y))

    def _weights(self, s: torch.Tensor, dist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Scores s [..., H, Nq, Nk], distances dist [..., Nq, Nk] (long), valid [..., Nq, Nk] bool ->
        attention weights SiLU(s + bias) / N_max, zero where not valid."""
        bias = self.rel_bias[:, dist.clamp(0, self.max_len)]  # [H, ..., Nq, Nk]
        bias = bias.movedim(0, -3) if bias.dim() > 3 else bias  # [..., H, Nq, Nk]
        a = F.silu(s + bias) / self.max_len
        a = a * valid.unsqueeze(-3).to(a.dtype)
        if self.training and self.attn_dropout > 0:
            a = F.dropout(a, self.attn_dropout)
        return a

    def causal_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flat_idx: torch.Tensor, b: int, n: int
    ) -> torch.Tensor:
        """q, k, v [L, H, Dh] jagged (flat_idx = row * N + pos) -> causal attention [L, H, Dh]."""
        qp, kp, vp = pad_heads(flat_idx, b, n, q, k, v)  # [B, H, N, Dh] x 3
        pos = torch.arange(n, device=q.device)
        dist = pos[:, None] - pos[None, :]  # [N, N]
        a = self._weights(qp @ kp.transpose(-1, -2), dist, dist >= 0)  # [B, H, N, N]
        return unpad_jagged((a @ vp).transpose(1, 2), flat_idx)  # [L, H, Dh]

    def cross_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_ctx: torch.Tensor,
        v_ctx: torch.Tensor,
        cand_offsets: torch.Tensor,
        ctx_offsets: torch.Tensor,
        max_ctx_len: int,
        max_cands: int,
    ) -> torch.Tensor:
        """Candidates q, k, v [C, H, Dh] jagged by cand_offsets [U+1] over the cached history
        k_ctx, v_ctx [L, H, Dh] jagged by ctx_offsets [U+1] -> [C, H, Dh].

        Candidate j of request r sits at position n_r and attends r's history and itself only:
        equal to ``causal_attention`` over history_r ++ [cand_j] at the last position.
        """
        c, u = q.shape[0], ctx_offsets.numel() - 1
        if c == 0:
            return q
        n, m = max(int(max_ctx_len), 1), max(int(max_cands), 1)
        crow, cpos = jagged_index(cand_offsets, c)  # [C]
        hrow, hpos = jagged_index(ctx_offsets, k_ctx.shape[0])  # [L]
        cidx, hidx = crow * m + cpos, hrow * n + hpos
        (qp,) = pad_heads(cidx, u, m, q)  # [U, H, M, Dh]
        kp, vp = pad_heads(hidx, u, n, k_ctx, v_ctx)  # [U, H, N, Dh] x 2
        n_r = (ctx_offsets[1:] - ctx_offsets[:-1])  # [U]
        pos = torch.arange(n, device=q.device)
        dist = (n_r[:, None] - pos[None, :])[:, None, :].expand(u, m, n)  # [U, M, N]
        a_ctx = self._weights(qp @ kp.transpose(-1, -2), dist, dist > 0)  # [U, H, M, N]
        o = unpad_jagged((a_ctx @ vp).transpose(1, 2), cidx)  # [C, H, Dh]
        s_self = (q * k).sum(-1, keepdim=True).unsqueeze(-1)  # [C, H, 1, 1]
        zero = torch.zeros(c, 1, 1, dtype=torch.long, device=q.device)
        a_self = self._weights(s_self, zero, torch.ones(c, 1, 1, dtype=torch.bool, device=q.device))
        return o + a_self[..., 0] * v  # [C, H, Dh]
