"""Host side of the Gluon DCAT forward (``gluon_fwd.py``): the launch (TMA descriptors, split
tickets), which inputs the kernel takes, and a compile for sm_90 on any machine (CI's guard
against Gluon API changes).
Notation: Cn candidates, Lc history tokens, H heads, Dh head dim.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .config import FwdConfig, Variant
from .gluon_fwd import _dcat_fwd_gluon_kernel


_COUNTERS: dict = {}
_GRAPH_COUNTERS: list = []  # ticket buffers baked into captured CUDA graphs: kept alive

# CUDA queries of the hot path, bound once (C functions; no Stream object per call). Without a
# CUDA build of torch they fall back to the torch.cuda functions (never called there: the Gluon
# kernel takes CUDA tensors only; tests and the CPU proxy, hostbench.py, replace them).
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing",
                     torch.cuda.is_current_stream_capturing)
_stream_of = getattr(torch._C, "_cuda_getCurrentRawStream",
                     lambda index: torch.cuda.current_stream(index).cuda_stream)


def _counters(device_index: int, n: int):
    """Zeroed int32 split tickets, at least n, cached per (device, stream, capturing): the
    kernel that uses a ticket sets it back to 0, so launches on one stream (serialised) share
    the buffer and no memset is needed per call; another stream gets its own buffer. A CUDA
    graph capture gets buffers of its own (never handed to eager launches, which may run
    beside a replay on another stream) that stay allocated for the graphs that use them.
    Not supported: replaying, at the same time on different streams, two graphs captured on
    one stream (they share tickets); use fuse_combine=False there."""
    capturing = _capturing()
    key = (device_index, _stream_of(device_index), capturing)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32,
                          device=torch.device("cuda", device_index) if device_index >= 0
                          else "cpu")
        _COUNTERS[key] = buf
        if capturing:
            _GRAPH_COUNTERS.append(buf)
    elif capturing:
        # a memset recorded into THIS graph (~1 us per replay): the buffer is shared by every
        # capture on this stream, and a capture that failed after recording its own zeros left
        # them never run eagerly; without it, later graphs read stale tickets and skip the combine
        buf.zero_()
    return buf


_SCRATCH: dict = {}  # (device, stream, tag) -> [flat fp32 buffer, {shapes: views}]
_MAX_SCRATCH_VIEWS = 64
# larger scratch is allocated per call, as before: a call that big is GPU-bound (the host time
# saved does not matter) and a buffer kept for it would add to the peak memory of a training step
SCRATCH_CAP = 64 << 20
# Off by default (0: every call allocates, as before) until a GPU run has checked it (written
# 2026-12-07 after the session's GPU window; scripts/gpu/dcat_scratch_ab.py, then the GPU
# suite with PINFM_DCAT_SCRATCH=1); PINFM_DCAT_SCRATCH=1 turns it on.
_MAX_SCRATCH_BYTES = SCRATCH_CAP if os.environ.get("PINFM_DCAT_SCRATCH", "0") == "1" else 0


def _scratch(q, tag: str, shapes):
    """fp32 tensors of the given shapes that a kernel writes and reads within one call. Eager
    CUDA calls take views of one buffer per (device, stream, tag), cached per shapes: launches
    on one stream are serialised, so they share it as they share the split tickets
    (``_counters``), and a call allocates nothing (a caching-allocator call is ~1.5-3 us of
    host time on the GPU hosts). Each view starts 64-byte aligned. The buffer grows to the
    largest shapes seen (up to ``_MAX_SCRATCH_BYTES``; larger ones are allocated per call) and
    stays (``clear_scratch`` frees it). A CUDA graph capture (or a CPU tensor) allocates as
    before, from the graph's own pool."""
    if not _MAX_SCRATCH_BYTES or not q.is_cuda or _capturing():
        return tuple(q.new_empty(sh, dtype=torch.float32) for sh in shapes)
    dev = q.get_device()
    key = (dev, _stream_of(dev), tag)
    ent = _SCRATCH.get(key)
    if ent is not None:
        hit = ent[1].get(shapes)
        if hit is not None:
            return hit
    spans, need = [], 0
    for sh in shapes:
        n = 1
        for d in sh:
            n *= d
        spans.append((need, n))
        need += -(-n // 16) * 16  # the next view 64-byte aligned
    if need * 4 > _MAX_SCRATCH_BYTES:
        return tuple(q.new_empty(sh, dtype=torch.float32) for sh in shapes)
    if ent is None or ent[0].numel() < need:
        ent = _SCRATCH[key] = [torch.empty(max(need, 16), dtype=torch.float32, device=q.device),
                               {}]
    elif len(ent[1]) >= _MAX_SCRATCH_VIEWS:
        ent[1].clear()
    buf = ent[0]
    hit = ent[1][shapes] = tuple(buf[s:s + n].view(sh) for (s, n), sh in zip(spans, shapes))
    return hit


def split_scratch(q, n_split: int, Cn: int, H: int, Dh: int):
    """The split partials of one forward call (``_scratch``): po [n_split, Cn, H, Dh] and pl
    [n_split, Cn, H], fp32."""
    return _scratch(q, "split", ((n_split, Cn, H, Dh), (n_split, Cn, H)))


def lse_scratch(q, Cn: int, H: int):
    """The log-sum-exp output [Cn, H] fp32 of a forward whose caller does not keep it
    (inference: no backward), from ``_scratch``: overwritten by the next such call on the
    stream."""
    return _scratch(q, "lse", ((Cn, H),))[0]


def clear_scratch() -> None:
    """Free the cached scratch buffers (``split_scratch``, ``lse_scratch``)."""
    _SCRATCH.clear()


@functools.lru_cache(maxsize=None)
def _smem_layout(bn: int, dh: int, bf16: bool):
    """The NVMMA shared layout of a [bn, dh] K/V block (computed once, not per call)."""
    return gl.NVMMASharedLayout.get_default_for([bn, dh], gl.bfloat16 if bf16 else gl.float16)


class _DescPair:
    """The K and V descriptors of one call, and (cached-descriptor launch only) their arguments
    as Triton's launcher encodes them, per fast launcher."""
    __slots__ = ("kd", "vd", "encoded")

    def __init__(self, kd, vd):
        self.kd, self.vd, self.encoded = kd, vd, {}


_PAIRS: dict = {}  # (K base, V base, rows, cols, block rows, Dh, dtype) -> _DescPair
_MAX_PAIRS = 2     # the last call's K and V of two layers; each pair holds its two tensors


def _descriptor(t, rows: int, cols: int, bn: int, dh: int, row_stride: int | None = None):
    """A TMA descriptor over t viewed as [rows, cols] (rows row_stride elements apart; None:
    cols) with [bn, dh] blocks (Gluon validates it on the host: built once per cached pair,
    not per call)."""
    return TensorDescriptor(t, [rows, cols], [cols if row_stride is None else row_stride, 1],
                            [bn, dh], _smem_layout(bn, dh, t.dtype == torch.bfloat16))


def _descriptor_pair(kc, vc, rows: int, cols: int, bn: int, dh: int,
                     row_stride: int | None = None) -> _DescPair:
    """K's and V's TMA descriptors over the [rows, cols] views (row_stride elements per row;
    None: cols) with [bn, dh] blocks, in one lookup, reused while the same K/V tensors come
    back (a serving KV cache, a benchmark loop). A cached pair keeps its tensors alive, so
    their base addresses cannot be handed to other tensors meanwhile; at most _MAX_PAIRS are
    kept (oldest dropped first)."""
    key = (kc.data_ptr(), vc.data_ptr(), rows, cols, bn, dh, kc.dtype, row_stride)
    p = _PAIRS.get(key)
    if p is None:
        while len(_PAIRS) >= _MAX_PAIRS:
            del _PAIRS[next(iter(_PAIRS))]
        p = _PAIRS[key] = _DescPair(_descriptor(kc, rows, cols, bn, dh, row_stride),
                                    _descriptor(vc, rows, cols, bn, dh, row_stride))
    return p


_DIRECT_FAILED: list = []  # the error, once a direct launch failed: the JIT path from then on
_I32 = 2 ** 31


def _run(kernel, grid, args, consts, direct: bool, compiled=None, const_values=None):
    """kernel[grid](*args, **consts) the first time; afterwards (``compiled``: the
    CompiledKernel the first call returned) without Triton's per-call binder and cache lookup:
    ``compiled[grid](*all parameters in order)``, what the JIT itself does once it has found
    the kernel. Returns the CompiledKernel to call next time, or None (not ``direct``, or a
    direct launch failed: always the JIT path). The caller keeps one CompiledKernel per
    ``triton_fwd.plan_for`` key, which holds everything Triton specialises on (dtypes,
    constexprs, descriptor blocks, the device), and asks for ``direct`` only when every pointer
    is 16-byte aligned and every int fits int32 (Triton specialises on both). const_values:
    consts' values in signature order (None: worked out here)."""
    if compiled is not None and not _DIRECT_FAILED:
        if const_values is None:
            const_values = tuple(consts[n] for n in kernel.arg_names[len(args):])
        try:
            compiled[grid](*args, *const_values)
            return compiled
        except Exception as e:  # noqa: BLE001  (a Triton release with another launcher API)
            _DIRECT_FAILED.append(repr(e)[:500])
            warnings.warn(f"DCAT direct launch unavailable ({type(e).__name__}: {str(e)[:200]});"
                          " using Triton's JIT launch from now on", RuntimeWarning, stacklevel=3)
    compiled = kernel[grid](*args, **consts)
    if not direct or _DIRECT_FAILED:
        return None
    return compiled


class _Kernel:
    """The CompiledKernel Triton's JIT returned for one specialisation (device, dtypes,
    constexprs), shared by every plan with that specialisation (plans differ in max lengths,
    which Triton does not specialise on), and its cached-descriptor launcher."""
    __slots__ = ("compiled", "fast")

    def __init__(self):
        self.compiled = None  # after the first (JIT) launch
        self.fast = None      # cached-descriptor launcher (on unless PINFM_DCAT_CACHED_LAUNCH=0)


_KERNELS: dict = {}  # (device, dtypes, constexprs) -> _Kernel


class GluonPlan:
    """Everything about a Gluon launch that depends only on the shape key of
    ``triton_fwd.plan_for`` (decided once per key, not per call): the K/V block, whether the
    split partials are merged in the kernel, the constexprs (also in signature order for the
    direct launch), and the compiled kernel of this specialisation (``kernel``). spec: what
    else Triton specialises on (device, the dtypes of every tensor argument)."""
    __slots__ = ("bn", "fuse", "consts", "const_values", "ints_ok", "kernel")

    def __init__(self, cfg: FwdConfig, dtype, Dh: int, split: bool, ints, spec=()):
        # Dh 128 with 128-key blocks would not fit the registers; 64-key blocks still divide
        # every split
        self.bn = cfg.block_n if Dh <= 64 else min(cfg.block_n, 64)
        self.fuse = bool(split and cfg.fuse_combine)
        # bf16 only (fp16 p overflows at 2^16); Dh <= 64 (at 128 the fallback copy spills)
        fixed = (cfg.variant is Variant.GLUON_FIXED_MAX and dtype == torch.bfloat16
                 and Dh <= 64)
        self.consts = dict(HEAD_DIM=Dh, BLOCK_M=cfg.block_m, BLOCK_N=self.bn,
                           STAGES=cfg.num_stages, SPLIT=split, FUSE_COMBINE=self.fuse,
                           FIXED_MAX=fixed, num_warps=cfg.num_warps)
        names = _dcat_fwd_gluon_kernel.arg_names
        self.const_values = tuple(self.consts[n] for n in names[names.index("HEAD_DIM"):])
        self.ints_ok = all(-_I32 <= i < _I32 for i in ints)
        key = (spec, dtype, self.const_values)
        self.kernel = _KERNELS.get(key)
        if self.kernel is None:
            self.kernel = _KERNELS[key] = _Kernel()


def launch(grid, q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, o, lse, po, pl,
           Cn, H, n_mtiles, max_ctx, split_size, qk_scale, cfg: FwdConfig, split,
           plan: GluonPlan | None = None, aligned: bool | None = None,
           sq: int | None = None, skv: int | None = None):
    """Launch the Gluon forward on ``grid`` (same grid and arguments as the ``tl`` kernel).

    k_ctx, v_ctx: [Lc, H, Dh], read through TMA descriptors over the [Lc, H*Dh] view.
    plan: the shape key's GluonPlan (None: made here, for one call); aligned: whether every
    input pointer is 16-byte aligned (None: checked here). sq, skv: the row strides of q/k/v
    and of k_ctx/v_ctx in units of Dh (``triton_fwd.rows_stride``; None: contiguous, H).
    Returns True when the split partials were merged in the kernel (no combine launch)."""
    Lc, _, Dh = k_ctx.shape
    sq = H if sq is None else sq
    skv = H if skv is None else skv
    if plan is None:
        plan = GluonPlan(cfg, k_ctx.dtype, Dh, split, (H, n_mtiles, max_ctx, split_size))
    pair = _descriptor_pair(k_ctx, v_ctx, Lc, H * Dh, plan.bn, Dh,
                            None if skv == H else skv * Dh)
    dev = q.get_device()
    cnt = _counters(dev, grid[0] * grid[1]) if plan.fuse else cand_offsets
    if aligned is None:
        aligned = not ((q.data_ptr() | k.data_ptr() | v.data_ptr() | k_ctx.data_ptr()
                        | v_ctx.data_ptr() | cand_offsets.data_ptr() | ctx_offsets.data_ptr()
                        | o.data_ptr() | lse.data_ptr() | po.data_ptr() | pl.data_ptr()) & 15)
    # outputs, partials and tickets come from torch's allocator (>= 512-byte aligned on CUDA)
    direct = aligned and plan.ints_ok and -_I32 <= Cn < _I32
    args = (q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, o, lse, po, pl, pair.kd, pair.vd,
            cnt, Cn, H, n_mtiles, max_ctx, split_size, qk_scale, sq, skv)
    # CACHED_LAUNCH is read per call: the bench times both settings in one process
    kern = plan.kernel
    fast = kern.fast if direct and CACHED_LAUNCH else None
    if fast is not None and _fast_launch(fast, grid, args, pair):
        return plan.fuse
    compiled = _run(_dcat_fwd_gluon_kernel, grid, args, plan.consts, direct,
                    kern.compiled if direct else None, plan.const_values)
    if direct and compiled is not None:
        kern.compiled = compiled
        if CACHED_LAUNCH and kern.fast is None and not _FAST_FAILED:
            kern.fast = _make_fast(compiled, plan.const_values)
    return plan.fuse


# ------------------------------------------------------------------ cached-descriptor launch
# On by default since dcat run 14 (H200: bit-exact with Triton's launcher at every anchor shape,
# 7-13 us less host time per call, docs/benchmarks/dcat.md); PINFM_DCAT_CACHED_LAUNCH=0 turns
# it off. Triton 3.6's launcher (backends/nvidia/driver.py,
# ``wrap_handle_tensordesc``) re-encodes every TMA descriptor argument on every call
# (``make_tensordesc_arg`` -> ``fill_tma_descriptor``, i.e. cuTensorMapEncodeTiled), although
# our descriptors are cached. This path encodes each cached descriptor once per compiled kernel
# (with Triton's own make_tensordesc_arg) and calls the C launcher under the wrapper with the
# argument list the wrapper would have built. It is used only where that list is known to be
# the same: Triton's 3.6 launcher layout (checked when the first direct launch happens), no
# global / profile scratch, no launch hooks installed; anything else keeps the default path.
CACHED_LAUNCH = os.environ.get("PINFM_DCAT_CACHED_LAUNCH", "1") != "0"
# asked for explicitly (=1): a Triton whose launcher this path cannot reproduce warns; by default
# it falls back quietly (the reason stays in _FAST_FAILED, which hostgpu.py reports)
_REQUESTED = os.environ.get("PINFM_DCAT_CACHED_LAUNCH") == "1"
_FAST_FAILED: list = []  # why the cached-descriptor launch is off in this process


def set_cached_launch(on: bool) -> bool:
    """Switch the cached-descriptor launch on or off for this process (the environment
    variable sets the start value); returns the previous setting."""
    global CACHED_LAUNCH
    prev, CACHED_LAUNCH = CACHED_LAUNCH, bool(on)
    return prev


class _Fast:
    __slots__ = ("raw", "function", "packed", "coop", "pdl", "meta", "n_before", "consts",
                 "device", "stream", "hooks_idle", "encode")


def _triton_stream_fns():
    """Triton's current-device and current-stream getters (what its kernel runner calls)."""
    import triton
    active = triton.runtime.driver.active
    return active.get_current_device, active.get_current_stream


def _make_fast(compiled, const_values):
    """A cached-descriptor launcher for this CompiledKernel, or None (reason in _FAST_FAILED)
    where the running Triton's launcher is not the 3.6 layout this path reproduces."""
    try:
        from triton import knobs
        from triton.backends.nvidia import driver as nvd
        run = compiled.run  # CudaLauncher (loads the module on first use)
        inner = run.launch
        free = dict(zip(getattr(inner, "__code__", None).co_freevars,
                        (c.cell_contents for c in inner.__closure__)))
        if (getattr(nvd, "_BASE_ARGS_FORMAT_LEN", None) != 13
                or not {"launcher", "tensordesc_indices", "tensordesc_meta"} <= set(free)):
            raise RuntimeError("not Triton 3.6's launcher layout")
        names = _dcat_fwd_gluon_kernel.arg_names
        idx = sorted(free["tensordesc_indices"])
        first = names.index("kc_desc")
        if idx != [first, first + 1] or names[first + 1] != "vc_desc":
            raise RuntimeError(f"descriptor arguments at {idx}, expected kc_desc, vc_desc")
        if run.global_scratch_size or run.profile_scratch_size:
            raise RuntimeError("the kernel needs scratch memory")
        meta = free["tensordesc_meta"] or [None, None]

        def hooks_idle(rt=knobs.runtime):
            e, x = rt.launch_enter_hook, rt.launch_exit_hook
            return ((e is None or not getattr(e, "calls", True))
                    and (x is None or not getattr(x, "calls", True)))

        f = _Fast()
        f.raw, f.function, f.packed = free["launcher"], compiled.function, compiled.packed_metadata
        f.coop, f.pdl = run.launch_cooperative_grid, run.launch_pdl
        f.meta, f.n_before, f.consts = meta, first, const_values
        f.device, f.stream = _triton_stream_fns()
        f.hooks_idle, f.encode = hooks_idle, nvd.make_tensordesc_arg
        return f
    except Exception as e:  # noqa: BLE001  (any other Triton: the default launch stays)
        _FAST_FAILED.append(f"{type(e).__name__}: {str(e)[:300]}")
        if _REQUESTED:
            warnings.warn(f"DCAT cached-descriptor launch unavailable ({_FAST_FAILED[-1]}); "
                          "using Triton's launcher", RuntimeWarning, stacklevel=3)
        return None


def _fast_launch(f: _Fast, grid, args, pair: _DescPair) -> bool:
    """Launch through the C launcher with pair's pre-encoded descriptors; False (nothing
    launched) when a launch hook is installed (a profiler): the caller takes Triton's path."""
    if not f.hooks_idle():
        return False
    enc = pair.encoded.get(f)
    if enc is None:
        enc = pair.encoded[f] = (*f.encode(pair.kd, f.meta[0]), *f.encode(pair.vd, f.meta[1]))
    stream = f.stream(f.device())
    n = f.n_before
    f.raw(grid[0], grid[1], grid[2], stream, f.function, f.coop, f.pdl, None, None, f.packed,
          None, None, None, *args[:n], *enc, *args[n + 2:], *f.consts)
    return True


def usable_for(is_cuda: bool, dtype, Dh: int, H: int, cfg: FwdConfig) -> bool:
    """The part of :func:`usable` fixed by the inputs' device, dtype, H and Dh (decided once per
    ``triton_fwd.plan_for`` key)."""
    if not is_cuda or dtype not in (torch.bfloat16, torch.float16):
        return False
    if Dh not in (32, 64, 128) or cfg.num_warps % 4 or cfg.block_m % (16 * cfg.num_warps):
        return False
    return (H * Dh * 2) % 16 == 0  # the history rows' stride (half dtypes: 2 bytes)


def usable(q, k_ctx, v_ctx, cfg: FwdConfig) -> bool:
    """Whether the kernel can take these inputs (the device, dtype and Dh were checked when
    the config's variant was chosen, ``config.choose_variant``): CUDA tensors of a half
    dtype, Dh 32/64/128, a non-empty history whose rows TMA can address (16-byte aligned base and row
    stride), and whole warpgroups (4 warps per 64 candidate rows or more)."""
    if not usable_for(q.is_cuda, q.dtype, q.shape[-1], k_ctx.shape[1], cfg):
        return False
    return k_ctx.shape[0] > 0 and not (k_ctx.data_ptr() | v_ctx.data_ptr()) & 15


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
    for name in ("Cn", "H", "n_mtiles", "max_ctx", "split_size", "SQ", "SKV"):
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
