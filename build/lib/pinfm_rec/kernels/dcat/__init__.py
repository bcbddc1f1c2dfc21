"""DCAT crossing attention (candidates over their request's history + self).

Public entry point: :func:`dcat_attention` (see op.py). Shapes: q, k, v
[Cn, H, Dh]; k_ctx, v_ctx [Lc, H, Dh]; offsets [R+1].
"""

from .op import dcat_attention
from .reference import dcat_reference, dcat_sdpa

__all__ = ["dcat_attention", "dcat_reference", "dcat_sdpa"]
