"""embedding.id_mode=managed (unsharded): raw 64-bit item ids through TorchRec's managed-collision
item table: admitted ids get a slot of their own, an unknown id reads the shared last slot, a full
table evicts (LRU), the rest of the model sees slot ids; sharding/spec rules."""
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.batch import SequenceBatch
from pinfm_rec.model import EmbeddingSpec, ModelSpec, PinFM, TableSpec, TrunkSpec, table_shardings, table_sizes
from pinfm_rec.model.managed import ManagedSpec, ManagedTables, managed_stats, slot_ids

VOCAB = {"num_items": 30, "num_actions": 4, "num_surfaces": 3}
RAW = torch.randint(2**40, 2**61, (64,), generator=torch.Generator().manual_seed(0))  # raw 64-bit item ids


def raw_batch(ids: torch.Tensor, seed: int = 0, lengths=(6, 3, 8, 1), k: int = 2, train: bool = True):
    """A batch whose items (history and negatives) are drawn from the raw ids ``ids``."""
    g = torch.Generator().manual_seed(seed)
    L, B = sum(lengths), len(lengths)
    pick = lambda n: ids[torch.randint(0, ids.numel(), (n,), generator=g)]  # noqa: E731
    keys = ["item_id", "action", "surface"]
    vals = [pick(L), torch.randint(0, 4, (L,), generator=g), torch.randint(0, 3, (L,), generator=g)]
    lens = [torch.tensor(lengths)] * 3
    if train:
        keys.append("neg_item_id")
        vals.append(pick(B * k))
        lens.append(torch.full((B,), k))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(vals), lengths=torch.cat(lens))
    ts = torch.cat([torch.cumsum(torch.randint(1, 5000, (n,), generator=g), 0) for n in lengths])
    return SequenceBatch(features=kjt, timestamps=ts, request_ids=torch.arange(B), max_len=max(lengths))


def managed_model(rows: int = 64, eviction: str = "lru", seed: int = 0, device: str = "cpu", **kw) -> PinFM:
    torch.manual_seed(seed)
    spec = ModelSpec(embedding=EmbeddingSpec(dim=16, id_mode="managed", item=TableSpec(num_embeddings=rows),
                                             managed=ManagedSpec(eviction=eviction, **kw)),
                     trunk=TrunkSpec(d_model=16, n_layers=1, n_heads=2, max_len=10, dropout=0.0))
    return PinFM(spec, VOCAB, device=device)


def test_raw_ids_get_slots_of_their_own():
    m = managed_model()
    assert isinstance(m.ec, ManagedTables) and m.sizes["t_item"] == 64
    b = raw_batch(RAW[:20])
    out = m(b)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    raw, slot = slot_ids(m)
    seen = torch.unique(torch.cat([b.features["item_id"].values(), b.features["neg_item_id"].values()]))
    assert sorted(raw.tolist()) == sorted(seen.tolist())  # every id seen in training admitted
    assert slot.unique().numel() == slot.numel() and bool((slot < 63).all())  # zero collisions, not the unknown slot
    assert managed_stats(m) == {"slots": 64, "occupied": seen.numel()}
    # the model sees slot ids: the item ids the loss gets are the admitted slots of the raw ids
    t = m.eval().embed_tokens(b.features)
    lut = dict(zip(raw.tolist(), slot.tolist()))
    assert t.kjt["item_id"].values().tolist() == [lut[r] for r in b.features["item_id"].values().tolist()]
    # eval does not admit: an unseen raw id reads the shared unknown row (the last slot)
    unseen = RAW[40:43]
    e = m.item_embeddings(torch.cat([unseen, RAW[:1]]))
    torch.testing.assert_close(e[0], e[1]) and torch.testing.assert_close(e[0], e[2])
    assert not torch.allclose(e[0], e[3])
    assert slot_ids(m)[0].numel() == seen.numel()


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_a_full_table_evicts_and_admits_the_new_ids(eviction):
    m = managed_model(rows=8, eviction=eviction)  # 7 slots for ids + the unknown slot
    for step in range(3):  # the first ids, used three times
        m(raw_batch(RAW[:5], seed=step, lengths=(3, 2), k=1))
    old = set(slot_ids(m)[0].tolist())
    assert old == set(RAW[:5].tolist())
    new, last = set(), set()
    for step in range(2):  # new ids (<= 6 distinct), 7 slots: old ids must go
        b = raw_batch(RAW[10:16], seed=10 + step, lengths=(4, 4), k=2)
        last = set(b.features["item_id"].values().tolist() + b.features["neg_item_id"].values().tolist())
        new |= last
        m(b)
    now = set(slot_ids(m)[0].tolist())
    assert len(now) == 7 and len(new) >= 5 and now <= old | new
    if eviction == "lru":  # the most recently used ids are all in, old ones were evicted for them
        assert last <= now and len(old - now) >= 3
    else:  # lfu: old ids used 3 times outlive the new ones: fewer old ids go than under LRU
        assert 1 <= len(old - now) and len(old & now) >= 3


def test_managed_spec_rules():
    spec = EmbeddingSpec(dim=8, id_mode="managed", item=TableSpec(num_embeddings=10), managed=ManagedSpec(buckets=4))
    assert table_sizes(spec, VOCAB)["t_item"] == 12  # rounded up to a multiple of the buckets
    assert table_shardings(spec) == {"t_item": "row_wise"}  # TorchRec shards managed tables row_wise only
    spec.item.sharding = "column_wise"
    with pytest.raises(ValueError, match="row_wise only"):
        table_shardings(spec)
    from pinfm_rec.model import LossSpec

    with pytest.raises(ValueError, match="full_catalogue needs dense item ids"):
        PinFM(ModelSpec(embedding=EmbeddingSpec(dim=16, id_mode="managed"), loss=LossSpec(full_catalogue=True),
                        trunk=TrunkSpec(d_model=16, n_layers=1, n_heads=2, max_len=10)), VOCAB, device="cpu")


def test_managed_tables_on_cpu_need_the_sgd_table_optimizer():
    from pinfm_rec.parallel import ParallelSpec, init_distributed, shard_model, shutdown_distributed

    env = init_distributed(ParallelSpec(), force_cpu=True)
    try:
        m = managed_model(device="meta")
        from pinfm_rec.errors import DeviceError

        with pytest.raises(DeviceError, match="embedding_optimizer=rowwise_adagrad with managed-collision.*sgd on CPU"):
            shard_model(m, ParallelSpec(embedding_optimizer="rowwise_adagrad"), env, table_shardings(m.spec.embedding))
    finally:
        shutdown_distributed()


def test_encoder_over_a_managed_table_scores_raw_candidate_ids():
    from pinfm_rec.data.ranking_batch import random_ranking_batch
    from pinfm_rec.model.encoder import EncoderSpec, PinFMEncoder

    fm = managed_model()
    enc = PinFMEncoder(fm.spec, EncoderSpec(kernel="pytorch", out_dim=8), VOCAB, device="cpu")
    b = random_ranking_batch(torch.Generator().manual_seed(0), [4, 3], [2, 3], num_items=30)
    b.cand_item = RAW[b.cand_item]  # raw 64-bit candidate and history ids
    hist = b.history.features
    b.history.features = KeyedJaggedTensor.from_lengths_sync(
        hist.keys(), torch.cat([RAW[hist["item_id"].values()], hist.values()[hist["item_id"].values().numel():]]),
        hist.lengths())
    feats, _ = enc.train().encode(b)  # training admits the ids it sees
    assert feats.shape == (5, 8) and torch.isfinite(feats).all()
    admitted = set(slot_ids(enc)[0].tolist())
    assert set(b.cand_item.tolist()) <= admitted and set(RAW[hist["item_id"].values()].tolist()) <= admitted
    f_dcat, _ = enc.eval().encode(b)
    torch.testing.assert_close(f_dcat, enc.encode(b, mode="flat")[0], atol=2e-5, rtol=2e-5)
