"""DCAT dispatch on the host side: which variant a (device, dtype, Dh) gets (config.py: one
frozen config, chosen once and cached), the Gluon kernel's input checks and build-error
fallback, shared-memory fitting of the tl tiles, an explicit config through the public op,
the per-shape forward plans and the cached max lengths. The Gluon launch path itself:
tests/test_dcat_launch.py. Kernels run compiled on CUDA when present, else through the
Triton interpreter (tests/conftest.py)."""

import dataclasses
import os

import pytest
import torch

from pinfm_rec.kernels.dcat import config as C
from pinfm_rec.kernels.dcat.config import BwdConfig, DcatConfig, FwdConfig, Tile, Variant


def _fwd():
    from pinfm_rec.kernels.dcat import triton_fwd
    return triton_fwd


def test_fit_smem_keeps_half_precision_defaults_and_shrinks_fp32_dh128():
    f = _fwd().fit_smem
    # forward: K/V streamed [BN, Dh] x 2 per stage, q resident
    assert f(128, 64, 3, 2, 1, 64, 2) == (128, 3)      # bf16 Dh 64: the benchmarked tile
    assert f(128, 64, 3, 2, 1, 128, 2) == (128, 3)     # bf16 Dh 128 fits as is
    assert f(128, 64, 3, 2, 1, 64, 4) == (128, 3)      # fp32 Dh 64 fits as is
    assert f(128, 64, 3, 2, 1, 128, 4) == (32, 3)      # fp32 Dh 128: 360 KB on the GPU before
    # dq: K/V streamed, q and do resident (128 rows): rows down to 32, then a stage less
    assert f(64, 128, 3, 2, 2, 128, 4) == (32, 2)
    # every result fits the budget
    for args in [(128, 64, 3, 2, 1, 128, 4), (64, 128, 3, 2, 2, 128, 4)]:
        rows, st = f(*args)
        _, res, _, ns, nr, dh, el = args
        assert (st * ns * rows + nr * res) * dh * el <= _fwd().SMEM_BUDGET


@pytest.mark.parametrize("cap, dtype, dh, gluon, want", [
    ((9, 0), torch.bfloat16, 64, True, Variant.GLUON_FIXED_MAX),
    ((9, 0), torch.bfloat16, 32, True, Variant.GLUON_FIXED_MAX),
    ((9, 0), torch.bfloat16, 128, True, Variant.GLUON_ONLINE),   # fixed-max spills at 128
    ((9, 0), torch.float16, 64, True, Variant.GLUON_ONLINE),     # fp16 p overflows at 2^16
    ((9, 0), torch.float32, 64, True, Variant.TL),               # IEEE dots
    ((9, 0), torch.bfloat16, 16, True, Variant.TL),              # head dims not checked on GPU
    ((9, 0), torch.bfloat16, 64, False, Variant.TL),             # Triton without Gluon Hopper
    ((8, 0), torch.bfloat16, 64, True, Variant.TL),              # A100: no wgmma
    ((10, 0), torch.bfloat16, 64, True, Variant.TL),             # Blackwell: sm_90 code only
    (None, torch.bfloat16, 64, True, Variant.INTERPRET),         # no CUDA
])
def test_variant_per_device_dtype_and_head_dim(cap, dtype, dh, gluon, want):
    assert C.choose_variant(cap, dtype, dh, gluon) is want


def test_config_is_frozen_selected_once_and_cached():
    dev = torch.device("cpu")
    a = C.select(dev, torch.float32, 32)
    assert C.select(dev, torch.float32, 32) is a                 # cached
    assert a.variant is Variant.INTERPRET and a.interpret
    assert a.fwd.tma is False                                     # no TMA off CUDA
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.fwd.block_m = 16
    # the launchers keep no mutable launch config of their own
    from pinfm_rec.kernels.dcat import triton_bwd
    assert not hasattr(_fwd(), "FWD_CONFIG") and not hasattr(triton_bwd, "BWD_CONFIG")
    j = C.as_json(a)
    assert j["fwd"]["variant"] == "interpret" and j["bwd"]["dq"]["rows"] == a.bwd.dq.rows
    # on CUDA: a compiled variant, TMA from compute capability 9 on
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        g = C.select(torch.device("cuda"), torch.bfloat16, 64)
        cap = torch.cuda.get_device_capability()
        assert g.variant is C.choose_variant(cap, torch.bfloat16, 64, C._gluon_available())
        assert g.fwd.tma == (cap[0] >= 9 and C._tma_available())


def test_gluon_kernel_refuses_cpu_tensors_and_other_variants():
    tf = _fwd()
    q = torch.randn(5, 2, 64, dtype=torch.bfloat16)
    kc = torch.randn(40, 2, 64, dtype=torch.bfloat16)
    for v in Variant:
        assert not tf._gluon_usable(q, kc, kc, FwdConfig(variant=v))  # CPU tensors
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch
    assert not gluon_launch.usable(q, kc, kc, FwdConfig(variant=Variant.GLUON_FIXED_MAX))


def _ragged(dev, dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cl, xl = [3, 0, 5], [20, 7, 0]
    q, k, v = (torch.randn(sum(cl), 2, dh, generator=g).to(dev) for _ in range(3))
    kc, vc = (torch.randn(sum(xl), 2, dh, generator=g).to(dev) for _ in range(2))
    co = torch.tensor([0, 3, 3, 8], device=dev)
    xo = torch.tensor([0, 20, 27, 27], device=dev)
    return q, k, v, kc, vc, co, xo


def test_gluon_build_error_falls_back_to_the_tl_kernel(monkeypatch, kernel_device):
    """A Gluon build error (its API moves between Triton releases) warns once, is remembered,
    and the call is served by the tl kernel with the same result (fp32 inputs, so the tl
    kernel computes exactly; the Hopper checks of gluon_launch.usable_for are replaced by
    'yes', so only the recorded failure keeps the second call off the Gluon kernel)."""
    tf = _fwd()
    from triton.runtime.errors import OutOfResources

    from pinfm_rec.kernels.dcat import gluon_launch
    from pinfm_rec.kernels.dcat.reference import dcat_reference
    calls = []

    def broken_launch(*a, **k):
        calls.append(1)
        raise OutOfResources(300000, 232448, "shared memory")

    failed = []
    monkeypatch.setattr(tf, "_GLUON_FAILED", failed)
    monkeypatch.setattr(tf, "_PLANS", {})
    monkeypatch.setattr(gluon_launch, "usable_for", lambda *a, **k: True)
    monkeypatch.setattr(gluon_launch, "launch", broken_launch)
    q, k, v, kc, vc, co, xo = _ragged(kernel_device)
    cfg = FwdConfig(variant=Variant.GLUON_FIXED_MAX, block_m=16, block_n=16)
    ref = dcat_reference(q.double(), k.double(), v.double(), kc.double(), vc.double(), co, xo)
    with pytest.warns(RuntimeWarning, match="Gluon forward unavailable"):
        o, _ = tf.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.25, 5, 20, cfg)
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)
    assert calls == [1] and len(failed) == 1 and "OutOfResources" in failed[0]
    o2, _ = tf.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.25, 5, 20, cfg)
    assert calls == [1]  # remembered: no second attempt
    torch.testing.assert_close(o2, o)


def test_explicit_config_through_the_public_op(kernel_device):
    # an explicit config (small tiles, forced splits) runs forward and backward and gives the
    # default config's result; the selected default is not changed by it
    from pinfm_rec.kernels.dcat import dcat_attention
    ins = _ragged(kernel_device, dh=32, seed=1)
    base = C.select(kernel_device, torch.float32, 32)
    small = DcatConfig(dataclasses.replace(base.fwd, block_m=16, block_n=16, split_size=16),
                       BwdConfig(dq=Tile(16, 16), kv=Tile(16, 16), split_size=16))
    outs, grads = [], []
    for cfg in (None, small):
        xs = [t.clone().requires_grad_() for t in ins[:5]]
        o = dcat_attention(*xs, *ins[5:], kernel="triton", config=cfg)
        o.backward(torch.ones_like(o))
        outs.append(o.detach())
        grads.append([x.grad for x in xs])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert C.select(kernel_device, torch.float32, 32) is base


def test_tune_candidates_are_new_configs_around_the_base():
    pytest.importorskip("triton")
    from pinfm_rec.kernels.dcat.tune import candidates
    base = C.default_config(Variant.GLUON_FIXED_MAX, tma=True)
    fwd, dqs, kvs = candidates(base)
    assert fwd[0] == base.fwd and len(set(fwd)) == len(fwd)
    assert all(f.variant is base.variant for f in fwd)
    assert all(isinstance(b, BwdConfig) for b in dqs) and kvs
    assert base == C.default_config(Variant.GLUON_FIXED_MAX, tma=True)  # unchanged


def test_forward_plan_is_cached_per_shape_key(monkeypatch):
    # dcat_fwd_triton decides split size, grids and Gluon usability once per key (config,
    # device, dtypes, R, H, Dh, max lengths, max_ctx): a second call with new data of the same
    # key reuses the plan; another max length makes a new one
    tf = _fwd()
    monkeypatch.setattr(tf, "_PLANS", {})
    q, k, v, kc, vc, co, xo = _ragged("cpu")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors run through the Triton interpreter only")
    o1, _ = tf.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.25, 5, 20)
    assert len(tf._PLANS) == 1
    (key, plan), = tf._PLANS.items()
    assert plan.gluon is None and plan.grid == (3 * plan.n_mtiles, 2, plan.n_split)
    o2, _ = tf.dcat_fwd_triton(q * 1, k, v, kc, vc, co, xo, 0, 0.25, 5, 20)
    assert len(tf._PLANS) == 1 and tf._PLANS[key] is plan
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    tf.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.25, 5, 21)
    assert len(tf._PLANS) == 2


def test_max_len_of_cpu_offsets_is_never_cached():
    # nothing to save on the CPU, and a write through .numpy() bumps no version counter
    from pinfm_rec.kernels.dcat import op
    co = torch.tensor([0, 3, 3, 8])
    assert op._max_len(co) == 5 and id(co) not in op._MAX_LENS
    co.numpy()[2] = 1
    assert op._max_len(co) == 7


def test_max_len_cached_per_offsets_tensor_until_modified(monkeypatch):
    from pinfm_rec.kernels.dcat import op
    monkeypatch.setattr(op, "_cached_device", lambda t: True)  # as for CUDA tensors
    co = torch.tensor([0, 3, 3, 8])
    assert op._max_len(co) == 5
    assert op._max_len(co) == 5 and id(co) in op._MAX_LENS
    co[3] = 20  # in-place write: version bump, recomputed
    assert op._max_len(co) == 17
    other = torch.tensor([0, 1, 2])
    assert op._max_len(other) == 1
    with torch.inference_mode():
        inf = torch.tensor([0, 4, 6])
    assert op._max_len(inf) == 4 and id(inf) not in op._MAX_LENS  # no version: not cached
    assert op._max_len(torch.tensor([0])) == 0
