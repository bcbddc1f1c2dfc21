"""DCAT forward dispatch on the host side: which kernel and tile a call gets (Gluon on
Hopper, the tl kernel elsewhere, the warp-specialised Gluon kernel for long histories),
shared-memory fitting of the tl tiles, and the arithmetic of the Gluon kernel's polynomial
exp2 (the PTX itself only runs on a GPU: docs/benchmarks/dcat.md has its GPU checks)."""

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


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


def test_ws_config_only_for_gluon_and_long_histories():
    tf = _fwd()
    base = dict(tf.FWD_CONFIG, impl="gluon", ws_min_ctx=12288, ws_waves=0.95)
    assert tf.ws_config(base, 8192) is base
    ws = tf.ws_config(base, 16384)
    assert ws["ws"] is True and ws["BLOCK_M"] == 128 and ws["waves"] == 0.95
    assert base.get("ws") is None  # the caller's dict is not changed
    assert tf.ws_config(dict(base, impl="tl"), 16384)["BLOCK_M"] == base["BLOCK_M"]
    assert tf.ws_config(dict(base, ws_min_ctx=0), 10 ** 6) is not None
    assert not tf.ws_config(dict(base, ws_min_ctx=0), 10 ** 6).get("ws")


def test_gluon_path_is_not_taken_off_hopper():
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    tf = _fwd()
    from pinfm_rec.kernels.dcat import gluon_launch
    q = torch.randn(5, 2, 64, dtype=torch.bfloat16)
    kc = torch.randn(40, 2, 64, dtype=torch.bfloat16)
    cfg = dict(tf.FWD_CONFIG, impl="gluon")
    assert not gluon_launch.usable(q, kc, kc, cfg)  # CPU tensors
    assert not tf._gluon_usable(q, kc, kc, cfg)


def _emulate_exp2_poly(x):
    """The fourth lane of gluon_fwd._EXP2_MIXED_ASM, step by step in float32."""
    from pinfm_rec.kernels.dcat import gluon_fwd
    asm = str(getattr(gluon_fwd._EXP2_MIXED_ASM, "value", gluon_fwd._EXP2_MIXED_ASM))
    consts = {h: np.frombuffer(bytes.fromhex(h)[::-1], np.float32)[0]
              for h in re.findall(r"0f([0-9A-F]{8})", asm)}
    lo, magic = consts["C2FC0000"], consts["4B400000"]
    fma = re.findall(r"fma\.rn\.f32 p, (?:f|p), (?:f|0f([0-9A-F]{8})), 0f([0-9A-F]{8})", asm)
    c3, c2 = consts[fma[0][0]], consts[fma[0][1]]
    c1, c0 = consts[fma[1][1]], consts[fma[2][1]]
    x = np.maximum(x.astype(np.float32), lo)
    t = (x + magic).astype(np.float32)
    j = (t - magic).astype(np.float32)
    f = (x - j).astype(np.float32)
    p = ((c3 * f + c2) * f + c1) * f + c0
    bits = p.astype(np.float32).view(np.int32) + (t.view(np.int32) << 23)
    return bits.view(np.float32)


def test_polynomial_exp2_matches_exp2_on_the_softmax_range():
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    x = np.concatenate([np.linspace(-30.0, 0.0, 200001), -np.random.default_rng(0).random(1000)
                        * 120.0]).astype(np.float32)
    got = _emulate_exp2_poly(x).astype(np.float64)
    want = np.exp2(x.astype(np.float64))
    rel = np.abs(got / want - 1.0)
    assert rel.max() < 1e-4          # below bf16 (3.9e-3) and fp16 (4.9e-4) rounding of p
    assert _emulate_exp2_poly(np.array([0.0], np.float32))[0] == pytest.approx(1.0, abs=1e-4)


def test_gluon_build_error_falls_back_to_the_tl_kernel(monkeypatch):
    """A Gluon build error (its API moves between Triton releases) warns once, is remembered,
    and the call is served by the tl kernel with the same result (interpreter here; the
    Hopper checks of _gluon_usable are replaced by 'no failure recorded yet')."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (the tl kernel on CPU)")
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
    g = torch.Generator().manual_seed(0)
    cl, xl = [3, 0, 5], [20, 7, 0]
    q, k, v = (torch.randn(sum(cl), 2, 16, generator=g) for _ in range(3))
    kc, vc = (torch.randn(sum(xl), 2, 16, generator=g) for _ in range(2))
    co = torch.tensor([0, 3, 3, 8])
    xo = torch.tensor([0, 20, 27, 27])
    cfg = dict(BLOCK_M=16, BLOCK_N=16, impl="gluon")
    ref = dcat_reference(q.double(), k.double(), v.double(), kc.double(), vc.double(), co, xo)
    with pytest.warns(RuntimeWarning, match="Gluon forward unavailable"):
        o, _ = tf.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.25, 5, 20, cfg)
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)
    assert calls == [1] and len(failed) == 1 and "OutOfResources" in failed[0]
    o2, _ = tf.dcat_fwd_triton(q, k, v, kc, vc, co, xo, 0, 0.25, 5, 20, cfg)
    assert calls == [1]  # remembered: no second attempt
    torch.testing.assert_close(o2, o)


def test_fwd_candidate_sets_every_config_key():
    # sweep / probe candidates are merged over FWD_CONFIG: a key missing from fwd_candidate
    # would silently inherit whatever the defaults are at that moment
    from pinfm_rec.kernels.dcat import triton_fwd as tf
    from pinfm_rec.kernels.dcat.tune import fwd_candidate
    assert set(fwd_candidate()) == set(tf.FWD_CONFIG)
    c = fwd_candidate(impl="tl", BLOCK_N=64)
    assert c["impl"] == "tl" and c["BLOCK_N"] == 64 and c["poly"] is False


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
