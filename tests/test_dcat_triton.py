"""DCAT Triton kernels vs the PyTorch reference, on CPU through the Triton
interpreter (TRITON_INTERPRET=1 is set here, before anything imports triton;
the kernel modules are imported lazily for the same reason)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pinfm_rec.kernels.dcat.reference import dcat_reference  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1")


def _mods():
    from pinfm_rec.kernels.dcat import triton_bwd, triton_fwd
    return triton_fwd, triton_bwd


def _offs(lens, dev):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev)


def _case(cl, xl, h, dh, dtype, seed=0):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(n, h, dh, generator=g).to(dev, dtype)  # noqa: E731
    ins = [mk(sum(cl)), mk(sum(cl)), mk(sum(cl)), mk(sum(xl)), mk(sum(xl))]
    return ins, _offs(cl, dev), _offs(xl, dev)


def _check(cl, xl, h, dh, dtype, max_ctx=0, fcfg=None, bcfg=None, seed=0):
    fwd, bwd = _mods()
    ins, co, xo = _case(cl, xl, h, dh, dtype, seed)
    scale = dh ** -0.5
    mc, ml = max(cl), max(xl)
    o, lse = fwd.dcat_fwd_triton(*ins, co, xo, max_ctx, scale, mc, ml, fcfg)
    xs = [t.double().requires_grad_() for t in ins]
    ref, ref_lse = dcat_reference(*xs, co, xo, max_ctx=max_ctx, return_lse=True)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(o.double(), ref.detach(), **tol)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), **tol)
    do = torch.randn_like(o)
    grads = bwd.dcat_bwd_triton(do, *ins, o, lse, co, xo, max_ctx, scale, mc, ml, bcfg)
    ref_g = torch.autograd.grad(ref, xs, do.double())
    for name, a, b in zip(["dq", "dk", "dv", "dk_ctx", "dv_ctx"], grads, ref_g):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, **tol, msg=name)


SMALL_F = dict(BLOCK_M=16, BLOCK_N=16)
SMALL_B = dict(DQ_BLOCK_M=16, DQ_BLOCK_N=16, KV_BLOCK_N=16, KV_BLOCK_M=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ragged_fwd_bwd(dtype):
    # empty histories, requests with 0 and 1 candidates, tails of every tile
    _check([3, 0, 21, 1, 5], [0, 9, 37, 17, 1], 2, 32, dtype, fcfg=SMALL_F, bcfg=SMALL_B)


@pytest.mark.parametrize("dh", [32, 64, 128])
def test_head_dims(dh):
    _check([2, 5], [7, 20], 1, dh, torch.float32, fcfg=SMALL_F, bcfg=SMALL_B, seed=dh)


@pytest.mark.parametrize("max_ctx", [1, 6, 40])
def test_max_ctx(max_ctx):
    _check([4, 0, 3], [30, 5, 0], 2, 32, torch.float32, max_ctx=max_ctx,
           fcfg=dict(SMALL_F, split_size=16), bcfg=dict(SMALL_B, split_size=16))


def test_split_history_long():
    # long history, small H: exercises the split-K forward + combine and split dq
    _check([9, 2], [700, 3], 1, 32, torch.float32,
           fcfg=dict(BLOCK_M=16, BLOCK_N=64, split_size=192),
           bcfg=dict(DQ_BLOCK_M=16, DQ_BLOCK_N=64, KV_BLOCK_N=64, KV_BLOCK_M=16, split_size=256))


def test_split_fp16_default_tiles():
    # default (GPU) tile sizes through the interpreter, with a forced split
    _check([20], [150], 1, 64, torch.float16, fcfg=dict(split_size=64),
           bcfg=dict(split_size=64))


def test_empty_inputs():
    fwd, bwd = _mods()
    ins, co, xo = _case([0, 0], [4, 3], 2, 32, torch.float32)
    o, lse = fwd.dcat_fwd_triton(*ins, co, xo, 0, 0.2, 0, 4)
    assert o.shape == (0, 2, 32) and lse.shape == (0, 2)
    g = bwd.dcat_bwd_triton(torch.zeros_like(o), *ins, o, lse, co, xo, 0, 0.2, 0, 4, SMALL_B)
    assert torch.equal(g[3], torch.zeros_like(ins[3])) and torch.equal(g[4], torch.zeros_like(ins[4]))
    ins, co, xo = _case([2, 3], [0, 0], 2, 32, torch.float32)  # Lc = 0: o = v
    o, lse = fwd.dcat_fwd_triton(*ins, co, xo, 0, 0.2, 3, 0, SMALL_F)
    torch.testing.assert_close(o, ins[2])
    g = bwd.dcat_bwd_triton(torch.randn_like(o), *ins, o, lse, co, xo, 0, 0.2, 3, 0, SMALL_B)
    assert g[3].shape == (0, 2, 32) and torch.isfinite(g[0]).all()


def test_logits_spanning_past_fp32_exp_range():
    # keys scaled up x40 along each history (bench.ramp_keys): later logits exceed the
    # first block's by far more than 2^127, the case the Gluon forward's fixed_max must hand
    # back to the online softmax. Here the tl kernel (the interpreter runs no Gluon) with
    # several splits: output and LSE stay finite and match fp64 in relative terms
    from pinfm_rec.kernels.dcat.bench import ramp_keys
    fwd, _ = _mods()
    ins, co, xo = _case([3, 2], [300, 90], 2, 64, torch.float32, seed=5)
    ins[3] = ramp_keys(ins[3], xo)
    o, lse = fwd.dcat_fwd_triton(*ins, co, xo, 0, 0.125, 3, 300, dict(SMALL_F, split_size=64))
    ref, ref_lse = dcat_reference(*[t.double() for t in ins], co, xo, return_lse=True)
    # the case really spans that far: request 0's last keys against its first 16-key block
    s = torch.einsum("chd,lhd->chl", ins[0][:3], ins[3][:300]) * 0.125 * 1.4427
    assert (s.amax(-1) - s[..., :16].amax(-1)).max() > 128
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-3)
