"""model/jagged.py pad/unpad: ragged rows (zero padding) and full rows (the reshape path) against a
per-row loop, values and gradients."""
import pytest
import torch

from pinfm_rec.model.jagged import jagged_index, lengths_to_offsets, pad_heads, pad_jagged, unpad_jagged


def _loop_pad(values, lengths, n):
    out = values.new_zeros((len(lengths), n) + tuple(values.shape[1:]))
    start = 0
    for r, m in enumerate(lengths):
        out[r, :m] = values[start:start + m]
        start += m
    return out


@pytest.mark.parametrize("lengths,n", [([3, 0, 5, 1], 5), ([4, 4, 4], 4), ([7], 7), ([2, 6], 8)])
def test_pad_unpad_match_a_row_loop_with_gradients(lengths, n):
    torch.manual_seed(0)
    total = sum(lengths)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    rows, pos = jagged_index(offsets, total)
    flat_idx = rows * n + pos
    x = torch.randn(total, 2, 3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    padded = pad_jagged(x, flat_idx, len(lengths), n)
    want = _loop_pad(x_ref, lengths, n)
    assert padded.shape == want.shape and torch.equal(padded, want)
    w = torch.randn_like(want)
    (padded * w).sum().backward()
    (want * w).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    back = unpad_jagged(padded * 2, flat_idx)
    assert torch.equal(back, x.detach() * 2)
    full = total == len(lengths) * n
    assert (padded.data_ptr() == x.data_ptr()) == full  # full rows: a view of the values, no copy
    # the attention layout: [B, H, N, Dh] per tensor, unpadded from [B, N, H, Dh]
    (qp,) = pad_heads(flat_idx, len(lengths), n, x.detach())
    assert torch.equal(qp.transpose(1, 2), want.detach())
    assert torch.equal(unpad_jagged(qp.transpose(1, 2), flat_idx), x.detach())


def test_pad_of_a_strided_slice_full_rows():
    """q, k, v are slices of one [T, 3, H, Dh] projection (strided): the full-row reshape keeps values."""
    qkv = torch.randn(8, 3, 2, 4)
    q = qkv[:, 1]
    flat_idx = torch.arange(8)
    p = pad_jagged(q, flat_idx, 2, 4)
    assert torch.equal(p, q.contiguous().view(2, 4, 2, 4))


def test_jagged_index_matches_a_row_loop_with_empty_rows():
    from pinfm_rec.model.jagged import _jagged_index

    for lengths in ([0, 3, 0, 0, 2, 1, 0], [5], [0], [], [1, 1, 1]):
        offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.long))
        rows, pos = _jagged_index(offsets, sum(lengths))
        want_r = [r for r, m in enumerate(lengths) for _ in range(m)]
        want_p = [p for m in lengths for p in range(m)]
        assert rows.tolist() == want_r and pos.tolist() == want_p and rows.dtype == torch.long
    for dtype in (torch.int32, torch.int64):  # offsets of either index dtype
        rows, pos = _jagged_index(torch.tensor([0, 2, 2, 5], dtype=dtype), 5)
        assert rows.tolist() == [0, 0, 2, 2, 2] and pos.tolist() == [0, 1, 0, 1, 2]
