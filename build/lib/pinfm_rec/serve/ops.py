"""The operators an exported scorer (``export.py``) calls besides aten: import this module (it
imports only torch, fbgemm_gpu and ``pinfm_rec.kernels.dcat``) before ``torch.export.load``.

- ``fbgemm::*`` (jagged/KJT ops of TorchRec, the quantized TBE lookups): registered by ``fbgemm_gpu``.
- ``pinfm::dcat_fwd`` (DCAT crossing): registered by ``pinfm_rec.kernels.dcat.op``; its one
  implementation is the Triton launcher (CUDA, or the Triton interpreter). Here it gets a CPU
  kernel, the PyTorch reference (``dcat_reference``, fp32 accumulation), so an exported program runs
  on CPU without Triton; under ``TRITON_INTERPRET=1`` (the kernel tests) the interpreted Triton
  kernel keeps running.
"""
from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)
import torch

from pinfm_rec.kernels.dcat.config import interpreting
from pinfm_rec.kernels.dcat.op import _fwd_impl  # registers torch.ops.pinfm.dcat_fwd
from pinfm_rec.kernels.dcat.reference import dcat_reference


@torch.library.register_kernel("pinfm::dcat_fwd", "cpu")
def _dcat_fwd_cpu(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, max_ctx, scale, max_cands, max_ctx_len):
    if interpreting():
        return _fwd_impl()(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, max_ctx, scale, max_cands, max_ctx_len)
    return dcat_reference(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, max_ctx=max_ctx, scale=scale,
                          return_lse=True)
