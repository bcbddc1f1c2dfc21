"""DCAT Triton kernels vs the PyTorch reference: compiled on CUDA when present (bf16 there
too), else on CPU through the Triton interpreter (tests/conftest.py decides; the kernel
modules are imported lazily, after that)."""

import os
from dataclasses import replace

import pytest
import torch

from pinfm_rec.kernels.dcat.config import Tile, Variant, select
from pinfm_rec.kernels.dcat.reference import dcat_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1")


def _mods():
    from pinfm_rec.kernels.dcat import triton_bwd, triton_fwd
    return triton_fwd, triton_bwd


def _offs(lens, dev):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev)


def _cfg(dev, dtype, dh, fwd=None, bwd=None):
    """The selected config for (dev, dtype, dh) with fwd / bwd fields replaced."""
    sel = select(torch.device(dev), dtype, dh)
    return replace(sel, fwd=replace(sel.fwd, **(fwd or {})), bwd=replace(sel.bwd, **(bwd or {})))


def _case(dev, cl, xl, h, dh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(n, h, dh, generator=g).to(dev, dtype)  # noqa: E731
    ins = [mk(sum(cl)), mk(sum(cl)), mk(sum(cl)), mk(sum(xl)), mk(sum(xl))]
    return ins, _offs(cl, dev), _offs(xl, dev)


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


def _close(a, b, dtype, name):
    """Elementwise for fp32/fp16; bf16 (8 mantissa bits, gradients summed over many rows) by
    the relative Frobenius error, as the GPU bench checks it (run 12: 3.8e-3, SDPA 3.4e-3)."""
    if dtype == torch.bfloat16:
        rel = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert rel < 2e-2, (name, rel)
    else:
        torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=name)


def _check(dev, cl, xl, h, dh, dtype, max_ctx=0, fcfg=None, bcfg=None, seed=0):
    fwd, bwd = _mods()
    ins, co, xo = _case(dev, cl, xl, h, dh, dtype, seed)
    cfg = _cfg(dev, dtype, dh, fcfg, bcfg)
    scale = dh ** -0.5
    mc, ml = max(cl), max(xl)
    o, lse = fwd.dcat_fwd_triton(*ins, co, xo, max_ctx, scale, mc, ml, cfg.fwd)
    xs = [t.double().requires_grad_() for t in ins]
    ref, ref_lse = dcat_reference(*xs, co, xo, max_ctx=max_ctx, return_lse=True)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    _close(o, ref.detach(), dtype, "o")
    _close(lse, ref_lse.detach(), dtype, "lse")
    do = torch.randn_like(o)
    grads = bwd.dcat_bwd_triton(do, *ins, o, lse, co, xo, max_ctx, scale, mc, ml, cfg)
    ref_g = torch.autograd.grad(ref, xs, do.double())
    for name, a, b in zip(["dq", "dk", "dv", "dk_ctx", "dv_ctx"], grads, ref_g):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        _close(a, b, dtype, name)


SMALL_F = dict(block_m=16, block_n=16)
SMALL_B = dict(dq=Tile(16, 16), kv=Tile(16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ragged_fwd_bwd(dtype, kernel_device):
    # empty histories, requests with 0 and 1 candidates, tails of every tile
    _check(kernel_device, [3, 0, 21, 1, 5], [0, 9, 37, 17, 1], 2, 32, dtype, fcfg=SMALL_F,
           bcfg=SMALL_B)


@pytest.mark.parametrize("dh", [32, 64, 128])
def test_head_dims(dh, kernel_device):
    _check(kernel_device, [2, 5], [7, 20], 1, dh, torch.float32, fcfg=SMALL_F, bcfg=SMALL_B,
           seed=dh)


@pytest.mark.parametrize("max_ctx", [1, 6, 40])
def test_max_ctx(max_ctx, kernel_device):
    _check(kernel_device, [4, 0, 3], [30, 5, 0], 2, 32, torch.float32, max_ctx=max_ctx,
           fcfg=dict(SMALL_F, split_size=16), bcfg=dict(SMALL_B, split_size=16))


def test_split_history_long(kernel_device):
    # long history, small H: exercises the split-K forward + combine and split dq
    _check(kernel_device, [9, 2], [700, 3], 1, 32, torch.float32,
           fcfg=dict(block_m=16, block_n=64, split_size=192),
           bcfg=dict(dq=Tile(16, 64), kv=Tile(64, 16), split_size=256))


def test_split_fp16_default_tiles(kernel_device):
    # default (GPU) tile sizes, with a forced split (on Hopper: the Gluon online forward)
    _check(kernel_device, [20], [150], 1, 64, torch.float16, fcfg=dict(split_size=64),
           bcfg=dict(split_size=64))


@pytest.mark.parametrize("dh", [64, 128])
def test_bf16_default_config_on_cuda(dh, kernel_device):
    # the benchmarked dtype with the selected config (on Hopper the Gluon forward: fixed-max
    # at Dh 64, online at 128), ragged, a split history and a max_ctx window
    if kernel_device.type != "cuda":
        pytest.skip("bf16 kernels are checked compiled on CUDA (the Triton interpreter's bf16 tl.dot "
                    "returns garbage: 2.7e10 error on a 16x16 product with Triton 3.8)")
    _check(kernel_device, [1, 70, 0, 130], [700, 33, 5, 1500], 4, dh, torch.bfloat16, seed=dh)
    _check(kernel_device, [1, 70, 130], [700, 33, 1500], 4, dh, torch.bfloat16, max_ctx=100)
    # the tl kernel in bf16 too: non-Hopper GPUs, and Hopper calls Gluon cannot take
    _check(kernel_device, [1, 70, 0, 130], [700, 33, 5, 1500], 4, dh, torch.bfloat16,
           fcfg=dict(variant=Variant.TL), seed=dh + 1)


def test_empty_inputs(kernel_device):
    fwd, bwd = _mods()
    dt = torch.float32
    cfg = _cfg(kernel_device, dt, 32, SMALL_F, SMALL_B)
    ins, co, xo = _case(kernel_device, [0, 0], [4, 3], 2, 32, dt)
    o, lse = fwd.dcat_fwd_triton(*ins, co, xo, 0, 0.2, 0, 4)
    assert o.shape == (0, 2, 32) and lse.shape == (0, 2)
    g = bwd.dcat_bwd_triton(torch.zeros_like(o), *ins, o, lse, co, xo, 0, 0.2, 0, 4, cfg)
    assert torch.equal(g[3], torch.zeros_like(ins[3])) and torch.equal(g[4], torch.zeros_like(ins[4]))
    ins, co, xo = _case(kernel_device, [2, 3], [0, 0], 2, 32, dt)  # Lc = 0: o = v
    o, lse = fwd.dcat_fwd_triton(*ins, co, xo, 0, 0.2, 3, 0, cfg.fwd)
    torch.testing.assert_close(o, ins[2])
    g = bwd.dcat_bwd_triton(torch.randn_like(o), *ins, o, lse, co, xo, 0, 0.2, 3, 0, cfg)
    assert g[3].shape == (0, 2, 32) and torch.isfinite(g[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_spanning_past_fp32_exp_range(dtype, kernel_device):
    # keys scaled up x40 along each history (bench.ramp_keys): later logits exceed the
    # first block's by far more than 2^127, the case the Gluon forward's fixed_max must hand
    # back to the online softmax (bf16 on Hopper; elsewhere the tl kernel) with several
    # splits: output and LSE stay finite and match fp64 in relative terms
    if dtype == torch.bfloat16 and kernel_device.type != "cuda":
        pytest.skip("bf16 kernels are checked compiled on CUDA")
    from pinfm_rec.kernels.dcat.check import ramp_keys
    fwd, _ = _mods()
    ins, co, xo = _case(kernel_device, [3, 2], [300, 90], 2, 64, dtype, seed=5)
    ins[3] = ramp_keys(ins[3], xo)
    tiles = SMALL_F if dtype == torch.float32 else {}
    cfg = _cfg(kernel_device, dtype, 64, dict(tiles, split_size=64 if tiles else 128))
    o, lse = fwd.dcat_fwd_triton(*ins, co, xo, 0, 0.125, 3, 300, cfg.fwd)
    ref, ref_lse = dcat_reference(*[t.double() for t in ins], co, xo, return_lse=True)
    # the case really spans that far: request 0's last keys against its first 16-key block
    s = torch.einsum("chd,lhd->chl", ins[0][:3].double(), ins[3][:300].double()) * 0.125 * 1.4427
    assert (s.amax(-1) - s[..., :16].amax(-1)).max() > 128
    if dtype == torch.float32:
        torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-3)
    else:  # bf16 inputs: the error of SDPA in bf16 is ~1e-3 relative (bench ramp_check)
        assert torch.isfinite(o).all() and torch.isfinite(lse).all()
        rel = (o.double() - ref).norm() / ref.norm()
        assert rel < 2e-2, rel
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-2, atol=0.5)


def test_repeated_gluon_calls_launch_directly_and_stay_exact(kernel_device):
    # after the first call of a shape class, the Gluon forward is launched without Triton's
    # binder (gluon_launch._run): later calls with new data must still match fp64
    if kernel_device.type != "cuda" or not select(kernel_device, torch.bfloat16, 64).variant.gluon:
        pytest.skip("the Gluon forward runs on Hopper GPUs only")
    from pinfm_rec.kernels.dcat import gluon_launch
    for seed in range(3):
        _check(kernel_device, [3, 70], [300, 1200], 2, 64, torch.bfloat16, seed=10 + seed)
        _check(kernel_device, [3, 70], [300, 1200], 2, 64, torch.float16, seed=20 + seed)
    assert gluon_launch._KERNELS and not gluon_launch._DIRECT_FAILED


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cached_descriptor_launch_matches_the_default_launch_bit_for_bit(
        kernel_device, dtype, monkeypatch):
    """The cached-descriptor launch (issue 15; on unless PINFM_DCAT_CACHED_LAUNCH=0): the Gluon forward
    launched through Triton's C launcher with TMA descriptors encoded once per K/V pair must
    give exactly the default launch's outputs, on unsplit, split (fused combine) and
    max_ctx-windowed calls, with new K/V tensors between calls (descriptors re-encoded)."""
    if kernel_device.type != "cuda" or not select(kernel_device, dtype, 64).variant.gluon:
        pytest.skip("the Gluon forward runs on Hopper GPUs only")
    fwd, _ = _mods()
    from pinfm_rec.kernels.dcat import gluon_launch as g
    fast_calls = []
    real_fast = g._fast_launch

    def counting(*a):
        ran = real_fast(*a)
        fast_calls.append(ran)
        return ran
    monkeypatch.setattr(g, "_fast_launch", counting)
    monkeypatch.setattr(g, "_FAST_FAILED", [])
    monkeypatch.setattr(g, "CACHED_LAUNCH", g.CACHED_LAUNCH)  # the process's setting comes back
    monkeypatch.setattr(fwd, "_PLANS", {})
    monkeypatch.setattr(g, "_KERNELS", {})
    cases = [([256] * 2, [1024] * 2, 0), ([3, 70], [300, 1200], 0),
             ([1, 70, 130], [13000, 0, 12500], 0), ([1, 70, 130], [13000, 0, 12500], 700)]
    for i, (cl, xl, max_ctx) in enumerate(cases):
        for seed in range(2):  # new tensors: new descriptors, encoded on first use
            ins, co, xo = _case(kernel_device, cl, xl, 8, 64, dtype, seed=100 * i + seed)
            args = (*ins, co, xo, max_ctx, 0.125, max(cl), max(xl))
            outs = {}
            for on in (False, False, True, True, False):  # first call of a plan: JIT
                g.set_cached_launch(on)
                try:
                    outs.setdefault(on, []).append(fwd.dcat_fwd_triton(*args))
                finally:
                    g.set_cached_launch(False)
            torch.cuda.synchronize()
            base_o, base_lse = outs[False][1]
            deterministic = all(torch.equal(o, base_o) and torch.equal(lse, base_lse)
                                for o, lse in outs[False])
            for o, lse in outs[True]:
                if deterministic:
                    assert torch.equal(o, base_o) and torch.equal(lse, base_lse), (cl, xl)
                else:  # the default launch itself is not bitwise repeatable here
                    torch.testing.assert_close(o, base_o, rtol=0, atol=2e-2)
                    torch.testing.assert_close(lse, base_lse, rtol=0, atol=1e-3)
    assert not g._FAST_FAILED, g._FAST_FAILED
    assert fast_calls and all(fast_calls)  # the cached path launched, every time it was asked
    plans = [p.gluon for p in fwd._PLANS.values() if p.gluon is not None]
    assert plans and all(p.kernel.fast is not None for p in plans)


def _qkv_slices(t, h, dh, gen, dtype, dev):
    """[T, H, Dh] x 3 row-strided views of one [T, 3, H, Dh] projection (the trunk's layout)."""
    qkv = torch.randn(t, 3, h, dh, generator=gen).to(dev, dtype)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


@pytest.mark.parametrize("gluon_strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_strided_qkv_views_are_read_in_place(dtype, gluon_strided, kernel_device, monkeypatch):
    """q, k, v and the K/V cache as slices of qkv projections (row stride 3*H*Dh, what the trunk
    passes): the forward reads them in place (no copies) and gives exactly what it gives on
    contiguous copies, unsplit and split, through the selected kernel (Gluon on Hopper
    half dtypes, tl elsewhere); mixed strides fall back to contiguous copies, same answer."""
    if dtype == torch.bfloat16 and kernel_device.type != "cuda":
        pytest.skip("bf16 kernels are checked compiled on CUDA")
    fwd, _ = _mods()
    # the Gluon kernel's strided reads: on (the default) and off (PINFM_DCAT_GLUON_STRIDED=0)
    monkeypatch.setattr(fwd, "GLUON_STRIDED", gluon_strided)
    g = torch.Generator().manual_seed(3)
    h, dh = 2, 64
    cl, xl = [3, 70, 1], [300, 45, 1200]
    co, xo = _offs(cl, kernel_device), _offs(xl, kernel_device)
    q, k, v = _qkv_slices(sum(cl), h, dh, g, dtype, kernel_device)
    _, kc, vc = _qkv_slices(sum(xl), h, dh, g, dtype, kernel_device)
    assert fwd.rows_stride(q, k, v) == 3 * h and fwd.rows_stride(kc, vc) == 3 * h
    tiles = SMALL_F if kernel_device.type != "cuda" else {}
    for split in (None, 64 if tiles else 128):
        cfg = _cfg(kernel_device, dtype, dh, dict(tiles, split_size=split))
        args = (co, xo, 0, dh ** -0.5, max(cl), max(xl), cfg.fwd)
        o, lse = fwd.dcat_fwd_triton(q, k, v, kc, vc, *args)
        o_c, lse_c = fwd.dcat_fwd_triton(*(t.contiguous() for t in (q, k, v, kc, vc)), *args)
        assert o.is_contiguous() and o.shape == (sum(cl), h, dh)
        assert torch.equal(o, o_c) and torch.equal(lse, lse_c), split
        # one of the group with another stride: copied, same result
        o_m, _ = fwd.dcat_fwd_triton(q, k.contiguous(), v, kc, vc.contiguous(), *args)
        assert torch.equal(o_m, o_c), split
    ref = dcat_reference(*(t.double() for t in (q, k, v, kc, vc)), co, xo)
    _close(o, ref, dtype, "o")
    # through the public op, inference mode (the path that skips the copies)
    from pinfm_rec.kernels.dcat import dcat_attention
    with torch.no_grad():
        o_op = dcat_attention(q, k, v, kc, vc, co, xo, kernel="triton", max_cands=max(cl),
                              max_ctx_len=max(xl))
    _close(o_op, ref, dtype, "op")


def test_rows_stride_rejects_what_the_kernels_cannot_read():
    from pinfm_rec.kernels.dcat.triton_fwd import rows_stride
    x = torch.zeros(5, 3, 2, 8)
    q, k, v = x[:, 0], x[:, 1], x[:, 2]
    assert rows_stride(q, k, v) == 6 and rows_stride(q, k) == 6
    c = torch.zeros(5, 2, 8)
    assert rows_stride(c, c, c) == 2  # contiguous: H
    assert rows_stride(q, c) == 0  # different strides
    t = torch.zeros(2, 8, 5).permute(2, 0, 1)  # (H, Dh) part not dense
    assert rows_stride(t, t) == 0
    y = torch.zeros(5, 2, 16)[:, :, :8]  # rows dense in Dh, but heads 16 apart
    assert rows_stride(y, y) == 0
    one = torch.zeros(1, 2, 8).as_strided((1, 2, 8), (2 ** 40, 8, 1))  # one row: any stride is legal
    assert rows_stride(one, one) == 2  # read as contiguous (the kernels take the stride as int32)

    class Huge:  # a row stride past int32 (no real tensor of that extent is needed)
        shape = (2, 2, 8)

        def stride(self):
            return (8 * 2 ** 31, 8, 1)
    assert rows_stride(Huge(), Huge()) == 0  # the kernels take it as int32: copied


def test_strided_inputs_reach_the_kernel_uncopied_and_misaligned_views_skip_tma(
        kernel_device, monkeypatch):
    """The tl launch gets the views themselves (row stride 3H, the same storage) on the inference
    path; a K/V view whose base is not 16-byte aligned (offset by one element) is read without TMA
    descriptors (which need an aligned base) and still matches the reference."""
    if kernel_device.type == "cuda":
        pytest.skip("checks the tl launch's arguments (the CPU/interpreter path)")
    fwd, _ = _mods()
    seen = []
    real = fwd._launch_tl

    def spy(grid, args, k_ctx, v_ctx, *rest, **kw):
        seen.append((args[0].data_ptr(), k_ctx.data_ptr(), rest[-2], rest[-1]))
        return real(grid, args, k_ctx, v_ctx, *rest, **kw)
    monkeypatch.setattr(fwd, "_launch_tl", spy)
    g = torch.Generator().manual_seed(5)
    h, dh, cl, xl = 2, 32, [3, 5], [40, 17]
    co, xo = _offs(cl, kernel_device), _offs(xl, kernel_device)
    q, k, v = _qkv_slices(sum(cl), h, dh, g, torch.float32, kernel_device)
    _, kc, vc = _qkv_slices(sum(xl), h, dh, g, torch.float32, kernel_device)
    from pinfm_rec.kernels.dcat import dcat_attention
    with torch.no_grad():
        o = dcat_attention(q, k, v, kc, vc, co, xo, kernel="triton", max_cands=5, max_ctx_len=40)
    assert seen[-1] == (q.data_ptr(), kc.data_ptr(), 3 * h, 3 * h)
    _close(o, dcat_reference(*(t.double() for t in (q, k, v, kc, vc)), co, xo), torch.float32, "o")
    buf = torch.randn(sum(xl) * 3 * h * dh + 1, generator=g)[1:]  # 4-byte offset: misaligned base
    qkv_x = buf.view(sum(xl), 3, h, dh)
    kc2, vc2 = qkv_x[:, 1], qkv_x[:, 2]
    assert (kc2.data_ptr() | vc2.data_ptr()) & 15
    cfg = _cfg(kernel_device, torch.float32, dh, dict(SMALL_F, tma=True))
    o2, _ = fwd.dcat_fwd_triton(q, k, v, kc2, vc2, co, xo, 0, dh ** -0.5, 5, 40, cfg.fwd)
    assert seen[-1][2:] == (3 * h, 3 * h)
    ref = dcat_reference(*(t.double() for t in (q, k, v, kc2, vc2)), co, xo)
    _close(o2, ref, torch.float32, "o misaligned")
