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
    item = "ec.items._embedding_module.embeddings.t_item.weight"
    assert not torch.equal(load_chain(str(tmp_path), upto_step=1)[item], full[item])
    sizes = chain_sizes(str(tmp_path))
    assert list(sizes)[0] == "base" and len(sizes) == 4
    if ids == "few":
        assert all(sizes["base"] - b > (64 - 10) * 16 * 4 * 0.9 for k, b in sizes.items() if k != "base")


def test_load_chain_without_base_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no base snapshot"):
        load_chain(str(tmp_path))


def test_pretrain_recipe_writes_a_delta_chain_equal_to_its_final_model(tmp_path):
    import os
    import subprocess
    import sys

    from pinfm_rec.model.encoder import PinFMEncoder

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pinfm_rec.cli", "pretrain", "--spec", "specs/pretrain/synthetic-tiny.yaml",
           f"run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache", "data.synthetic.num_users=300",
           "data.synthetic.num_items=200", "data.synthetic.mean_len=20", "data.max_len=20", "model.trunk.max_len=20",
           "data.batch_size=32", "train.epochs=2", "checkpoint.every_steps=4", "delta_export=true"]
    out = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sizes = chain_sizes(str(tmp_path / "run" / "deltas"))
    assert len(sizes) >= 3  # base + a delta per later checkpoint (every table row changes on this tiny data)
    chained = load_chain(str(tmp_path / "run" / "deltas"))
    final = PinFMEncoder.from_pretrained(str(tmp_path / "run" / "encoder")).fm.state_dict()
    for k, v in final.items():
        torch.testing.assert_close(chained[k], v, msg=k, rtol=0, atol=0)


def _gather_worker(rank: int, port: int, out: str) -> None:
    from gloo_world import join_gloo_world
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

    from pinfm_rec.train.delta_export import gather_full

    join_gloo_world(rank, port, 2)
    try:
        full = (2**40 + torch.arange(8, dtype=torch.int64) * 7919 + 1).reshape(4, 2)  # ids > 2**40, odd
        md = [ShardMetadata([2 * r, 0], [2, 2], f"rank:{r}/cpu") for r in range(2)]
        st = ShardedTensor._init_from_local_shards([Shard(full[2 * rank:2 * rank + 2].clone(), md[rank])], [4, 2])
        got = gather_full(st, rank, torch.device("cpu"))
        rounded = torch.empty(4, 2, dtype=torch.int64) if rank == 0 else None
        st.gather(dst=0, out=rounded)  # torch's default: staged through a float32 buffer
        if rank == 0:
            torch.save({"want": full, "got": got, "rounded": rounded}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_int64_ids_gather_exactly(tmp_path):
    """Raw ids > 2**40 in a ShardedTensor (managed-table slot state under DMP) come back exact from
    ``gather_full``; torch's ``gather`` without a dtype rounds them (the bug it avoids)."""
    import torch.multiprocessing as mp
    from gloo_world import free_port

    out = str(tmp_path / "g.pt")
    mp.spawn(_gather_worker, args=(free_port(), out), nprocs=2, join=True)
    r = torch.load(out)
    assert r["got"].dtype == torch.int64 and torch.equal(r["got"], r["want"])
    assert not torch.equal(r["rounded"], r["want"])  # the float32 staging buffer loses the low bits
