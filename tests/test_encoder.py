"""PinFMEncoder: DCAT crossing == the candidate appended to its history (full causal forward)."""
from __future__ import annotations

import os

import pytest
import torch

from pinfm_rec.data.ranking_batch import RankingBatch, flatten_batch
from pinfm_rec.data.ranking_batch import random_ranking_batch as _rrb
from pinfm_rec.model.embedding import EmbeddingSpec
from pinfm_rec.model.encoder import EncoderSpec, PinFMEncoder, append_tokens
from pinfm_rec.model.pinfm import ModelSpec
from pinfm_rec.model.trunk import TrunkSpec

NUM_ITEMS, NUM_ACTIONS, NUM_SURFACES = 50, 4, 3


def random_ranking_batch(gen, hist_lens, cand_lens, num_dense: int = 2) -> RankingBatch:
    return _rrb(gen, hist_lens, cand_lens, num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, num_surfaces=NUM_SURFACES,
                num_dense=num_dense)


def make_encoder(seed: int = 0, kernel: str = "pytorch", **enc) -> PinFMEncoder:
    torch.manual_seed(seed)
    ms = ModelSpec(embedding=EmbeddingSpec(dim=16), trunk=TrunkSpec(d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                                                                    max_len=12))
    m = PinFMEncoder(ms, EncoderSpec(kernel=kernel, **enc),
                     dict(num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, num_surfaces=NUM_SURFACES), device="cpu")
    with torch.no_grad():
        m.cand_type.weight.normal_(0, 0.1)  # non-zero so the candidate-type path is exercised
    return m.eval()


def test_append_tokens():
    v = torch.arange(5.0)[:, None]
    off = torch.tensor([0, 2, 2, 5])
    out, no = append_tokens(v, off, torch.tensor([[10.0], [11.0], [12.0]]))
    assert no.tolist() == [0, 3, 4, 8]
    assert out[:, 0].tolist() == [0, 1, 10, 11, 2, 3, 4, 12]


@pytest.mark.parametrize("seed,kernel", [(0, "pytorch"), (1, "pytorch"), (2, "triton")])
def test_dcat_equals_appended_forward(seed, kernel):
    if kernel == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        # a CUDA host (conftest leaves the interpreter off): this CPU-built encoder cannot launch
        # the compiled kernel; the compiled kernels are checked on CUDA in tests/test_dcat_*.py
        pytest.skip("the encoder-level triton case runs under the CPU interpreter")
    gen = torch.Generator().manual_seed(seed)
    hist = torch.randint(0, 13, (6,), generator=gen).tolist()
    hist[0] = 0  # an empty history
    cands = torch.randint(0, 5, (6,), generator=gen).tolist()
    cands[1] = 0  # a request without candidates
    cands[2] = 1
    b = random_ranking_batch(gen, hist, cands)
    enc = make_encoder(seed, kernel)
    f_dcat, u_dcat = enc.encode(b, mode="dcat")
    f_flat, u_flat = enc.encode(b, mode="flat")
    assert f_dcat.shape == (sum(cands), enc.out_dim)
    torch.testing.assert_close(f_dcat, f_flat, atol=2e-5, rtol=2e-5)
    has = torch.tensor([c > 0 for c in cands]) & torch.tensor([h > 0 for h in hist])
    torch.testing.assert_close(u_dcat[has], u_flat[has], atol=2e-5, rtol=2e-5)
    assert (u_dcat[torch.tensor(hist) == 0] == 0).all()


def test_dcat_gradients_equal_flat():
    gen = torch.Generator().manual_seed(5)
    b = random_ranking_batch(gen, [3, 0, 7, 12], [2, 3, 0, 4])
    grads = {}
    for mode in ("dcat", "flat"):
        enc = make_encoder(3)
        f, _ = enc.encode(b, mode=mode)
        (f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
        grads[mode]["table"] = enc.fm.ec.embeddings["t_item"].weight.grad.clone()
    assert grads["dcat"].keys() == grads["flat"].keys()
    assert grads["dcat"]["table"].abs().sum() > 0
    for n in grads["dcat"]:
        torch.testing.assert_close(grads["dcat"][n], grads["flat"][n], atol=2e-5, rtol=1e-4, msg=n)


def test_candidate_changes_only_its_own_features():
    """Candidates never see each other: changing one candidate leaves the others' features."""
    gen = torch.Generator().manual_seed(9)
    b = random_ranking_batch(gen, [5, 4], [3, 2])
    enc = make_encoder(1)
    f0, _ = enc.encode(b)
    b.cand_item[1] = (b.cand_item[1] + 1) % NUM_ITEMS
    f1, _ = enc.encode(b)
    changed = (f0 - f1).abs().amax(-1) > 1e-6
    assert changed.tolist() == [False, True, False, False, False]


def test_cand_id_dropout_only_in_training():
    gen = torch.Generator().manual_seed(2)
    b = random_ranking_batch(gen, [5, 4], [30, 20])
    enc = make_encoder(0, cand_id_dropout=0.5)
    f_eval, _ = enc.encode(b)
    torch.testing.assert_close(enc.encode(b)[0], f_eval)
    enc.fm.trunk.spec.dropout = 0.0
    enc.train()
    torch.manual_seed(0)
    f_train, _ = enc.encode(b)
    differs = (f_train - f_eval).abs().amax(-1) > 1e-6
    assert 0.2 < differs.float().mean() < 0.8


def test_flat_layout_batch_gives_same_features():
    """flatten_batch (history copied per candidate) + flat mode == dedup batch + DCAT."""
    gen = torch.Generator().manual_seed(4)
    b = random_ranking_batch(gen, [3, 0, 7], [2, 3, 4])
    fb = flatten_batch(b)
    assert fb.num_requests == 9 and fb.history.features["item_id"].lengths().tolist() == [3, 3, 0, 0, 0] + [7] * 4
    enc = make_encoder(2)
    torch.testing.assert_close(enc.encode(fb, mode="flat")[0], enc.encode(b, mode="dcat")[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["dcat", "flat"])
def test_all_histories_empty_or_no_candidates(mode):
    gen = torch.Generator().manual_seed(6)
    enc = make_encoder(0)
    f, u = enc.encode(random_ranking_batch(gen, [0, 0], [2, 3]), mode=mode)
    assert f.shape == (5, enc.out_dim) and torch.isfinite(f).all() and (u == 0).all()
    f, u = enc.encode(random_ranking_batch(gen, [3, 2], [0, 0]), mode=mode)
    assert f.shape == (0, enc.out_dim)


def test_encoder_without_action_surface_or_request_time():
    """History KJTs with only item_id, and batches without a request time, are encoded (the
    missing features leave their terms out) and DCAT still equals the appended forward."""
    import dataclasses

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(5)
    b = random_ranking_batch(gen, [4, 0, 7], [2, 3, 1])
    enc = make_encoder(5)
    full, _ = enc.encode(b)
    items_only = KeyedJaggedTensor.from_jt_dict({"item_id": b.history.features["item_id"]})
    hist = dataclasses.replace(b.history, features=items_only, target_timestamp=None)
    b2 = dataclasses.replace(b, history=hist)
    f_dcat, _ = enc.encode(b2, mode="dcat")
    f_flat, _ = enc.encode(b2, mode="flat")
    assert f_dcat.shape == full.shape and not torch.allclose(f_dcat, full)
    torch.testing.assert_close(f_dcat, f_flat, atol=2e-5, rtol=2e-5)


def _export(tmp_path, seed=3):
    """An encoder export as `pinfm pretrain` writes it (train.checkpoint.export_encoder)."""
    import json

    import yaml

    from pinfm_rec.model.pinfm import PinFM
    from pinfm_rec.spec import to_dict
    from pinfm_rec.train.checkpoint import export_encoder

    torch.manual_seed(seed)
    ms = ModelSpec(embedding=EmbeddingSpec(dim=16), trunk=TrunkSpec(d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                                                                    max_len=12))
    vocab = dict(num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, num_surfaces=NUM_SURFACES)
    fm = PinFM(ms, vocab, device="cpu")
    path = export_encoder(str(tmp_path / "encoder"), fm, yaml.safe_dump({"model": to_dict(ms)}), vocab, rank=0)
    assert json.load(open(f"{path}/encoder_meta.json"))["num_items"] == NUM_ITEMS
    return path, fm


def test_from_pretrained_reads_spec_vocab_and_weights(tmp_path):
    from pinfm_rec.errors import EncoderError
    from pinfm_rec.model.pretrained import load_pretrained

    path, fm = _export(tmp_path)
    enc = PinFMEncoder.from_pretrained(path, out_dim=8, kernel="pytorch")
    assert enc.out_dim == 8 and enc.spec.kernel == "pytorch" and enc.fm.sizes["t_item"] == NUM_ITEMS
    for k, v in fm.state_dict().items():
        torch.testing.assert_close(enc.fm.state_dict()[k], v, msg=k)
    feats, user = enc.eval().encode(random_ranking_batch(torch.Generator().manual_seed(0), [3, 5], [2, 1]))
    assert feats.shape == (3, 8) and torch.isfinite(feats).all()
    # found by type under any attribute name
    meta = PinFMEncoder.from_pretrained(path, out_dim=4, device="meta")  # tables for DMP: loaded after it
    assert meta.fm.ec.embeddings["t_item"].weight.is_meta
    with pytest.raises(EncoderError, match="still on 'meta'"):
        load_pretrained(meta, path)
    holder = torch.nn.Module()
    holder.my_pinfm = make_encoder(9)
    assert load_pretrained(holder, path) == len(fm.state_dict())
    torch.testing.assert_close(holder.my_pinfm.fm.trunk.layers[0].qkv.weight, fm.trunk.layers[0].qkv.weight)
    with pytest.raises(EncoderError, match=r"vocab: num_items=51 \(the encoder has 50\)"):
        PinFMEncoder.from_pretrained(path, vocab=dict(num_items=51, num_actions=NUM_ACTIONS, num_surfaces=3))
    with pytest.raises(EncoderError, match="no such encoder export"):
        PinFMEncoder.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(EncoderError, match="holds no PinFM"):
        load_pretrained(torch.nn.Linear(2, 2), path)


def test_freeze_and_sharding_constraints(tmp_path):
    path, _ = _export(tmp_path)
    enc = PinFMEncoder.from_pretrained(path, out_dim=8, kernel="pytorch", freeze=True)
    assert enc.spec.freeze and not any(p.requires_grad for p in enc.fm.parameters())
    assert all(p.requires_grad for p in enc.proj.parameters()) and enc.cand_type.weight.requires_grad
    feats, _ = enc.train().encode(random_ranking_batch(torch.Generator().manual_seed(1), [4, 2], [3, 2]))
    feats.sum().backward()
    assert enc.proj.weight.grad is not None and enc.fm.ec.embeddings["t_item"].weight.grad is None
    assert enc.freeze(False) is enc and all(p.requires_grad for p in enc.fm.parameters())
    cons = enc.sharding_constraints()
    assert set(cons) == {"t_item", "t_action", "t_surface"}
    assert cons["t_item"].sharding_types == ["table_wise", "row_wise", "column_wise"]  # auto
    assert cons["t_item"].compute_kernels == ["fused"]
    row = make_encoder(0)
    row.fm.spec.embedding.item.sharding = "row_wise"
    assert row.sharding_constraints()["t_item"].sharding_types == ["row_wise"]


def test_forward_takes_keyed_jagged_tensors_with_own_key_names():
    """A TorchRec user's inputs: history KJT with own key names (timestamps as a key), candidates
    KJT of U rows; same features as the RankingBatch path, and clear errors naming the argument."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from pinfm_rec.errors import EncoderError

    b = random_ranking_batch(torch.Generator().manual_seed(11), [5, 0, 3], [2, 1, 3])
    enc = make_encoder(4)
    enc.feature_names = {"item_id": "hist_items", "action": "hist_actions", "surface": "hist_surfaces",
                         "timestamp": "hist_ts"}
    want, want_user = enc.encode(b)
    f = b.history.features
    hist = KeyedJaggedTensor.from_jt_dict({
        "hist_items": f["item_id"], "hist_actions": f["action"], "hist_surfaces": f["surface"],
        "hist_ts": type(f["item_id"])(values=b.history.timestamps, lengths=f["item_id"].lengths()),
        "user_country": f["action"],  # a key of the user's own: ignored
    })
    cand = KeyedJaggedTensor(keys=["cand_items"], values=b.cand_item, lengths=b.cand_offsets.diff(), stride=3)
    got = enc(hist, cand, b.history.target_timestamp)  # forward: the features, one tensor
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(enc.encode(hist, cand, b.history.target_timestamp)[1], want_user)
    # action, surface and time optional
    items_only = KeyedJaggedTensor.from_jt_dict({"hist_items": f["item_id"]})
    f_dcat, _ = enc.encode(items_only, cand)
    torch.testing.assert_close(f_dcat, enc.encode(items_only, cand, mode="flat")[0], atol=2e-5, rtol=2e-5)
    with pytest.raises(EncoderError, match="history: no key 'hist_items'"):
        enc(KeyedJaggedTensor.from_jt_dict({"item_id": f["item_id"]}), cand)
    with pytest.raises(EncoderError, match="candidates has 2 rows, history 3"):
        enc.encode(hist, KeyedJaggedTensor(keys=["c"], values=b.cand_item[:3], lengths=torch.tensor([1, 2]), stride=2))
    with pytest.raises(EncoderError, match="candidates: a KJT"):
        enc.encode(hist)
    with pytest.raises(EncoderError, match="request_ts has 2 entries for 3 requests"):
        enc.encode(hist, cand, torch.zeros(2, dtype=torch.long))


def test_affinity_is_the_pretraining_logit_of_each_candidate():
    """affinity [C] = cos(user vector of the request's history, candidate item embedding) / tau,
    brute force through PinFM's own retrieval path (encode_users / item_embeddings); the same value
    is the retrieval-score input of the encoder's features; a zeroed item row scores 0."""
    from pinfm_rec.model.requests import requests_from_batch
    from pinfm_rec.train.unseen_items import zero_unseen_items

    m = make_encoder(3)
    b = random_ranking_batch(torch.Generator().manual_seed(5), [4, 0, 9, 12], [3, 2, 0, 5])
    with torch.no_grad():
        got = m.affinity(b)
        user = m.fm.encode_users(b.history)  # [U, dim], the pretraining eval's user vectors
        items = m.fm.item_embeddings(b.cand_item)  # [C, dim]
        rows = b.expand_index().tolist()
        want = torch.stack([user[r] @ items[c] for c, r in enumerate(rows)]) / m.temperature
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.shape == (b.num_candidates,) and bool((got[torch.tensor(rows) == 1] == 0).all())  # empty history
        assert bool((got[torch.tensor(rows) != 1] != 0).all())
        _, sim, _ = m._encode(requests_from_batch(b), "dcat")
        torch.testing.assert_close(got, sim[:, 0], atol=1e-5, rtol=1e-5)
        zero_unseen_items(m, [int(b.cand_item[0])])
        again = m.affinity(b)
        cold = b.cand_item == b.cand_item[0]
        assert bool((again[cold] == 0).all()) and int(cold.sum()) >= 1


def test_zero_proj_init_starts_the_ranker_as_if_alone():
    """encoder.proj_init=zero: the features are exactly 0 at init, so the ranker's logits do not
    depend on the encoder (its trunk can be anything); the projection still gets a gradient."""
    from pinfm_rec.errors import SpecError
    from pinfm_rec.rankers.dlrm import RankerSpec, RankerWithEncoder, build_ranker
    from pinfm_rec.spec import load_spec
    from pinfm_rec.train.finetune import FinetuneSpec

    b = random_ranking_batch(torch.Generator().manual_seed(2), [5, 3, 11], [4, 2, 6])
    enc = make_encoder(1, proj_init="zero")
    assert not bool(enc.proj.weight.any()) and not bool(enc.proj.bias.any())
    assert not bool(enc(b).any()) and enc(b).shape == (b.num_candidates, enc.out_dim)
    rs = RankerSpec(embedding_dim=8, dense_arch=[16, 8], over_arch=[16, 1], history_bag_len=5)
    torch.manual_seed(0)
    model = RankerWithEncoder(build_ranker(rs, NUM_ITEMS, 2 + enc.out_dim, device="cpu"), enc, 5).eval()
    before = model.logits(b).detach()
    with torch.no_grad():
        for p in enc.fm.trunk.parameters():
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(model.logits(b).detach(), before, atol=0, rtol=0)
    model.train()
    model(b)["loss"].backward()
    assert enc.proj.weight.grad is not None and float(enc.proj.weight.grad.abs().sum()) > 0
    assert make_encoder(1).proj.weight.abs().sum() > 0  # the default keeps nn.Linear's init
    with pytest.raises(SpecError, match=r"encoder\.proj_init' must be one of \['default', 'zero'\]"):
        load_spec(FinetuneSpec, None, ["encoder.proj_init=small"])
