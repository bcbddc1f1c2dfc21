"""DCAT crossing attention: torch.library custom ops and the public dispatcher.

Notation: R requests, Cn candidates total, Lc context tokens total, H heads,
Dh head dim. ``pinfm::dcat_fwd`` / ``pinfm::dcat_bwd`` wrap the Triton
kernels (imported lazily so that TRITON_INTERPRET may be set late) and carry
fake (meta) implementations and autograd, so they work under torch.compile.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from .config import DcatConfig, interpreting
from .reference import dcat_reference, dcat_sdpa

__all__ = ["dcat_attention", "dcat_fwd", "dcat_bwd"]

_FWD = None  # triton_fwd.dcat_fwd_triton once imported (lazily: TRITON_INTERPRET may be set late)
_BWD = None


def _fwd_impl():
    global _FWD
    if _FWD is None:
        from . import triton_fwd
        _FWD = triton_fwd.dcat_fwd_triton
    return _FWD


def _bwd_impl():
    global _BWD
    if _BWD is None:
        from . import triton_bwd
        _BWD = triton_bwd.dcat_bwd_triton
    return _BWD


@torch.library.custom_op("pinfm::dcat_fwd", mutates_args=())
def dcat_fwd(q: Tensor, k: Tensor, v: Tensor, k_ctx: Tensor, v_ctx: Tensor,
             cand_offsets: Tensor, ctx_offsets: Tensor, max_ctx: int, scale: float,
             max_cands: int, max_ctx_len: int) -> tuple[Tensor, Tensor]:
    """Triton forward. q, k, v: [Cn, H, Dh] (contiguous); k_ctx, v_ctx:
    [Lc, H, Dh]; offsets [R+1]. Returns (o [Cn, H, Dh], lse [Cn, H] fp32)."""
    return _fwd_impl()(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, max_ctx, scale,
                       max_cands, max_ctx_len)


@dcat_fwd.register_fake
def _dcat_fwd_fake(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, max_ctx, scale,
                   max_cands, max_ctx_len):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("pinfm::dcat_bwd", mutates_args=())
def dcat_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, k_ctx: Tensor, v_ctx: Tensor,
             o: Tensor, lse: Tensor, cand_offsets: Tensor, ctx_offsets: Tensor, max_ctx: int,
             scale: float, max_cands: int, max_ctx_len: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward. do, q, k, v, o: [Cn, H, Dh]; k_ctx, v_ctx: [Lc, H, Dh];
    lse [Cn, H]. Returns (dq, dk, dv [Cn, H, Dh], dk_ctx, dv_ctx [Lc, H, Dh])."""
    return _bwd_impl()(do, q, k, v, k_ctx, v_ctx, o, lse, cand_offsets, ctx_offsets, max_ctx,
                       scale, max_cands, max_ctx_len)


@dcat_bwd.register_fake
def _dcat_bwd_fake(do, q, k, v, k_ctx, v_ctx, o, lse, cand_offsets, ctx_offsets, max_ctx,
                   scale, max_cands, max_ctx_len):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(k_ctx), torch.empty_like(v_ctx))


def _setup_context(ctx, inputs, output):
    q, k, v, k_ctx, v_ctx, co, xo, max_ctx, scale, max_cands, max_ctx_len = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, k_ctx, v_ctx, co, xo, o, lse)
    ctx.args = (max_ctx, scale, max_cands, max_ctx_len)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    q, k, v, k_ctx, v_ctx, co, xo, o, lse = ctx.saved_tensors
    max_ctx, scale, max_cands, max_ctx_len = ctx.args
    dq, dk, dv, dkc, dvc = dcat_bwd(do.contiguous(), q, k, v, k_ctx, v_ctx, o, lse, co, xo,
                                    max_ctx, scale, max_cands, max_ctx_len)
    return dq, dk, dv, dkc, dvc, None, None, None, None, None, None


dcat_fwd.register_autograd(_backward, setup_context=_setup_context)


class _DcatFn(torch.autograd.Function):
    """Eager fast path: same kernels as the custom ops, without the custom-op
    dispatch overhead (tens of microseconds per call on slow hosts). meta: (max_ctx, scale,
    max_cands, max_ctx_len, config), one argument (Function.apply walks every argument);
    config: an explicit DcatConfig, or None for ``config.select``'s."""

    @staticmethod
    def forward(ctx, q, k, v, k_ctx, v_ctx, co, xo, meta):
        max_ctx, scale, max_cands, max_ctx_len, config = meta
        o, lse = (_FWD or _fwd_impl())(q, k, v, k_ctx, v_ctx, co, xo, max_ctx, scale,
                                       max_cands, max_ctx_len,
                                       None if config is None else config.fwd)
        ctx.save_for_backward(q, k, v, k_ctx, v_ctx, co, xo, o, lse)
        ctx.args = meta
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, k_ctx, v_ctx, co, xo, o, lse = ctx.saved_tensors
        grads = _bwd_impl()(do.contiguous(), q, k, v, k_ctx, v_ctx, o, lse, co, xo, *ctx.args)
        return (*grads, None, None, None)


_MAX_LENS: dict = {}  # id(offsets) -> (weakref, data_ptr, version, max length)


def _cached_device(t: Tensor) -> bool:
    """Whether _max_len keeps answers for tensors of t's device (CUDA: reading one syncs)."""
    return t.is_cuda


def _max_len(offsets: Tensor) -> int:
    """The longest segment of an offsets tensor. Reading it from a GPU tensor syncs the host
    with the device, so the answer is kept per tensor while that tensor lives unmodified (its
    version counter, bumped by every in-place write, and its data pointer unchanged): a
    serving loop that reuses its offsets pays the sync once. Pass max_cands / max_ctx_len to
    avoid it altogether. Not cached while torch.compile traces (as before: one sync), nor for CPU
    tensors (no sync to save). Writes that bypass the version counter (``.numpy()``, ``.data``,
    a Triton kernel) are not seen: pass the max lengths for buffers written that way."""
    if _is_compiling() or not _cached_device(offsets):
        return 0 if offsets.numel() < 2 else int((offsets[1:] - offsets[:-1]).max().item())
    try:
        version = offsets._version
    except RuntimeError:  # an inference-mode tensor tracks no version: not cached
        version = None
    hit = _MAX_LENS.get(id(offsets))
    if (hit is not None and version is not None and hit[0]() is offsets
            and hit[1] == offsets.data_ptr() and hit[2] == version):
        return hit[3]
    n = 0 if offsets.numel() < 2 else int((offsets[1:] - offsets[:-1]).max().item())
    if version is None:
        return n
    if len(_MAX_LENS) >= 64:
        _MAX_LENS.clear()
    _MAX_LENS[id(offsets)] = (weakref.ref(offsets), offsets.data_ptr(), version, n)
    return n


def dcat_attention(q: Tensor, k: Tensor, v: Tensor, k_ctx: Tensor, v_ctx: Tensor,
                   cand_offsets: Tensor, ctx_offsets: Tensor, *, max_ctx: int = 0,
                   scale: float | None = None, max_cands: int | None = None,
                   max_ctx_len: int | None = None, kernel: str = "auto",
                   config: DcatConfig | None = None) -> Tensor:
    """DCAT crossing attention.

    q, k, v: [Cn, H, Dh] candidate queries/keys/values, jagged by
    cand_offsets [R+1]; k_ctx, v_ctx: [Lc, H, Dh] history keys/values, jagged
    by ctx_offsets [R+1] (int32 or int64, same device; offsets[0] == 0 and
    offsets[-1] == Cn / Lc). Candidate j of request r attends over the last
    ``max_ctx`` (0 = all) history tokens of r plus itself:
    ``o_j = softmax_t(q_j . k_t * scale) v_t``. Returns o [Cn, H, Dh] in q's
    dtype (fp32 accumulation). ``max_cands`` / ``max_ctx_len`` are optional
    host-side max per-request counts (avoid a device sync). ``kernel``:
    "auto" (triton on CUDA or under TRITON_INTERPRET=1 when Dh is a power of two >= 16,
    else pytorch),
    "triton", "pytorch" (dense reference) or "sdpa" (stock SDPA path). ``config``: the
    Triton kernels' launch config (``config.DcatConfig``; None: ``config.select``'s for the
    inputs' device, dtype and Dh, chosen once and cached); eager calls only (under
    torch.compile the custom op uses the selected one).
    """
    if q.dim() != 3 or k_ctx.dim() != 3:
        raise ValueError("q/k/v must be [Cn, H, Dh] and k_ctx/v_ctx [Lc, H, Dh]")
    Dh = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(Dh)
    if kernel == "auto":
        triton_ok = Dh >= 16 and not Dh & (Dh - 1)
        kernel = "triton" if triton_ok and (q.is_cuda or interpreting()) else "pytorch"
    if kernel == "pytorch":
        return dcat_reference(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets,
                              max_ctx=max_ctx, scale=scale, max_cands=max_cands, max_ctx_len=max_ctx_len)
    if kernel == "sdpa":
        return dcat_sdpa(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, max_ctx=max_ctx,
                         scale=scale, max_cands=max_cands, max_ctx_len=max_ctx_len)
    if kernel != "triton":
        raise ValueError(f"unknown kernel {kernel!r}")
    if Dh < 16 or Dh & (Dh - 1):
        raise ValueError(f"triton kernel needs a power-of-two head dim >= 16, got {Dh}")
    if not q.is_cuda and not interpreting() and not _is_exporting():  # (export: the custom op, below)
        raise ValueError(
            f"kernel='triton' needs CUDA tensors (got {q.device}; on CPU only under TRITON_INTERPRET=1, "
            "for tests): use kernel='auto' (triton on CUDA, pytorch elsewhere) or 'pytorch'"
        )
    if max_cands is None:
        max_cands = _max_len(cand_offsets)
    if max_ctx_len is None:
        max_ctx_len = _max_len(ctx_offsets)
    max_ctx, scale = int(max_ctx), float(scale)
    if not (_FORCE_CUSTOM_OP or _is_compiling()) and (
            not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad
                                                or v.requires_grad or k_ctx.requires_grad
                                                or v_ctx.requires_grad)):
        # inference (serving, eval): no autograd node, straight to the launcher, which reads
        # row-strided q/k/v and k_ctx/v_ctx (slices of the qkv projection) in place
        return (_FWD or _fwd_impl())(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets,
                                     max_ctx, scale, max_cands, max_ctx_len,
                                     None if config is None else config.fwd, False)[0]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    k_ctx, v_ctx = k_ctx.contiguous(), v_ctx.contiguous()
    if _FORCE_CUSTOM_OP or _is_compiling():
        return torch.ops.pinfm.dcat_fwd(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets,
                                        max_ctx, scale, max_cands, max_ctx_len)[0]
    if _functorch_active():  # vmap / grad transforms: through Function.apply's own handling
        return _DcatFn.apply(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets,
                             (max_ctx, scale, max_cands, max_ctx_len, config))
    return _APPLY(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets,
                  (max_ctx, scale, max_cands, max_ctx_len, config))


# The C apply under Function.apply: the Python wrapper's per-call work (default-argument
# binding for setup_context Functions, functorch's dead-wrapper pass over every argument) is
# not needed here without functorch transforms (checked per call above); ~1.5 us less host time
# per training-mode call on a CPU host (the autograd node itself is built the same way)
_APPLY = super(torch.autograd.Function, _DcatFn).apply
_functorch_active = torch._C._are_functorch_transforms_active


_is_compiling = torch.compiler.is_compiling
# torch.export traces the op into the program on any device (nothing runs; on CPU the program's
# op comes from pinfm_rec.serve.ops), while torch.compile on CPU without the interpreter keeps
# the clear error above
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


_FORCE_CUSTOM_OP = False  # tests flip this to run the custom op in eager
