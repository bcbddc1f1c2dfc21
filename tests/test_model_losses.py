import math

import pytest
import torch
import torch.nn.functional as F

from pinfm_rec.model.losses import LossInputs, LossSpec, sequence_losses

I, D = 12, 8


def _losses(spec, h, offsets, items, actions, ts, item_emb, neg_ids, neg_emb, num_items, bias=None, **kw):
    inputs = LossInputs(h=h, offsets=offsets, item_ids=items, actions=actions, item_emb=item_emb,
                        timestamps=ts, neg_ids=neg_ids, neg_emb=neg_emb, history_bias=bias)
    return sequence_losses(spec, inputs, num_items=num_items, **kw)


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [4, 1, 9, 0, 5]
    L = sum(lengths)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    items = torch.randint(0, I, (L,), generator=g)
    actions = torch.tensor([0, 1, 2, 1, 2, 3])[torch.randint(0, 6, (L,), generator=g)]
    actions[1:4] = 1  # make sure row 0 has targets
    ts = torch.cat([torch.sort(torch.randint(0, 100, (n,), generator=g)).values for n in lengths])
    h = torch.randn(L, D, generator=g)
    table = torch.randn(I, D, generator=g)
    neg = torch.randint(0, I, (6,), generator=g)
    return lengths, offsets, items, actions, ts, h, table, neg


def _run(spec, case, item_counts=None, bias=None):
    lengths, offsets, items, actions, ts, h, table, neg = case
    return _losses(spec, h, offsets, items, actions, ts, table[items], neg, table[neg], I,
                           item_counts=item_counts, bias=bias)


def ref_losses(spec, case, item_counts=None, bias=0.0):
    """Plain-Python loops over rows/tokens (independent of the vectorised code). bias: the history
    bias w (added as w / temperature to every item in the token's row at or before it)."""
    lengths, offsets, items, actions, ts, h, table, neg = case
    it, ac, tl = items.tolist(), actions.tolist(), ts.tolist()
    norm = (lambda x: F.normalize(x, dim=-1)) if spec.l2_norm else (lambda x: x)
    hn, en = norm(h), norm(table)
    starts = [int(offsets[r]) for r in range(len(lengths)) for _ in range(lengths[r])]
    sim = lambda t, i: (float(hn[t] @ en[i]) + (bias if i in it[starts[t]:t + 1] else 0.0)) / spec.temperature
    ok = lambda j: (ac[j] in spec.engaged_actions) or not spec.positives_only_engaged
    rows = [(int(offsets[r]), int(offsets[r + 1])) for r in range(len(lengths))]
    targets = [(t, t + 1) for a, b in rows for t in range(a, b - 1) if ok(t + 1)]
    pool = [it[j] for _, j in targets] if spec.in_batch_negatives else []
    assert len(pool) <= spec.in_batch_negatives or not pool
    uni = neg.tolist() if spec.use_sampled_negatives else []
    negs = pool + uni
    def logq(i):
        if not spec.logq_correction:
            return 0.0
        e = 0.0
        if pool:
            share = (item_counts[i] / item_counts.sum()).item() if item_counts is not None \
                else sum(x == i for x in pool) / len(pool)
            e += len(pool) * share
        if uni:
            e += len(uni) / I
        return math.log(e)
    def ce(t, j, a, b, accidental):
        s = sim(t, it[j])
        z = math.exp(s)
        for n in negs:
            if spec.user_masking and n in it[a:b]:
                continue
            if accidental and n == it[j]:
                continue
            z += math.exp(sim(t, n) - logq(n))
        return math.log(z) - s
    out = {"next_token": sum(ce(t, j, *[ab for ab in rows if ab[0] <= t < ab[1]][0], True)
                             for t, j in targets) / max(len(targets), 1)}
    total = spec.next_token_weight * out["next_token"]
    for name, k, window, w in (("multi_token", spec.multi_token_k, None, spec.multi_token_weight),
                               ("future_token", spec.future_max_targets, spec.future_window_s,
                                spec.future_weight)):
        if not (w > 0 and k > 0 and (window is None or window > 0)):
            continue
        per = []
        for a, b in rows:
            for t in range(a, b):
                pos = [j for j in range(t + 1, b) if ok(j)][:k]
                if window is not None:
                    pos = [j for j in pos if tl[j] - tl[t] <= window]
                if pos:
                    per.append(sum(ce(t, j, a, b, False) for j in pos) / len(pos))
        out[name] = sum(per) / max(len(per), 1)
        total += w * out[name]
    out["loss"] = total
    out["num_targets"] = len(targets)
    return out


def _close(got, want):
    assert set(want) <= set(got), (set(want), set(got))
    for k, v in want.items():
        assert abs(float(got[k]) - v) < 1e-5 * max(1.0, abs(v)), (k, float(got[k]), v)


@pytest.mark.parametrize("kw", [
    {},
    {"logq_correction": False},
    {"user_masking": False},
    {"l2_norm": False, "temperature": 1.0},
    {"in_batch_negatives": 0},
    {"use_sampled_negatives": False},
    {"positives_only_engaged": False},
    {"multi_token_k": 3, "multi_token_weight": 0.5},
    {"future_window_s": 30, "future_weight": 0.7, "future_max_targets": 4},
    {"future_window_s": 1000, "future_weight": 0.5, "future_max_targets": 2},
    {"multi_token_k": 2, "multi_token_weight": 0.3, "future_window_s": 50, "future_weight": 0.2,
     "positives_only_engaged": False, "next_token_weight": 0.0},
])
def test_matches_reference(kw):
    spec = LossSpec(**kw)
    for seed in range(3):
        case = _case(seed)
        got = _run(spec, case)
        _close(got, ref_losses(spec, case))
        assert torch.isfinite(got["loss"])


def test_item_counts_logq():
    spec = LossSpec()
    case = _case(1)
    counts = torch.arange(1, I + 1).float()
    _close(_run(spec, case, counts), ref_losses(spec, case, counts))


def test_user_masking_removes_history_negative_exactly():
    # one row [5, 7, 9] all engaged; negatives [5, 11]: 5 is history (never a positive of the row)
    spec = LossSpec(in_batch_negatives=0, logq_correction=False, temperature=0.5)
    g = torch.Generator().manual_seed(3)
    items = torch.tensor([5, 7, 9])
    h, table = torch.randn(3, D, generator=g), torch.randn(I, D, generator=g)
    neg = torch.tensor([5, 11])
    args = (h, torch.tensor([0, 3]), items, torch.ones(3, dtype=torch.long), None, table[items],
            neg, table[neg], I)
    on = _losses(spec, *args)["next_token"]
    off = _losses(LossSpec(in_batch_negatives=0, logq_correction=False, temperature=0.5,
                                   user_masking=False), *args)["next_token"]
    hn, en = F.normalize(h, dim=-1), F.normalize(table, dim=-1)
    s = lambda t, i: hn[t] @ en[i] / 0.5
    want_on = sum(torch.logaddexp(s(t, items[t + 1]), s(t, 11)) - s(t, items[t + 1])
                  for t in range(2)) / 2
    want_off = sum(torch.logsumexp(torch.stack([s(t, items[t + 1]), s(t, 5), s(t, 11)]), 0)
                   - s(t, items[t + 1]) for t in range(2)) / 2
    torch.testing.assert_close(on, want_on)
    torch.testing.assert_close(off, want_off)
    assert off > on


def test_logq_shift_uniform():
    spec_on = LossSpec(in_batch_negatives=0, user_masking=False, temperature=0.5)
    spec_off = LossSpec(in_batch_negatives=0, user_masking=False, temperature=0.5,
                        logq_correction=False)
    g = torch.Generator().manual_seed(4)
    items = torch.tensor([1, 2, 3, 4])
    h, table = torch.randn(4, D, generator=g), torch.randn(I, D, generator=g)
    neg = torch.tensor([6, 8, 10])
    args = (h, torch.tensor([0, 4]), items, torch.ones(4, dtype=torch.long), None, table[items],
            neg, table[neg], I)
    on, off = _losses(spec_on, *args), _losses(spec_off, *args)
    hn, en = F.normalize(h, dim=-1), F.normalize(table, dim=-1)
    shift = math.log(3 / I)  # every uniform negative's logit moves by -log(k / num_items)
    want = []
    for t in range(3):
        s = hn[t] @ en[items[t + 1]] / 0.5
        n = hn[t] @ en[neg].t() / 0.5
        want.append(torch.logsumexp(torch.cat([s[None], n - shift]), 0) - s)
    torch.testing.assert_close(on["next_token"], torch.stack(want).mean())
    assert on["next_token"] > off["next_token"]  # log(3/12) < 0 -> negatives up-weighted


def test_in_batch_subsampling_and_no_targets():
    spec = LossSpec(in_batch_negatives=2)
    case = _case(0)
    got = _run(spec, case)
    assert torch.isfinite(got["loss"]) and got["num_targets"] > 2
    # no engaged positives at all -> zero loss, finite gradients
    lengths, offsets, items, actions, ts, h, table, neg = case
    h = h.clone().requires_grad_()
    out = _losses(LossSpec(), h, offsets, items, torch.zeros_like(actions), ts,
                          table[items], neg, table[neg], I)
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and torch.isfinite(h.grad).all()
    # every negative masked (all ids in the row) -> finite loss and gradients
    items2 = torch.arange(6)
    h2 = torch.randn(6, D, requires_grad=True)
    out = _losses(LossSpec(in_batch_negatives=0), h2, torch.tensor([0, 6]), items2,
                          torch.ones(6, dtype=torch.long), None, table[items2],
                          torch.tensor([0, 1]), table[:2], I)
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and torch.isfinite(h2.grad).all()


def test_full_catalogue_is_exact_cross_entropy():
    lengths, offsets, items, actions, ts, h, table, _ = _case(2)
    all_ids = torch.arange(I)
    for engaged_only in (True, False):
        spec = LossSpec(full_catalogue=True, user_masking=False, temperature=0.2,
                        positives_only_engaged=engaged_only)
        got = _losses(spec, h, offsets, items, actions, ts, table[items], all_ids, table, I)
        hn, en = F.normalize(h, dim=-1), F.normalize(table, dim=-1)
        tok = [t for r in range(len(lengths)) for t in range(int(offsets[r]), int(offsets[r + 1]) - 1)
               if actions[t + 1].item() in (1, 2) or not engaged_only]
        want = F.cross_entropy(hn[tok] @ en.t() / 0.2, items[[t + 1 for t in tok]])
        torch.testing.assert_close(got["next_token"], want)
    # user masking: the row's other items leave the sum, the positive stays
    spec = LossSpec(full_catalogue=True, user_masking=True, temperature=0.2)
    one = torch.tensor([3, 5, 7])
    hh = torch.randn(3, D)
    got = _losses(spec, hh, torch.tensor([0, 3]), one, torch.ones(3, dtype=torch.long), None,
                          table[one], all_ids, table, I)["next_token"]
    hn, en = F.normalize(hh, dim=-1), F.normalize(table, dim=-1)
    keep = torch.ones(I, dtype=torch.bool)
    keep[one] = False
    want = []
    for t in range(2):
        logits = hn[t] @ en.t() / 0.2
        pos = logits[one[t + 1]]
        want.append(torch.logaddexp(pos, torch.logsumexp(logits[keep], 0)) - pos)
    torch.testing.assert_close(got, torch.stack(want).mean())
    with pytest.raises(ValueError, match="full_catalogue"):
        _losses(spec, hh, torch.tensor([0, 3]), one, torch.ones(3, dtype=torch.long), None,
                        table[one], all_ids[:5], table[:5], I)


def test_loss_specs_that_would_train_nothing_are_errors():
    with pytest.raises(ValueError, match="leaves no negatives"):
        LossSpec(in_batch_negatives=0, use_sampled_negatives=False)
    with pytest.raises(ValueError, match="multi_token_weight: 0.0 with multi_token_k=3"):
        LossSpec(multi_token_k=3)
    with pytest.raises(ValueError, match="future_weight: 0.5 with future_window_s=0"):
        LossSpec(future_weight=0.5)
    LossSpec(full_catalogue=True, in_batch_negatives=0, use_sampled_negatives=False)  # fine
    # sampled negatives expected but none in the batch (data.num_negatives_per_row=0)
    lengths, offsets, items, actions, ts, h, table, neg = _case(0)
    with pytest.raises(ValueError, match="no negatives"):
        _losses(LossSpec(in_batch_negatives=0), h, offsets, items, actions, ts, table[items],
                        None, None, I)


@pytest.mark.parametrize("kw", [
    {"user_masking": False},
    {"user_masking": False, "logq_correction": False, "in_batch_negatives": 0},
    {"user_masking": False, "l2_norm": False, "temperature": 1.0},
    {"user_masking": False, "multi_token_k": 3, "multi_token_weight": 0.5, "positives_only_engaged": False},
])
@pytest.mark.parametrize("w", [-0.7, 0.4])
def test_history_bias_matches_reference(kw, w):
    spec = LossSpec(history_bias=True, **kw)
    for seed in range(3):
        case = _case(seed)
        got = _run(spec, case, bias=torch.tensor([w]))
        _close(got, ref_losses(spec, case, bias=w))
        # the bias moves the loss (the cases have history items among the negatives / positives)
        assert abs(float(got["loss"]) - float(_run(spec, case, bias=torch.zeros(1))["loss"])) > 1e-4


def test_history_bias_full_catalogue_and_gradient():
    lengths, offsets, items, actions, ts, h, table, _ = _case(2)
    spec = LossSpec(full_catalogue=True, user_masking=False, history_bias=True, temperature=0.2,
                    positives_only_engaged=False)
    w = torch.tensor([-0.3], requires_grad=True)
    got = _losses(spec, h, offsets, items, actions, ts, table[items], torch.arange(I), table, I, bias=w)
    hn, en = F.normalize(h, dim=-1), F.normalize(table, dim=-1)
    logits, tgt = [], []
    for r in range(len(lengths)):
        a, b = int(offsets[r]), int(offsets[r + 1])
        for t in range(a, b - 1):
            seen = torch.zeros(I)
            seen[items[a:t + 1]] = 1.0
            logits.append((hn[t] @ en.t() + w * seen) / 0.2)
            tgt.append(int(items[t + 1]))
    want = F.cross_entropy(torch.stack(logits), torch.tensor(tgt))
    torch.testing.assert_close(got["next_token"], want)
    (g_got,) = torch.autograd.grad(got["loss"], w)
    (g_want,) = torch.autograd.grad(want, w)
    torch.testing.assert_close(g_got, g_want)
    # a row whose next items never repeat its history: the gradient pushes the bias down
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    out = _losses(spec, torch.randn(6, D), torch.tensor([0, 6]), rows, torch.ones(6, dtype=torch.long), None,
                  table[rows], torch.arange(I), table, I, bias=w)
    (g,) = torch.autograd.grad(out["loss"], w)
    assert g.item() > 0  # descent lowers w
    # a row whose next items repeat its history (re-consumption): the gradient pushes the bias up
    rep = torch.tensor([0, 1, 0, 1, 0, 1])
    out = _losses(spec, torch.randn(6, D), torch.tensor([0, 6]), rep, torch.ones(6, dtype=torch.long), None,
                  table[rep], torch.arange(I), table, I, bias=w)
    (g,) = torch.autograd.grad(out["loss"], w)
    assert g.item() < 0  # descent raises w


def test_history_bias_needs_user_masking_off():
    with pytest.raises(ValueError, match="history_bias"):
        LossSpec(history_bias=True)
