"""DCAT reference and stock (SDPA) path tests (CPU)."""

import math

import pytest
import torch

from pinfm_rec.kernels.dcat.reference import dcat_reference, dcat_sdpa


def _offs(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)


def _inputs(cl, xl, h, dh, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(sum(cl) * 131 + sum(xl))
    mk = lambda n: torch.randn(n, h, dh, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return [mk(sum(cl)), mk(sum(cl)), mk(sum(cl)), mk(sum(xl)), mk(sum(xl))], _offs(cl), _offs(xl)


def _explicit(q, k, v, kc, vc, co, xo, max_ctx):
    """Append each candidate alone to its history; full causal attention; take last row."""
    outs = []
    dh = q.shape[-1]
    for r in range(co.numel() - 1):
        hk, hv = kc[xo[r]:xo[r + 1]], vc[xo[r]:xo[r + 1]]
        if max_ctx > 0:
            hk, hv = hk[hk.shape[0] - min(max_ctx, hk.shape[0]):], hv[hv.shape[0] - min(max_ctx, hv.shape[0]):]
        for j in range(co[r], co[r + 1]):
            K = torch.cat([hk, k[j:j + 1]]).transpose(0, 1)  # [H, n+1, Dh]
            V = torch.cat([hv, v[j:j + 1]]).transpose(0, 1)
            Q = torch.cat([torch.zeros_like(hk), q[j:j + 1]]).transpose(0, 1)  # only last row used
            n = K.shape[1]
            s = Q @ K.transpose(1, 2) / math.sqrt(dh)
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            outs.append((s.softmax(-1) @ V)[:, -1])
    return torch.stack(outs) if outs else q.new_zeros(q.shape)


@pytest.mark.parametrize("max_ctx", [0, 3])
def test_reference_equals_append_and_full_causal(max_ctx):
    (q, k, v, kc, vc), co, xo = _inputs([2, 0, 3, 1], [5, 4, 0, 9], 2, 16, torch.float64)
    ref = dcat_reference(q, k, v, kc, vc, co, xo, max_ctx=max_ctx)
    exp = _explicit(q, k, v, kc, vc, co, xo, max_ctx)
    torch.testing.assert_close(ref, exp, rtol=1e-10, atol=1e-10)


def test_reference_gradcheck_fp64():
    ins, co, xo = _inputs([2, 0, 3], [4, 3, 0], 2, 8, torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda *a: dcat_reference(*a, co, xo), ins)
    assert torch.autograd.gradcheck(lambda *a: dcat_reference(*a, co, xo, max_ctx=2), ins)


def test_reference_lse_and_dtype():
    (q, k, v, kc, vc), co, xo = _inputs([3, 2], [4, 0], 2, 16, torch.float16)
    o, lse = dcat_reference(q, k, v, kc, vc, co, xo, return_lse=True)
    assert o.dtype == torch.float16 and lse.dtype == torch.float32 and lse.shape == (5, 2)
    # request 1 has no history: output is its own value, lse its self score
    torch.testing.assert_close(o[3:], v[3:])
    s_self = (q[3:].float() * k[3:].float()).sum(-1) / 4.0
    torch.testing.assert_close(lse[3:], s_self)


@pytest.mark.parametrize("cl,xl,max_ctx,int32", [
    ([3, 0, 5, 1], [7, 4, 0, 12], 0, False),   # ragged, empty histories, 0/1 candidates
    ([3, 0, 5, 1], [7, 4, 0, 12], 5, True),    # max_ctx window, int32 offsets
    ([4, 4], [6, 6], 0, False),                # dense: pure views
])
def test_sdpa_stock_path_matches_reference(cl, xl, max_ctx, int32):
    ins, co, xo = _inputs(cl, xl, 2, 32, grad=True)
    if int32:
        co, xo = co.int(), xo.int()
    ref = dcat_reference(*ins, co, xo, max_ctx=max_ctx)
    out = dcat_sdpa(*ins, co, xo, max_ctx=max_ctx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sdpa_stock_path_empty():
    ins, co, xo = _inputs([0, 0], [3, 2], 2, 16)
    assert dcat_sdpa(*ins, co, xo).shape == (0, 2, 16)
    ins, co, xo = _inputs([2, 1], [0, 0], 2, 16)
    torch.testing.assert_close(dcat_sdpa(*ins, co, xo), ins[2])


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_flex_attention_peer_computes_dcat():
    # the bench's flex_attention column (issue 15's peer) computes the same crossing
    # attention: block mask kv < L or kv - L == q over [history; candidates], eager on CPU
    pytest.importorskip("torch.nn.attention.flex_attention")
    from pinfm_rec.kernels.dcat.peers import flex_dcat, flex_inputs
    R, L, C, h, dh = 2, 24, 8, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(R * C, h, dh, generator=g) for _ in range(3))
    kc, vc = (torch.randn(R * L, h, dh, generator=g) for _ in range(2))
    co, xo = _offs([C] * R), _offs([L] * R)
    fn = flex_dcat(R, L, C, device="cpu", compile=False)
    out = fn(*flex_inputs(q, k, v, kc, vc, R, L, C))  # [R, H, C, Dh]
    ref = dcat_reference(q, k, v, kc, vc, co, xo)
    torch.testing.assert_close(out.transpose(1, 2).reshape(R * C, h, dh), ref, rtol=1e-4,
                               atol=1e-4)
