"""DCAT dispatch on the host side: which variant a (device, dtype, Dh) gets (config.py: one
frozen config, chosen once and cached), the Gluon kernel's input checks and build-error
fallback, shared-memory fitting of the tl tiles, an explicit config through the public op,
and the split-ticket buffers. Kernels run compiled on CUDA when present, else through the
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
    kernel computes exactly; the Hopper checks of _gluon_usable are replaced by 'no failure
    recorded yet')."""
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
    monkeypatch.setattr(tf, "_gluon_usable", lambda *a, **k: not failed)
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


def test_split_ticket_buffers_graph_captures_never_share_with_eager(monkeypatch):
    # fuse_combine's tickets are cached per (device, stream); a CUDA graph capture must get
    # its own buffers (a replay can run beside eager launches on another stream) and keep
    # them allocated when a bigger one replaces them. Host logic only: CUDA state faked
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch as g

    class _Stream:
        cuda_stream = 7

    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(g, "_COUNTERS", {})
    monkeypatch.setattr(g, "_GRAPH_COUNTERS", [])
    dev = torch.device("cpu")
    eager = g._counters(dev, 10)
    assert g._counters(dev, 20) is eager and int(eager.sum()) == 0  # reused, zeroed
    capturing[0] = True
    graph = g._counters(dev, 10)
    assert graph is not eager and g._GRAPH_COUNTERS == [graph]
    bigger = g._counters(dev, 5000)
    assert bigger.numel() >= 5000 and g._GRAPH_COUNTERS == [graph, bigger]
    capturing[0] = False
    assert g._counters(dev, 10) is eager


def test_tma_descriptors_cached_per_tensor_and_bounded(monkeypatch):
    # host-overhead cache of the Gluon launch: the same K/V tensor reuses its descriptor, a
    # different one (or another block size) gets its own, and at most _MAX_DESCRIPTORS stay
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch as g
    monkeypatch.setattr(g, "_DESCRIPTORS", {})
    ts = [torch.randn(40, 2 * 64, dtype=torch.bfloat16) for _ in range(6)]
    a = g._descriptor(ts[0], 40, 128, 128, 64)
    assert g._descriptor(ts[0], 40, 128, 128, 64) is a
    assert g._descriptor(ts[0], 40, 128, 64, 64) is not a
    assert a.base is ts[0] and list(a.block_shape) == [128, 64]
    for t in ts[1:]:
        g._descriptor(t, 40, 128, 128, 64)
    assert len(g._DESCRIPTORS) == g._MAX_DESCRIPTORS
    assert g._descriptor(ts[0], 40, 128, 128, 64) is not a  # evicted, rebuilt


def test_direct_launch_after_the_first_jit_launch(monkeypatch):
    # the Gluon forward's host path: the first call of a key goes through Triton's JIT (which
    # returns the CompiledKernel), later calls call that kernel with every parameter in
    # signature order; a failing direct launch warns once and the JIT path takes over.
    # Fakes stand in for Triton (the real path runs in the GPU tests)
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch as g
    calls = []

    class Compiled:
        fail = False

        def __getitem__(self, grid):
            def run(*args):
                if Compiled.fail:
                    raise TypeError("launcher API changed")
                calls.append(("direct", grid, args))
            return run

    class Kernel:
        arg_names = ["A", "n", "X", "Y"]

        def __getitem__(self, grid):
            def run(*args, **consts):
                calls.append(("jit", grid, args, consts))
                return Compiled()
            return run

    monkeypatch.setattr(g, "_COMPILED", {})
    monkeypatch.setattr(g, "_DIRECT_FAILED", [])
    k, consts = Kernel(), dict(Y=2, X=1)  # keyword order differs from the signature's
    g._run(k, (3, 1, 1), ("a", 5), consts, key=("k",))
    g._run(k, (4, 1, 1), ("b", 6), consts, key=("k",))
    g._run(k, (4, 1, 1), ("c", 7), consts, key=None)  # unkeyable call: always the JIT
    assert calls == [("jit", (3, 1, 1), ("a", 5), consts), ("direct", (4, 1, 1), ("b", 6, 1, 2)),
                     ("jit", (4, 1, 1), ("c", 7), consts)]
    Compiled.fail = True
    with pytest.warns(RuntimeWarning, match="direct launch unavailable"):
        g._run(k, (5, 1, 1), ("d", 8), consts, key=("k",))
    assert calls[-1] == ("jit", (5, 1, 1), ("d", 8), consts) and len(g._DIRECT_FAILED) == 1
    g._run(k, (5, 1, 1), ("e", 9), consts, key=("k",))
    assert calls[-1][0] == "jit"  # remembered


def test_direct_launch_key_needs_aligned_pointers_and_int32():
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch as g
    buf = torch.zeros(64, dtype=torch.bfloat16)
    q, co = buf[:32], torch.zeros(3, dtype=torch.int64)
    ptrs = (q,) * 5 + (co, co) + (q,) * 4 + (torch.zeros(4, dtype=torch.int32),)
    consts = dict(HEAD_DIM=64, SPLIT=True)
    key = g._launch_key(q, q, ptrs[-1], ptrs, (10, 8, 1, 0, 256), consts)
    assert key is not None and key[3:6] == (torch.int64, torch.int64, torch.int32)
    assert key != g._launch_key(q, q, ptrs[-1], ptrs, (10, 8, 1, 0, 256), dict(consts, SPLIT=False))
    odd = (buf[1:33],) + ptrs[1:]  # a 2-byte offset: Triton specialises on 16-byte alignment
    assert g._launch_key(q, q, ptrs[-1], odd, (10, 8, 1, 0, 256), consts) is None
    assert g._launch_key(q, q, ptrs[-1], ptrs, (2 ** 31, 8, 1, 0, 256), consts) is None
