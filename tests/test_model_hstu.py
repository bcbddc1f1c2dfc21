"""HSTU block: causal within rows, crossing pass == appended-token forward, padding-invariant."""
import functools

import torch

from pinfm_rec.model.hstu import HSTULayer
from pinfm_rec.model.trunk import jagged_index


def _layer(seed=0, d=16, h=2, max_len=12):
    torch.manual_seed(seed)
    layer = HSTULayer(d, h, max_len, dropout=0.0)
    with torch.no_grad():  # non-trivial bias and gates
        layer.rel_bias.normal_(0, 0.5)
    return layer.eval().double()


def _causal(layer, x, offsets):
    total, b = x.shape[0], offsets.numel() - 1
    n = int((offsets[1:] - offsets[:-1]).max())
    rows, pos = jagged_index(offsets, total)
    attend = functools.partial(layer.causal_attention, flat_idx=rows * n + pos, b=b, n=n)
    return layer(x, attend)


def test_causal_rows_do_not_see_the_future_or_other_rows():
    layer = _layer()
    offsets = torch.tensor([0, 5, 6, 13])
    x = torch.randn(13, 16, dtype=torch.float64)
    y, _, _ = _causal(layer, x, offsets)
    x2 = x.clone()
    x2[4] += 3.0  # last token of row 0
    x2[12] += 3.0  # last token of row 2
    y2, _, _ = _causal(layer, x2, offsets)
    assert torch.allclose(y[:4], y2[:4]) and torch.allclose(y[5:12], y2[5:12])
    assert not torch.allclose(y[4], y2[4])
    # a row alone gives the same output as inside a batch (no leakage, padding-invariant)
    y_alone, _, _ = _causal(layer, x[6:13], torch.tensor([0, 7]))
    assert torch.allclose(y_alone, y[6:13], atol=1e-12)


def test_crossing_equals_appended_forward():
    layer = _layer(1)
    ctx_offsets = torch.tensor([0, 4, 4, 11])  # request 1 has an empty history
    cand_offsets = torch.tensor([0, 3, 5, 6])
    hist = torch.randn(11, 16, dtype=torch.float64)
    cands = torch.randn(6, 16, dtype=torch.float64)
    _, k_ctx, v_ctx = _causal(layer, hist, ctx_offsets)
    n_r = ctx_offsets[1:] - ctx_offsets[:-1]

    def attend(q, k, v):
        return layer.cross_attention(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets,
                                     max_ctx_len=int(n_r.max()), max_cands=3)

    got, _, _ = layer(cands, attend)
    for r in range(3):
        for j in range(int(cand_offsets[r]), int(cand_offsets[r + 1])):
            row = torch.cat([hist[ctx_offsets[r]:ctx_offsets[r + 1]], cands[j:j + 1]])
            ref, _, _ = _causal(layer, row, torch.tensor([0, row.shape[0]]))
            assert torch.allclose(got[j], ref[-1], atol=1e-10), (r, j)


def test_relative_bias_and_gradients_flow():
    layer = _layer(2).train()
    layer.drop.p = 0.0
    offsets = torch.tensor([0, 6, 9])
    x = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    y, _, _ = _causal(layer, x, offsets)
    y.square().sum().backward()
    assert layer.rel_bias.grad is not None and layer.rel_bias.grad[:, :6].abs().sum() > 0
    assert layer.rel_bias.grad[:, 6:].abs().sum() == 0  # distances >= 6 never occur in rows of <= 6
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_hstu_trunk_kv_cache_equals_appended_forward_and_padding_invariance():
    from pinfm_rec.model.trunk import Trunk, TrunkSpec

    torch.manual_seed(3)
    trunk = Trunk(TrunkSpec(d_model=16, n_layers=2, n_heads=2, dropout=0.0, max_len=12, block="hstu")).eval()
    assert all(isinstance(layer, HSTULayer) for layer in trunk.layers)
    hist, cands = [3, 0, 5, 2], [2, 3, 0, 1]
    ctx_off = torch.tensor([0, 3, 3, 8, 10])
    cand_off = torch.tensor([0, 2, 5, 5, 6])
    x_ctx, x_cand = torch.randn(10, 16), torch.randn(6, 16)
    h_ctx, cache = trunk.encode_context(x_ctx, ctx_off, 5)
    torch.testing.assert_close(trunk(x_ctx, ctx_off, 9), h_ctx, atol=1e-5, rtol=0)  # more padding: same
    out = trunk.score_candidates(x_cand, cand_off, cache)
    for r in range(4):
        for j in range(int(cand_off[r]), int(cand_off[r + 1])):
            seq = torch.cat([x_ctx[ctx_off[r]:ctx_off[r + 1]], x_cand[j:j + 1]])
            want = trunk(seq, torch.tensor([0, seq.shape[0]]), seq.shape[0])[-1]
            torch.testing.assert_close(out[j], want, atol=1e-5, rtol=0)
