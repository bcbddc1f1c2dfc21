import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.batch import SequenceBatch
from pinfm_rec.model import EmbeddingSpec, LossSpec, ModelSpec, PinFM, TrunkSpec
from pinfm_rec.model.features import log_bucket, time_gaps

I, A, S = 30, 4, 3
VOCAB = {"num_items": I, "num_actions": A, "num_surfaces": S}


def _batch(seed=0, lengths=(6, 3, 8, 1), k=4, train=True, items=None):
    g = torch.Generator().manual_seed(seed)
    L, B = sum(lengths), len(lengths)
    if items is None:  # learnable: next item = item + 1 (mod I)
        starts = torch.randint(0, I, (B,), generator=g)
        items = torch.cat([(s + torch.arange(n)) % I for s, n in zip(starts, lengths)])
    actions = torch.tensor([1, 2, 0])[torch.randint(0, 3, (L,), generator=g)]
    surfaces = torch.randint(0, S, (L,), generator=g)
    keys = ["item_id", "action", "surface"]
    vals, lens = [items, actions, surfaces], [torch.tensor(lengths)] * 3
    if train:
        keys.append("neg_item_id")
        vals.append(torch.randint(0, I, (B * k,), generator=g))
        lens.append(torch.full((B,), k))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(vals), lengths=torch.cat(lens))
    ts = torch.cat([torch.cumsum(torch.randint(1, 5000, (n,), generator=g), 0) for n in lengths])
    return SequenceBatch(features=kjt, timestamps=ts, request_ids=torch.arange(B), max_len=max(lengths))


def _model(**loss_kw):
    torch.manual_seed(0)
    spec = ModelSpec(
        embedding=EmbeddingSpec(dim=16),
        trunk=TrunkSpec(d_model=32, n_layers=2, n_heads=2, max_len=10, dropout=0.0),
        loss=LossSpec(**loss_kw),
    )
    return PinFM(spec, VOCAB, device="cpu")


def test_forward_finite_and_sgd_reduces_loss():
    model = _model(temperature=0.1)
    assert {n for n, _ in model.named_modules()} >= {"ec", "trunk", "head", "time"}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = _batch(0)
    first = model(batch)
    assert {"loss", "next_token", "num_targets"} <= set(first)
    assert torch.isfinite(first["loss"]) and first["loss"].dim() == 0 and first["num_targets"] > 0
    losses = []
    for step in range(30):
        out = model(_batch(step % 3))
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:  # shared item table gets gradients (inputs, positives, negatives)
            assert model.ec.embeddings["t_item"].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(out["loss"]))
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def test_eval_encoders_and_options():
    model = _model(multi_token_k=2, multi_token_weight=0.5, future_window_s=10_000, future_weight=0.5).eval()
    out = model(_batch(1))
    assert {"multi_token", "future_token"} <= set(out) and torch.isfinite(out["loss"])
    eval_batch = _batch(2, lengths=(4, 0, 2), train=False)  # no neg_item_id, an empty row
    u = model.encode_users(eval_batch)
    assert u.shape == (3, 16)
    torch.testing.assert_close(u.norm(dim=-1), torch.tensor([1.0, 0.0, 1.0]))
    e = model.item_embeddings(torch.arange(I))
    assert e.shape == (I, 16)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(I))
    # users are the hidden state of each row's last token: row 0 alone gives the same vector
    f = eval_batch.features
    kjt0 = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "action", "surface"],
        values=torch.cat([f[k].values()[:4] for k in ("item_id", "action", "surface")]),
        lengths=torch.tensor([4, 4, 4]))
    alone = model.encode_users(SequenceBatch(kjt0, eval_batch.timestamps[:4], torch.arange(1), 4))
    torch.testing.assert_close(alone[0], u[0], atol=1e-5, rtol=0)
    h, cache = model.encode_context(eval_batch)
    assert h.shape == (6, 32) and len(cache.k) == 2


def test_ids_checked_and_hash_mode():
    model = _model()
    bad = _batch(0, lengths=(3, 2), items=torch.tensor([1, 2, 3, 4, I + 5]))
    with pytest.raises(ValueError, match=r"item_id.*t_item.*35"):
        model(bad)
    torch.manual_seed(0)
    spec = ModelSpec(embedding=EmbeddingSpec(dim=16, id_mode="hash"),
                     trunk=TrunkSpec(d_model=16, max_len=10))
    hashed = PinFM(spec, VOCAB, device="cpu")
    assert isinstance(hashed.in_proj, torch.nn.Identity)
    assert torch.isfinite(hashed(bad)["loss"])


def test_time_features():
    ts = torch.tensor([100, 101, 1100, 50, 60])
    off = torch.tensor([0, 3, 3, 5])
    gap_prev, gap_next, first, unknown = time_gaps(ts, off)
    assert gap_prev.tolist() == [0, 1, 999, 0, 10]
    assert gap_next.tolist() == [1, 999, 0, 10, 0]
    assert first.tolist() == [True, False, False, True, False]
    assert unknown.tolist() == [False, False, True, False, True]
    _, gap_next, _, unknown = time_gaps(ts, off, request_ts=torch.tensor([1200, 0, 61]))
    assert gap_next.tolist() == [1, 999, 100, 10, 1] and not unknown.any()
    assert log_bucket(torch.tensor([0, 1, 3, 1000, -5, 10**12])).tolist() == [0, 1, 2, 9, 0, 31]


@pytest.mark.parametrize("with_request_ts", [False, True])
def test_time_features_match_a_row_by_row_reference_on_ragged_rows(with_request_ts):
    # random rows, empty ones included (first, last, consecutive): the gaps and the embedding sum
    # against a plain per-row loop (the kernels-saving code derives "last of its row" from
    # "first of the next")
    from pinfm_rec.model.features import NUM_TIME_BUCKETS, TimeFeatures

    g = torch.Generator().manual_seed(3)
    feats = TimeFeatures(4)
    nb = NUM_TIME_BUCKETS
    for trial in range(20):
        lens = torch.randint(0, 4, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        if trial % 3 == 0:
            lens[0] = 0
        if trial % 4 == 0:
            lens[-1] = 0
        off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        ts = torch.randint(0, 10**6, (int(off[-1]),), generator=g)
        req = torch.randint(0, 2 * 10**6, (lens.numel(),), generator=g) if with_request_ts else None
        want_prev, want_next, want_first, want_unknown = [], [], [], []
        for r in range(lens.numel()):
            row = ts[off[r]:off[r + 1]].tolist()
            for i, t in enumerate(row):
                want_first.append(i == 0)
                want_prev.append(0 if i == 0 else t - row[i - 1])
                last = i == len(row) - 1
                want_unknown.append(last and req is None)
                want_next.append((int(req[r]) - t if req is not None else 0) if last else row[i + 1] - t)
        gp, gn, first, unknown = time_gaps(ts, off, request_ts=req)
        assert gp.tolist() == want_prev and gn.tolist() == want_next
        assert first.tolist() == want_first and unknown.tolist() == want_unknown
        b_prev = torch.where(first, nb, log_bucket(gp))
        b_next = torch.where(unknown, nb, log_bucket(gn))
        want = feats.prev(b_prev) + feats.next(b_next)
        torch.testing.assert_close(feats(ts, off, req), want, atol=0, rtol=0)


def test_full_catalogue_forward_scores_every_item():
    F = torch.nn.functional
    model = _model(full_catalogue=True, user_masking=False, temperature=0.1)
    model.trunk.train(False)  # no dropout, so the hand recomputation below is exact
    batch = _batch(0)  # its loader negatives are replaced (not joined) by the whole catalogue
    got = model(batch)["next_token"]
    with torch.no_grad():  # independent recomputation: softmax over all I items per next-token position
        t = model.embed_tokens(batch.features, batch.timestamps)
        x, offsets, kjt = t.x, t.offsets, t.kjt
        h = F.normalize(model.head(model.trunk(x, offsets, batch.max_len)), dim=-1)
        table = F.normalize(model.ec.embeddings["t_item"].weight, dim=-1)
        items, act = kjt["item_id"].values(), kjt["action"].values()
        tok = [t for t in range(items.numel() - 1)
               if (t + 1) not in offsets.tolist() and int(act[t + 1]) in (1, 2)]
        want = F.cross_entropy(h[tok] @ table[:I].t() / 0.1, items[[t + 1 for t in tok]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    assert (model.ec.embeddings["t_item"].weight.grad[:I].abs().sum(1) > 0).all()  # every item row
    assert torch.isfinite(model(_batch(1, train=False))["loss"])  # no loader negatives needed
    model.eval()  # eval-mode forward (e.g. a validation loss) scores the catalogue too, same value
    torch.testing.assert_close(model(batch)["next_token"], got.detach(), rtol=1e-5, atol=1e-5)
    # a hashed item table smaller than the catalogue would repeat rows inside the softmax
    from pinfm_rec.model.embedding import TableSpec
    small = ModelSpec(embedding=EmbeddingSpec(dim=16, id_mode="hash", item=TableSpec(num_embeddings=I - 5)),
                      trunk=TrunkSpec(d_model=32, n_layers=1, n_heads=2, max_len=10),
                      loss=LossSpec(full_catalogue=True))
    with pytest.raises(ValueError, match="full_catalogue"):
        PinFM(small, VOCAB, device="cpu")


def test_output_head_off_scores_trunk_output_directly():
    torch.manual_seed(0)
    spec = ModelSpec(embedding=EmbeddingSpec(dim=32), trunk=TrunkSpec(d_model=32, n_layers=1, n_heads=2, max_len=10),
                     output_head=False)
    model = PinFM(spec, VOCAB, device="cpu")
    assert isinstance(model.head, torch.nn.Identity) and torch.isfinite(model(_batch(0))["loss"])
    with pytest.raises(ValueError, match="output_head"):
        PinFM(ModelSpec(embedding=EmbeddingSpec(dim=16), trunk=TrunkSpec(d_model=32, n_heads=2),
                        output_head=False), VOCAB, device="cpu")


def test_embed_tokens_sums_the_registry_token_features_present():
    from pinfm_rec.features import EC_FEATURES, TOKEN_KEYS

    model = _model().eval()
    batch = _batch(0, train=False)
    kjt = batch.features
    full = model.embed_tokens(kjt)  # no timestamps: no time features
    w = {t: model.ec.embeddings[t].weight for t in ("t_item", "t_action", "t_surface")}
    rows = [w["t_item"][kjt["item_id"].values()], w["t_action"][kjt["action"].values()],
            w["t_surface"][kjt["surface"].values()]]
    torch.testing.assert_close(full.x, model.project_inputs(sum(rows)))
    assert TOKEN_KEYS == ("item_id", "action", "surface") and EC_FEATURES[:2] == ["item_id", "neg_item_id"]
    # a KJT with only item_id (and an unknown key) leaves the other terms out
    only = KeyedJaggedTensor.from_jt_dict({"item_id": kjt["item_id"], "my_key": kjt["action"]})
    torch.testing.assert_close(model.embed_tokens(only).x, model.project_inputs(rows[0]))
    with_time = model.embed_tokens(kjt, batch.timestamps)
    assert not torch.allclose(with_time.x, full.x)
    with pytest.raises(ValueError, match="'item_id'"):
        model.embed_tokens(KeyedJaggedTensor.from_jt_dict({"action": kjt["action"]}))
    # user_vectors: the head at each row's last token, normalised; forward's pieces agree
    h = model.trunk(full.x, full.offsets, batch.max_len)
    last = full.offsets[1:] - 1
    want = torch.nn.functional.normalize(model.head(h[last]), dim=-1)
    torch.testing.assert_close(model.user_vectors(h, full.offsets), want)


def test_vocab_sizes_come_from_a_mapping_or_dataset_info():
    from types import SimpleNamespace

    from pinfm_rec.features import vocab_sizes

    info = SimpleNamespace(num_items=7, num_actions=2, num_surfaces=5, num_users=3)
    assert vocab_sizes(info) == {"num_items": 7, "num_actions": 2, "num_surfaces": 5}
    model = PinFM(ModelSpec(embedding=EmbeddingSpec(dim=8), trunk=TrunkSpec(d_model=8, max_len=10)), info,
                  device="cpu")
    assert model.sizes == {"t_item": 7, "t_action": 2, "t_surface": 5}
    with pytest.raises(KeyError, match="num_surfaces"):
        vocab_sizes({"num_items": 7, "num_actions": 2})
