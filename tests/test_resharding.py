"""A checkpoint saved on N gloo ranks resumes on M != N ranks (and under another sharding plan) with
exactly the same tensors: embedding rows, trunk weights, the fused row-wise Adagrad state and the
dense AdamW state. Each case trains synthetic-tiny for 3 steps on N ranks through
``torch.distributed.run``, resumes it on M ranks for zero steps (the resumed run re-saves the same
step) and compares both DCP checkpoints converted to full tensors (scripts/scaling/reshard_check.py,
which also runs the GPU cases). The loader position does not reshard: the resumed run logs that
the epoch restarts.
"""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("reshard_check", os.path.join(ROOT, "scripts/scaling/reshard_check.py"))
rc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)

SPEC = "specs/pretrain/synthetic-tiny.yaml"
ITEM = "model.ec.embeddings.t_item.weight"
ITEM_STATE = "optim.state.emb.ec.embeddings.t_item.weight.t_item.momentum1"


def _sharding(table_plan: str):
    return [f"model.embedding.{t}.sharding={table_plan}" for t in ("item", "action", "surface")]


CASES = {
    # N -> M, same plan (item row_wise, the rest table_wise)
    "2to1": (2, 1, [], []),
    # 1 -> 2 and the plan changes: every table table_wise when saved, row_wise when resumed
    "1to2-table-to-row": (1, 2, _sharding("table_wise"), _sharding("row_wise")),
    # 4 -> 2, row_wise -> table_wise, the trunk under FSDP2 (DTensor shards) in both runs
    "4to2-row-to-table-fsdp2": (4, 2, _sharding("row_wise") + ["parallel.dense=fsdp2"],
                                _sharding("table_wise") + ["parallel.dense=fsdp2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_reshards_exactly(tmp_path, case):
    n, m, save_ov, load_ov = CASES[case]
    r = rc.save_then_resume(str(tmp_path), SPEC, n, m, steps=3, save_overrides=rc.TINY + save_ov,
                            load_overrides=rc.TINY + load_ov)
    c = r["cmp"]
    assert not c["different"] and not c["only_a"] and not c["only_b"], c
    a = r["saved"]
    # full tensors, not one rank's shard; trained state (not a fresh init compared with itself)
    assert a[ITEM].shape == (800, 32) and a[ITEM_STATE].shape == (800,)
    assert int((a[ITEM_STATE] > 0).sum()) > 50
    trunk = [k for k in c["equal"] if k.startswith("model.trunk.layers.")]
    dense_state = [k for k in c["equal"] if k.startswith("optim.state.dense.") and k.endswith("exp_avg")]
    assert len(trunk) >= 8 and len(dense_state) >= 8, (trunk, dense_state)
    assert any(torch.is_tensor(a[k]) and a[k].abs().sum() > 0 for k in dense_state)
    # the world size changed: the loader state is dropped and the epoch restarts, said in the log
    assert rc.WORLD_CHANGE_WARNING in r["log"]
    assert "resumed from" in r["log"] and "(step 3, epoch 0)" in r["log"]
