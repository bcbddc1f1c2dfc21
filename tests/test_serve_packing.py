"""serve/packing.py: a scoring batch moved as one buffer (one transfer, one copy per graph replay)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pinfm_rec.data.ranking_batch import random_ranking_batch
from pinfm_rec.serve import hostprof
from pinfm_rec.serve.bench import TINY
from pinfm_rec.serve.graphs import signature
from pinfm_rec.serve.packing import ALIGN, batch_tensors, pack, packed_layout


def _batch(seed=0, hist=(5, 0, 32, 7), cands=(3, 2, 4, 0)):
    return random_ranking_batch(torch.Generator().manual_seed(seed), list(hist), list(cands),
                                num_items=TINY["num_items"], num_dense=3)


@pytest.fixture(scope="module")
def scorers():
    torch.manual_seed(0)
    plain = hostprof.tiny_scorer("fp32", max_len=32, pack=False)
    packed = type(plain)(plain.model, 32, "cpu", pack=True)
    return plain, packed


def test_packed_batch_is_views_of_one_aligned_buffer_with_the_same_values(scorers):
    plain, packed = scorers
    ref, got = plain.prepare(_batch(1)), packed.prepare(_batch(1))
    assert ref.packed is None and got.packed is not None
    a, b = batch_tensors(ref), batch_tensors(got)
    assert len(a) == len(b) >= 10
    buf = got.packed.buffer
    base = buf.data_ptr()
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        assert y.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # one storage
        assert (y.data_ptr() - base) % ALIGN == 0 and y.is_contiguous()
    # the KJT keeps the host sizes prepare computed (the forward reads them without a sync)
    kr, kg = ref.history.features, got.history.features
    assert kg._length_per_key == kr._length_per_key and kg._offset_per_key == kr._offset_per_key
    assert got.host == ref.host and got.max_cands == ref.max_cands
    # writing the buffer is writing the batch: what a graph replay's one copy relies on
    buf.zero_()
    assert all(not t.any() for t in batch_tensors(got))


def test_packed_batch_scores_equal_the_unpacked_one(scorers):
    plain, packed = scorers
    for seed in range(3):
        b = _batch(seed)
        torch.testing.assert_close(packed.logits(b), plain.logits(b), atol=0, rtol=0)


def test_packing_survives_only_untouched_batches(scorers):
    _, packed = scorers
    b = packed.prepare(_batch(2))
    assert packed_layout(b) == b.packed.layout
    sig = signature(b, packed.model)
    assert sig[0][0] == "packed"
    # another packed batch of the same shapes: the same graph key (its buffer refreshes the graph)
    assert signature(packed.prepare(_batch(3)), packed.model) == sig
    # mapping the tensors drops the packing; replacing one leaves a stale packing, which is ignored
    assert b.to("cpu").packed is None
    stale = dataclasses.replace(b, cand_item=b.cand_item.clone())
    assert stale.packed is b.packed and packed_layout(stale) is None
    assert signature(stale, packed.model)[0][0] != "packed"


def test_pack_handles_empty_tensors_and_every_dtype():
    b = _batch(4, hist=(0, 0), cands=(0, 0))
    b = dataclasses.replace(b, weights=torch.ones(0))
    p = pack(b, "cpu")
    for x, y in zip(batch_tensors(b), batch_tensors(p)):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    assert {t.dtype for t in batch_tensors(_batch())} >= {torch.int64, torch.float32, torch.bool}


def test_prepare_builds_the_rankers_sparse_features_on_the_host_same_as_the_forward(scorers):
    from pinfm_rec.rankers.dlrm import ranker_features

    plain, packed = scorers
    k = plain.model.history_bag_len
    assert k > 0
    for sc in (plain, packed):
        b = sc.prepare(_batch(6))
        assert b.ranker_sparse is not None and b.ranker_bag_len == k
        assert ranker_features(b, k) is b.ranker_sparse  # the forward reads it as is
        device_built = ranker_features(dataclasses.replace(b, ranker_sparse=None), k)
        for name in ("values", "lengths", "offsets"):
            assert torch.equal(getattr(b.ranker_sparse, name)(), getattr(device_built, name)())
        assert b.ranker_sparse.length_per_key() == device_built.length_per_key()
        # another bag length: built on the device again, not the stale one
        assert ranker_features(b, k - 1) is not b.ranker_sparse
        with torch.no_grad():
            torch.testing.assert_close(sc.model.logits(b), sc.model.logits(
                dataclasses.replace(b, ranker_sparse=None, packed=None)), atol=0, rtol=0)
    b = packed.prepare(_batch(6))
    buf = b.packed.buffer.untyped_storage().data_ptr()
    assert b.ranker_sparse.values().untyped_storage().data_ptr() == buf  # travels in the one buffer


@pytest.mark.parametrize("hist,cands", [((2048,), (256,)), ((5, 0, 60, 7), (3, 2, 4, 0)), ((0,), (0,)),
                                        ((3, 3), (0, 0)), ((0, 9), (4, 1))])
def test_ranker_features_host_equals_the_device_code(hist, cands):
    from pinfm_rec.data.host_sizes import HostSizes
    from pinfm_rec.rankers.dlrm import ranker_features, ranker_features_host

    b = _batch(7, hist=hist, cands=cands)
    b = dataclasses.replace(b, host=HostSizes.of(b, ids_checked=True))
    for k in (0, 1, 3, 50):
        want, got = ranker_features(b, k), ranker_features_host(b, k)
        assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
        for name in ("values", "lengths", "offsets"):
            w, g = getattr(want, name)(), getattr(got, name)()
            assert g.dtype == w.dtype and torch.equal(g, w), (k, name)


def test_pack_edge_cases_numpy_empty_tensors_device_batches_and_eval_fields():
    from pinfm_rec.data.host_sizes import HostSizes
    from pinfm_rec.rankers.dlrm import ranker_features_host

    # no candidates at all: numpy's empty arrays come with stride 0, which a byte view refuses
    b = _batch(8, hist=(5, 3), cands=(0, 0))
    b = dataclasses.replace(b, host=HostSizes.of(b, ids_checked=True))
    b = dataclasses.replace(b, ranker_sparse=ranker_features_host(b, 4), ranker_bag_len=4)
    p = pack(b, "cpu")
    assert p.packed is not None and p.ranker_sparse.values().numel() == 0
    for x, y in zip(batch_tensors(b), batch_tensors(p)):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    # a batch already on a device is moved as is (pack needs host tensors to concatenate)
    m = pack(_batch(9).to("meta"), "meta")
    assert m.packed is None and m.cand_item.device.type == "meta"
    # fields the forward does not read from the buffer still move to the device
    e = dataclasses.replace(_batch(9), cand_cold=torch.zeros(9, dtype=torch.bool))
    e = dataclasses.replace(e, history=dataclasses.replace(e.history, weights=torch.ones(4)))
    pm = pack(e, "meta")
    assert pm.packed is not None and pm.cand_cold.device.type == "meta"
    assert pm.history.weights.device.type == "meta"


def test_a_prebuilt_ranker_kjt_is_not_used_for_another_candidate_set_or_cold_candidates(scorers):
    from pinfm_rec.rankers.dlrm import ranker_features

    plain, _ = scorers
    k = plain.model.history_bag_len
    b = plain.prepare(_batch(10))
    fewer = dataclasses.replace(b, cand_item=b.cand_item[:-1], labels=b.labels[:-1], dense=b.dense[:-1],
                                cand_new=b.cand_new[:-1], weights=None,
                                cand_offsets=torch.tensor([0, 3, 5, 8, 8]))
    assert ranker_features(fewer, k) is not b.ranker_sparse  # other candidate count: rebuilt
    cold = dataclasses.replace(b, cand_cold=torch.zeros(b.num_candidates, dtype=torch.bool))
    assert ranker_features(cold, k) is not b.ranker_sparse  # cold masking: the forward's own build
    raw = _batch(10)
    unpadded = type(plain)(plain.model, 32, "cpu", buckets=False)  # (bucket padding drops cand_cold)
    raw = dataclasses.replace(raw, cand_cold=torch.zeros(raw.num_candidates, dtype=torch.bool))
    assert unpadded.prepare(raw).ranker_sparse is None
