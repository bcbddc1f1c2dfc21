"""Incremental export (train/delta_export.py): a base, then deltas of the changed table rows + the
dense rest; the chain applied to the base equals a full export, for a dense and a managed table
(slot state included), and a delta of a step that touched few ids holds only those rows."""
import pytest
import torch
from test_model_managed import RAW, managed_model, raw_batch

from pinfm_rec.train.delta_export import DeltaExporter, chain_sizes, load_chain, plain_state


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5)


@pytest.mark.parametrize("ids", ["managed", "few"])
def test_chain_of_deltas_equals_a_full_export(tmp_path, ids):
    m = managed_model(rows=64)
    opt = _sgd(m)
    ex = DeltaExporter(str(tmp_path))
    pool = RAW[:30] if ids == "managed" else RAW[:10]
    for step in range(4):
        if step:
            m(raw_batch(pool, seed=step, lengths=(3, 2), k=1))["loss"].backward()
            opt.step()
            opt.zero_grad()
        ex.export(m, step)
        if ids == "few" and step:  # 10 ids: only their item rows (and action/surface rows) change
            assert 1 <= ex.changed_rows <= 10 + 4 + 3 and ex.total_rows == 64 + 4 + 3
    full = plain_state(m)
    chained = load_chain(str(tmp_path))
    assert set(chained) == set(full)
    for k, v in full.items():
        torch.testing.assert_close(chained[k], v, msg=k, rtol=0, atol=0)
    # an earlier state is the chain cut at its step
    assert not torch.equal(load_chain(str(tmp_path), upto_step=1)["ec.items._embedding_module.embeddings.t_item.weight"],
                           full["ec.items._embedding_module.embeddings.t_item.weight"])
    sizes = chain_sizes(str(tmp_path))
    assert list(sizes)[0] == "base" and len(sizes) == 4
    if ids == "few":
        assert all(sizes["base"] - b > (64 - 10) * 16 * 4 * 0.9 for k, b in sizes.items() if k != "base")


def test_load_chain_without_base_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no base snapshot"):
        load_chain(str(tmp_path))
