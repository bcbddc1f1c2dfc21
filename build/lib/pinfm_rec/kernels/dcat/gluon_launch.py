"""Host side of the Gluon DCAT forward (``gluon_fwd.py``): the launch (TMA descriptors, split
tickets), which inputs the kernel takes, and a compile for sm_90 on any machine (CI's guard
against Gluon API changes).
Notation: Cn candidates, Lc history tokens, H heads, Dh head dim.
"""

from __future__ import annotations

import functools
import warnings

import torch
from triton.experimental.gluon import language as gl

from .config import FwdConfig, Variant
from .gluon_fwd import _dcat_fwd_gluon_kernel


_COUNTERS: dict = {}
_GRAPH_COUNTERS: list = []  # ticket buffers baked into captured CUDA graphs: kept alive


def _counters(device, n: int):
    """Zeroed int32 split tickets, at least n, cached per (device, stream, capturing): the
    kernel that uses a ticket sets it back to 0, so launches on one stream (serialised) share
    the buffer and no memset is needed per call; another stream gets its own buffer. A CUDA
    graph capture gets buffers of its own (never handed to eager launches, which may run
    beside a replay on another stream) that stay allocated for the graphs that use them.
    Not supported: replaying, at the same time on different streams, two graphs captured on
    one stream (they share tickets); use fuse_combine=False there."""
    capturing = torch.cuda.is_current_stream_capturing()
    key = (device.index, torch.cuda.current_stream(device).cuda_stream, capturing)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
        if capturing:
            _GRAPH_COUNTERS.append(buf)
    return buf


@functools.lru_cache(maxsize=None)
def _smem_layout(bn: int, dh: int, bf16: bool):
    """The NVMMA shared layout of a [bn, dh] K/V block (computed once, not per call)."""
    return gl.NVMMASharedLayout.get_default_for([bn, dh], gl.bfloat16 if bf16 else gl.float16)


_DESCRIPTORS: dict = {}  # (base, rows, cols, block rows, Dh, bf16) -> TensorDescriptor
_MAX_DESCRIPTORS = 4      # the last call's K and V of two layers; each holds its tensor


def _descriptor(t, rows: int, cols: int, bn: int, dh: int):
    """A TMA descriptor over t viewed as [rows, cols] with [bn, dh] blocks, reused while the
    same K/V tensor comes back (a serving KV cache, a benchmark loop): Gluon validates a new
    descriptor on the host every time. A cached descriptor keeps its tensor alive, so its base
    address cannot be handed to another tensor meanwhile; at most _MAX_DESCRIPTORS are kept
    (oldest dropped first)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    bf16 = t.dtype == torch.bfloat16
    key = (t.data_ptr(), rows, cols, bn, dh, bf16)
    d = _DESCRIPTORS.get(key)
    if d is None:
        while len(_DESCRIPTORS) >= _MAX_DESCRIPTORS:
            del _DESCRIPTORS[next(iter(_DESCRIPTORS))]
        d = TensorDescriptor(t, [rows, cols], [cols, 1], [bn, dh], _smem_layout(bn, dh, bf16))
        _DESCRIPTORS[key] = d
    return d


_COMPILED: dict = {}    # launch key -> the CompiledKernel Triton's JIT chose for it
_DIRECT_FAILED: list = []  # the error, once a direct launch failed: the JIT path from then on
_I32 = 2 ** 31


def _run(kernel, grid, args, consts, key):
    """kernel[grid](*args, **consts), after the first call of a launch key without Triton's
    per-call binder and cache lookup: the CompiledKernel it returned is called directly
    (``CompiledKernel[grid](*all parameters in order)``, what the JIT itself does once it has
    found the kernel). key None: always the JIT path. The key must hold everything Triton
    specialises on: dtypes, constexprs, descriptor blocks, 16-byte alignment of every pointer
    and the int widths (the caller only makes keys for all-aligned pointers and int32 ints)."""
    compiled = None if key is None or _DIRECT_FAILED else _COMPILED.get(key)
    if compiled is not None:
        try:
            compiled[grid](*args, *(consts[n] for n in kernel.arg_names[len(args):]))
            return
        except Exception as e:  # noqa: BLE001  (a Triton release with another launcher API)
            _DIRECT_FAILED.append(repr(e)[:500])
            warnings.warn(f"DCAT direct launch unavailable ({type(e).__name__}: {str(e)[:200]});"
                          " using Triton's JIT launch from now on", RuntimeWarning, stacklevel=3)
    compiled = kernel[grid](*args, **consts)
    if key is not None and compiled is not None and not _DIRECT_FAILED:
        _COMPILED[key] = compiled


def _launch_key(q, k_ctx, cnt, ptrs, ints, consts):
    """The direct-launch key of a call, or None when a pointer is not 16-byte aligned or an
    int needs 64 bits (Triton specialises on both: the JIT path handles those calls)."""
    if any(t.data_ptr() % 16 for t in ptrs) or any(not -_I32 <= i < _I32 for i in ints):
        return None
    return (q.device.index, q.dtype, k_ctx.dtype, ptrs[5].dtype, ptrs[6].dtype, cnt.dtype,
            tuple(consts.values()))


def launch(grid, q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, o, lse, po, pl,
           Cn, H, n_mtiles, max_ctx, split_size, qk_scale, cfg: FwdConfig, split):
    """Launch the Gluon forward on ``grid`` (same grid and arguments as the ``tl`` kernel).

    k_ctx, v_ctx: [Lc, H, Dh], read through TMA descriptors over the [Lc, H*Dh] view.
    Returns True when the split partials were merged in the kernel (no combine launch)."""
    Lc, _, Dh = k_ctx.shape
    # Dh 128 with 128-key blocks would not fit the registers; 64-key blocks still divide
    # every split
    bn = cfg.block_n if Dh <= 64 else min(cfg.block_n, 64)
    kd, vd = (_descriptor(t, Lc, H * Dh, bn, Dh) for t in (k_ctx, v_ctx))
    fuse = bool(split and cfg.fuse_combine)
    cnt = _counters(q.device, grid[0] * grid[1]) if fuse else cand_offsets
    # bf16 only (fp16 p overflows at 2^16); Dh <= 64 (at 128 the fallback copy spills)
    fixed = (cfg.variant is Variant.GLUON_FIXED_MAX and k_ctx.dtype == torch.bfloat16
             and Dh <= 64)
    ptrs = (q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, o, lse, po, pl, cnt)
    ints = (Cn, H, n_mtiles, max_ctx, split_size)
    consts = dict(HEAD_DIM=Dh, BLOCK_M=cfg.block_m, BLOCK_N=bn, STAGES=cfg.num_stages,
                  SPLIT=split, FUSE_COMBINE=fuse, FIXED_MAX=fixed, num_warps=cfg.num_warps)
    _run(_dcat_fwd_gluon_kernel, grid, (*ptrs[:11], kd, vd, cnt, *ints, qk_scale), consts,
         _launch_key(q, k_ctx, cnt, ptrs, ints, consts))
    return fuse


def usable(q, k_ctx, v_ctx, cfg: FwdConfig) -> bool:
    """Whether the kernel can take these inputs (the device, dtype and Dh were checked when
    the config's variant was chosen, ``config.choose_variant``): CUDA tensors of a half
    dtype, Dh 32/64/128, a non-empty history whose rows TMA can address (16-byte aligned base and row
    stride), and whole warpgroups (4 warps per 64 candidate rows or more)."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or k_ctx.shape[0] == 0:
        return False
    Dh = q.shape[-1]
    if Dh not in (32, 64, 128) or cfg.num_warps % 4 or cfg.block_m % (16 * cfg.num_warps):
        return False
    return all(t.data_ptr() % 16 == 0 and (t.shape[1] * Dh * t.element_size()) % 16 == 0
               for t in (k_ctx, v_ctx))


def compile_for_sm90(head_dim: int = 64, block_n: int = 128, stages: int = 3,
                     block_m: int = 64, num_warps: int = 4, maxnreg: int | None = None,
                     **opts) -> dict:
    """Compile a Gluon forward variant for Hopper (sm_90) on any machine, GPU or not, and
    return {"shared": bytes of shared memory, "ptx": the PTX}. For CI and for trying configs
    without a GPU: it catches Gluon API changes between Triton releases and shows shared
    memory and (with ptxas -v on the PTX) registers. block_m / num_warps / maxnreg: the
    launch's tile and register cap. opts: the kernel's constexpr flags (FUSE_COMBINE,
    FIXED_MAX). bf16 inputs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    fn = _dcat_fwd_gluon_kernel
    rows = torch.empty(256, 8 * head_dim, dtype=torch.bfloat16)
    layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl.bfloat16)
    desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [block_n, head_dim],
                            layout)
    types = {"CO": "*i64", "XO": "*i64", "LSE": "*fp32", "PL": "*fp32", "PO": "*fp32",
             "CNT": "*i32", "qk_scale": "fp32", "kc_desc": mangle_type(desc),
             "vc_desc": mangle_type(desc)}
    for name in ("Q", "K", "V", "KC", "VC", "O"):
        types[name] = "*bf16"
    for name in ("Cn", "H", "n_mtiles", "max_ctx", "split_size"):
        types[name] = "i32"
    const = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
                 SPLIT=True, num_warps=num_warps)
    const.update({f: bool(opts.get(f, False)) for f in ("FUSE_COMBINE", "FIXED_MAX")})
    sig = {n: ("constexpr" if n in const else types[n]) for n in fn.arg_names}
    src = GluonASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps,
                                         **({"maxnreg": maxnreg} if maxnreg else {})))
    return {"shared": kernel.metadata.shared, "ptx": kernel.asm["ptx"]}
