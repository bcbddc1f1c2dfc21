"""Serving precision: the weight casts autocast repeats on every call, done once.

Under ``torch.autocast(dtype=bf16)`` every ``nn.Linear`` call casts its fp32 weight and bias to
bf16 before the matmul: two cast kernels per Linear per request (with ``cache_enabled=False``,
which CUDA-graph capture needs, nothing is cached between calls). The scoring forward runs ~25
Linear calls (trunk q/k/v, out and MLP per layer for the context and the crossing pass, encoder
projections, the ranker's MLPs), so ~50 of its kernels are these casts: a visible share of a
graphed request whose kernels are tiny.

``precast_linears(model, dtype)`` stores those weights in ``dtype`` once. Under autocast of the
same dtype the results are bit-identical (autocast would have produced exactly these tensors, and
it does not cast a tensor already in its dtype); LayerNorm, embeddings and every other parameter
keep fp32, as autocast's fp32 ops expect. The model must then run under that autocast (a Linear
with bf16 weights given fp32 input outside autocast raises): the Scorer does this when it is given
``autocast``.
"""
from __future__ import annotations

import torch
from torch import nn


_FULL = (torch.float32, torch.float64)


def precast_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every ``nn.Linear``'s weight and bias in ``model`` to ``dtype`` (in place, no grad).
    Returns the number of Linear modules cast. Idempotent. ``dtype=torch.float32`` undoes a cast
    (exactly: every bf16/fp16 value is an fp32 value; the precision the cast dropped stays lost).
    Raises when a Linear already holds another low precision (fp16 weights cast to bf16 would be
    rounded twice)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        for p in (m.weight, m.bias):
            if p is not None and p.is_floating_point() and dtype not in _FULL and p.dtype not in _FULL + (dtype,):
                raise ValueError(f"a Linear of the model already holds {p.dtype} weights: casting them to {dtype} "
                                 f"would round twice (reload the model)")
    with torch.no_grad():
        for m in linears:
            for name in ("weight", "bias"):
                p = getattr(m, name)
                if p is not None and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
    return len(linears)


def has_precast_linears(model: nn.Module) -> bool:
    """Whether some ``nn.Linear`` of ``model`` holds low-precision weights (``precast_linears``)."""
    return any(isinstance(m, nn.Linear) and m.weight.is_floating_point() and m.weight.dtype not in _FULL
               for m in model.modules())
