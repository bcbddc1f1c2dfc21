"""data.cold_item_min_count: a candidate whose item had fewer than k impressions in strictly earlier
train-split requests is cold (no look-ahead; valid/test count the whole train split), the loader marks it
and both arms withhold its id: the ranker's candidate-id bag is empty, the encoder's candidate item
embedding zero. k = 0 is today's batch."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pinfm_rec.data.ranking import RankingDataSpec, build_ranking_loader, prepare_ranking
from pinfm_rec.data.ranking_batch import flatten_batch, random_ranking_batch
from pinfm_rec.data.ranking_store import cold_candidates, load_ranking_store, train_impressions_before
from pinfm_rec.errors import SpecError
from pinfm_rec.rankers.dlrm import CAND_FEATURE, RankerSpec, RankerWithEncoder, build_ranker, ranker_features
from pinfm_rec.spec import load_spec
from test_engagement_counters import _mind_file
from test_fusion_init import _encoder  # the same tiny encoder (NUM_ITEMS, OUT as here)

NUM_ITEMS, F, OUT = 40, 3, 8


def _loop(item, time, split):
    """Brute force: train-split impressions of the same item in strictly earlier requests."""
    return np.array([((item == item[c]) & (time < time[c]) & (split == 0)).sum() for c in range(item.size)])


def test_train_impressions_before_match_a_loop_and_have_no_look_ahead():
    rng = np.random.default_rng(0)
    c = 500
    item = rng.integers(0, 15, c)
    time = np.sort(rng.integers(0, 80, c))  # ties: rows of one request share a time, never counted
    split = np.where(time < 50, 0, np.where(time < 65, 1, 2)).astype(np.int8)
    got = train_impressions_before(item, time, split, 15)
    np.testing.assert_array_equal(got, _loop(item, time, split))
    # valid/test rows count the whole train split, nothing of valid/test
    train_counts = np.bincount(item[split == 0], minlength=15)
    np.testing.assert_array_equal(got[split > 0], train_counts[item[split > 0]])
    # a future occurrence never makes an earlier request's item warm: add impressions of a fresh item
    # late in train; the rows before them are unchanged and that item is cold there with any k >= 1
    item2 = item.copy()
    late = (time >= 40) & (time < 50)
    item2[late] = 14
    got2 = train_impressions_before(item2, time, split, 15)
    early = time < 40
    np.testing.assert_array_equal(got2[early & (item2 != 14)], got[early & (item2 != 14)])
    first_late = np.flatnonzero(late)[0]
    assert got2[first_late] == ((item[:first_late] == 14) & (time[:first_late] < time[first_late])).sum()
    assert got2[split > 0][item2[split > 0] == 14].min() >= late.sum()  # (can fail: test rows see them)


def _spec(path, tmp_path, k):
    return RankingDataSpec(source="mind", path=path, cache_dir=str(tmp_path / "cache"), max_len=16,
                           batch_size=8, eval_batch_size=8, engagement_counters=True, cold_item_min_count=k)


def test_loader_marks_cold_candidates_and_k0_is_todays_batch(tmp_path):
    path = _mind_file(tmp_path / "behaviors.tsv", n=80)
    info0 = prepare_ranking(_spec(path, tmp_path, 0))
    info2 = prepare_ranking(_spec(path, tmp_path, 2))
    assert info2.root == info0.root  # computed at load time: one prepared dir
    st = load_ranking_store(info0.root)
    t = st.tables
    req = np.repeat(np.arange(t.num_requests), np.diff(t.cand_offsets))
    want = _loop(t.cand_item, t.time[req], t.split[req]) < 2
    np.testing.assert_array_equal(cold_candidates(st, 2), want)
    assert want.any() and not want.all()
    assert not cold_candidates(st, 0).any()
    for split in ("train", "valid", "test"):
        b0s = list(build_ranking_loader(_spec(path, tmp_path, 0), info0, split, seed=1))
        b2s = list(build_ranking_loader(_spec(path, tmp_path, 2), info2, split, seed=1))
        assert len(b0s) == len(b2s)
        for b0, b2 in zip(b0s, b2s):
            assert b0.cand_cold is None  # k = 0: today's batch, nothing else differs
            for f in dataclasses.fields(b0):
                if f.name not in ("history", "cand_cold", "host"):
                    a, b = getattr(b0, f.name), getattr(b2, f.name)
                    assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
            assert b2.cand_cold.dtype == torch.bool and b2.cand_cold.shape == b2.cand_item.shape
            # the same candidate rows as the store's mask (request-major, the plan's requests)
            reqs = b2.history.request_ids.numpy()
            rows = np.concatenate([np.arange(t.cand_offsets[r], t.cand_offsets[r + 1]) for r in reqs])
            np.testing.assert_array_equal(b2.cand_cold.numpy(), want[rows])


def test_cold_item_min_count_spec():
    from pinfm_rec.train.finetune import FinetuneSpec

    assert load_spec(FinetuneSpec, None, []).data.cold_item_min_count == 0
    assert load_spec(FinetuneSpec, None, ["data.cold_item_min_count=3"]).data.cold_item_min_count == 3
    with pytest.raises(SpecError, match="cold_item_min_count"):
        load_spec(FinetuneSpec, None, ["data.cold_item_min_count=-1"])


def _model(with_encoder: bool) -> RankerWithEncoder:
    rs = RankerSpec(embedding_dim=8, dense_arch=[16, 8], over_arch=[16, 1], history_bag_len=5)
    torch.manual_seed(0)
    ranker = build_ranker(rs, NUM_ITEMS, F + (OUT if with_encoder else 0), device="cpu")
    return RankerWithEncoder(ranker, _encoder(1) if with_encoder else None, 5).eval()


def test_ranker_features_give_cold_candidates_an_empty_id_bag():
    b = random_ranking_batch(torch.Generator().manual_seed(3), [4, 0, 9], [3, 2, 4], num_items=NUM_ITEMS,
                             num_dense=F)
    cold = torch.tensor([True, False, False, True, True, False, False, False, True])
    plain = ranker_features(b, 5)[CAND_FEATURE]
    got = ranker_features(dataclasses.replace(b, cand_cold=cold), 5)[CAND_FEATURE]
    torch.testing.assert_close(got.lengths(), (~cold).long())
    torch.testing.assert_close(got.values(), b.cand_item[~cold])
    torch.testing.assert_close(plain.values(), b.cand_item)
    # the flat layout keeps the mask
    assert torch.equal(flatten_batch(dataclasses.replace(b, cand_cold=cold)).cand_cold, cold)


@pytest.mark.parametrize("with_encoder", [False, True])
def test_cold_ids_reach_neither_arm(with_encoder):
    """Changing a cold candidate's id changes nothing; changing a warm one does (can fail both ways);
    all-cold equals zeroing the candidate id rows of the ranker table and the encoder's candidate
    embeddings."""
    m = _model(with_encoder)
    g = torch.Generator().manual_seed(5)
    b = random_ranking_batch(g, [4, 3, 9], [3, 2, 4], num_items=NUM_ITEMS, num_dense=F)
    cold = torch.tensor([True, False, True, False, True, False, True, True, False])
    bc = dataclasses.replace(b, cand_cold=cold)
    other = (b.cand_item + 7) % NUM_ITEMS
    with torch.no_grad():
        base = m.logits(bc)
        swapped_cold = m.logits(dataclasses.replace(bc, cand_item=torch.where(cold, other, b.cand_item)))
        swapped_warm = m.logits(dataclasses.replace(bc, cand_item=torch.where(cold, b.cand_item, other)))
    torch.testing.assert_close(swapped_cold, base, atol=0, rtol=0)
    assert not torch.allclose(swapped_warm[~cold], base[~cold])
    if with_encoder:  # the encoder alone: cold features ignore the id, warm ones do not
        with torch.no_grad():
            f0 = m.encoder(bc)
            f1 = m.encoder(dataclasses.replace(bc, cand_item=other))
        torch.testing.assert_close(f0[cold], f1[cold], atol=1e-6, rtol=0)
        assert not torch.allclose(f0[~cold], f1[~cold])
    # training: a cold candidate's id row gets no gradient from the ranker's table
    m.train()
    m(bc)["loss"].backward()
    table = next(p for n, p in m.ranker.named_parameters() if "t_r_cand" in n)
    hit = torch.zeros(NUM_ITEMS, dtype=torch.bool)
    hit[b.cand_item[~cold]] = True
    assert float(table.grad[~hit].abs().sum()) == 0 and float(table.grad[hit].abs().sum()) > 0


def test_serving_refuses_a_model_trained_with_cold_items():
    """pinfm score / export do not compute the cold mask: a run trained with k > 0 would be scored with
    every candidate's id (train/serve skew), so loading it for serving is a SpecError naming the key."""
    from pinfm_rec.serve.model_io import check_servable
    from pinfm_rec.train.finetune import FinetuneSpec

    check_servable(load_spec(FinetuneSpec, None, []))  # k = 0: servable
    with pytest.raises(SpecError, match="cold_item_min_count=10"):
        check_servable(load_spec(FinetuneSpec, None, ["data.cold_item_min_count=10"]), "runs/x/spec.yaml")
