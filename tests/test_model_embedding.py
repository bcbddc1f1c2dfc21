import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.model.embedding import (
    EmbeddingSpec,
    TableSpec,
    build_embedding_collection,
    check_ids,
    table_shardings,
    table_sizes,
)


VOCAB = {"num_items": 20, "num_actions": 4, "num_surfaces": 3}

def _kjt(items, actions, surfaces, lengths, neg=None):
    keys = ["item_id", "action", "surface"]
    vals = [items, actions, surfaces]
    lens = [lengths] * 3
    if neg is not None:
        keys.append("neg_item_id")
        vals.append(neg)
        lens.append([len(neg) // len(lengths)] * len(lengths))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor(sum(vals, [])),
        lengths=torch.tensor(sum(lens, [])),
    )


def test_ec_tables_and_features():
    spec = EmbeddingSpec(dim=8, surface=TableSpec(num_embeddings=7, sharding="row_wise"))
    ec = build_embedding_collection(spec, VOCAB, device="cpu")
    assert isinstance(ec, EmbeddingCollection)
    cfg = {c.name: c for c in ec.embedding_configs()}
    assert set(cfg) == {"t_item", "t_action", "t_surface"}
    assert cfg["t_item"].feature_names == ["item_id", "neg_item_id"]
    assert cfg["t_action"].feature_names == ["action"]
    assert cfg["t_surface"].feature_names == ["surface"]
    assert [cfg[n].num_embeddings for n in ("t_item", "t_action", "t_surface")] == [20, 4, 7]
    assert all(c.embedding_dim == 8 for c in cfg.values())
    assert ec.embeddings["t_item"].weight.abs().max() <= spec.init_scale
    kjt = _kjt([1, 2, 3], [0, 1, 2], [0, 1, 2], [2, 1], neg=[5, 6, 7, 8])
    out = ec(kjt)
    assert out["item_id"].values().shape == (3, 8)
    assert out["neg_item_id"].values().shape == (4, 8)
    torch.testing.assert_close(out["neg_item_id"].values()[0], ec.embeddings["t_item"].weight[5])
    assert table_shardings(spec) == {"t_surface": "row_wise"}
    meta = build_embedding_collection(spec, VOCAB)
    assert meta.embeddings["t_item"].weight.is_meta


def test_bad_spec():
    with pytest.raises(ValueError, match="sharding"):
        table_shardings(EmbeddingSpec(item=TableSpec(sharding="diagonal")))
    with pytest.raises(ValueError, match="id_mode"):
        build_embedding_collection(EmbeddingSpec(id_mode="clip"), VOCAB, device="cpu")


def test_check_ids_error_names_feature_table_id_size():
    sizes = table_sizes(EmbeddingSpec(), dict(VOCAB, num_items=10))
    ok = _kjt([1, 9, 0], [0, 3, 2], [0, 1, 2], [2, 1], neg=[4, 5])
    assert check_ids(ok, sizes) is ok
    with pytest.raises(ValueError) as e:
        check_ids(_kjt([1, 2, 3], [0, 1, 2], [0, 1, 2], [2, 1], neg=[4, 12]), sizes)
    msg = str(e.value)
    assert "neg_item_id" in msg and "t_item" in msg and "12" in msg and "size 10" in msg
    with pytest.raises(ValueError) as e:
        check_ids(_kjt([1, 2, 3], [0, 1, 4], [0, 1, 2], [2, 1]), sizes)
    assert "'action'" in str(e.value) and "t_action" in str(e.value) and "id 4" in str(e.value)
    with pytest.raises(ValueError, match="id -1"):
        check_ids(_kjt([1, -1, 3], [0, 1, 2], [0, 1, 2], [2, 1]), sizes)


def test_check_ids_hash_mode():
    sizes = {"t_item": 10, "t_action": 4, "t_surface": 3}
    kjt = _kjt([1, 23, 3], [0, 1, 5], [0, 1, 2], [2, 1], neg=[4, 12])
    out = check_ids(kjt, sizes, mode="hash")
    assert out.keys() == kjt.keys()
    assert out["item_id"].values().tolist() == [1, 3, 3]
    assert out["action"].values().tolist() == [0, 1, 1]
    assert out["neg_item_id"].values().tolist() == [4, 2]
    assert torch.equal(out.lengths(), kjt.lengths())
    ec = build_embedding_collection(EmbeddingSpec(dim=4, id_mode="hash"), dict(VOCAB, num_items=10), device="cpu")
    assert torch.isfinite(ec(out)["item_id"].values()).all()
