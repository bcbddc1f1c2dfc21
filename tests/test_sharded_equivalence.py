"""The DMP-sharded PinFM computes what the unsharded one computes (2 gloo ranks).

Two processes shard a small PinFM with ``pinfm_rec.parallel.shard_model`` (tables built on
``meta``, FUSED kernel, SGD embedding optimizer applied in backward, dense part in DDP) once per
sharding type of the tables (row_wise, table_wise, column_wise), and once more with the dense part
in FSDP2 (row_wise tables; gradients compared as full tensors). Each rank runs one forward and one
backward on its own fixed batch and saves: its loss, the dense gradients after backward, and (via a
gather of the ShardedTensor ``state_dict``) the full tables before and after the step. The test
process then builds the same model unsharded on CPU from the saved initial weights, runs both
batches through it, and checks:

* loss of rank r               == unsharded loss on batch r
* dense grads (on every rank)  == mean over ranks of the unsharded grads (DDP averages)
* table after - table before   == -lr * mean over ranks of the unsharded table grads

The last line is the cross-rank semantics of the fused embedding optimizer, found empirically and
pinned here: the gradient each table shard receives is the MEAN over ranks of the per-rank loss
gradients, the same averaging DDP applies to the dense parameters, so one sharded step equals one
unsharded step on the loss (loss_0 + loss_1) / 2. It comes from TorchRec, not from pinfm_rec: the
backward of the output all-to-all divides by the world size
(``torchrec.distributed.comm_ops.GRADIENT_DIVISION``, True by default; the test checks the flag).
The test also asserts that the SUM over ranks and either rank's gradient alone do not match, so a
change of these semantics fails loudly.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gloo_world import join_gloo_world

from pinfm_rec.data.batch import SequenceBatch
from pinfm_rec.model import EmbeddingSpec, LossSpec, ModelSpec, PinFM, TableSpec, TrunkSpec, table_shardings

WORLD = 2
SHARDINGS = ("row_wise", "table_wise", "column_wise")
# (table sharding, dense wrapper): every sharding type with DDP, and FSDP2 for the dense part
CASES = [(s, "ddp") for s in SHARDINGS] + [("row_wise", "fsdp2")]
TABLES = ("t_item", "t_action", "t_surface")
LR = 0.1  # fused SGD learning rate of the tables
I, A, S = 30, 4, 3  # table rows
# column_wise: the planner's smallest column shard is 128, so dim 256 gives one shard per rank
DIM = 256
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-6, rtol=1e-4)


def _spec(sharding: str, dense: str = "ddp") -> ModelSpec:
    """The FSDP2 case also carries the learned history bias (a parameter module of its own that
    FSDP2 must place; user masking off, which it needs)."""
    tables = {k: TableSpec(sharding=sharding) for k in ("item", "action", "surface")}
    return ModelSpec(
        embedding=EmbeddingSpec(dim=DIM, **tables),
        loss=LossSpec(user_masking=False, history_bias=True) if dense == "fsdp2" else LossSpec(),
        # dropout 0; user masking and logQ as by default; in_batch_negatives (1024) > targets,
        # so no randperm subsampling of the in-batch negatives: the loss is deterministic
        trunk=TrunkSpec(d_model=32, n_layers=2, n_heads=2, max_len=10, dropout=0.0),
    )


def _item_counts() -> torch.Tensor:
    return torch.arange(1, I + 1, dtype=torch.float64)


def _batch(seed: int, lengths=(6, 3, 8, 2), k: int = 4) -> SequenceBatch:
    """A fixed training batch (different per seed): history, actions, surfaces, k negatives/row."""
    g = torch.Generator().manual_seed(seed)
    L, B = sum(lengths), len(lengths)
    starts = torch.randint(0, I, (B,), generator=g)
    items = torch.cat([(s + torch.arange(n)) % I for s, n in zip(starts, lengths)])
    actions = torch.tensor([1, 2, 0])[torch.randint(0, 3, (L,), generator=g)]
    surfaces = torch.randint(0, S, (L,), generator=g)
    negs = torch.randint(0, I, (B * k,), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "action", "surface", "neg_item_id"],
        values=torch.cat([items, actions, surfaces, negs]),
        lengths=torch.cat([torch.tensor(lengths)] * 3 + [torch.full((B,), k)]),
    )
    ts = torch.cat([torch.cumsum(torch.randint(1, 5000, (n,), generator=g), 0) for n in lengths])
    return SequenceBatch(features=kjt, timestamps=ts, request_ids=torch.arange(B), max_len=max(lengths))


def _full_tables(dmp) -> dict:
    """{table: full weight} on rank 0 (None elsewhere): gathers the sharded state_dict (collective)."""
    import torch.distributed as dist

    sd = dmp.state_dict()
    out = {}
    for t in TABLES:
        st = sd[f"ec.embeddings.{t}.weight"]  # ShardedTensor
        full = torch.empty(st.shape, dtype=st.dtype) if dist.get_rank() == 0 else None
        st.gather(dst=0, out=full)
        out[t] = full
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    pspec, env = join_gloo_world(rank, port, WORLD, embedding_optimizer="sgd", embedding_lr=LR)
    import torch.distributed as dist

    from torchrec.distributed import comm_ops

    from pinfm_rec.parallel import format_plan, shard_model
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 DTensor -> full
    try:
        for sharding, dense in CASES:
            pspec.dense = dense
            spec = _spec(sharding, dense)
            torch.manual_seed(0)
            model = PinFM(spec, dict(num_items=I, num_actions=A, num_surfaces=S), item_counts=_item_counts(), device="meta")
            dmp, plan = shard_model(model, pspec, env, table_shardings(spec.embedding), batch_size=4)
            before = _full_tables(dmp)
            dense_init = {k: full(v).detach().clone() for k, v in dmp.module.state_dict().items()
                          if not k.startswith("ec.")}
            out = dmp(_batch(seed=rank))
            out["loss"].backward()  # DDP all-reduces dense grads; fused SGD updates the tables
            grads = {n: full(p.grad).detach().clone() for n, p in dmp.module.named_parameters()
                     if not n.startswith("ec.")}
            after = _full_tables(dmp)
            res = {"loss": out["loss"].detach().clone(), "dense_grads": grads,
                   "dtensor_grads": all(hasattr(p.grad, "full_tensor") for n, p in dmp.module.named_parameters()
                                        if not n.startswith("ec.") and p.grad is not None)}
            if rank == 0:
                res.update(plan=format_plan(plan), before=before, after=after, dense_init=dense_init,
                           gradient_division=comm_ops.get_gradient_division())
            torch.save(res, os.path.join(out_dir, f"{sharding}-{dense}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """One 2-process run covering every sharding type: {sharding: [rank0 result, rank1 result]}."""
    out_dir = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return {f"{s}-{d}": [torch.load(out_dir / f"{s}-{d}_rank{r}.pt", weights_only=False) for r in range(WORLD)]
            for s, d in CASES}


def _reference(sharding: str, r0: dict, dense: str = "ddp"):
    """Unsharded PinFM from rank 0's initial weights; per batch r: loss, dense grads, table grads."""
    spec = _spec(sharding, dense)
    ref = PinFM(spec, dict(num_items=I, num_actions=A, num_surfaces=S), item_counts=_item_counts(), device="cpu")
    state = dict(r0["dense_init"])
    state.update({f"ec.embeddings.{t}.weight": w for t, w in r0["before"].items()})
    ref.load_state_dict(state, strict=True)
    per_rank = []
    for r in range(WORLD):
        ref.zero_grad(set_to_none=True)
        loss = ref(_batch(seed=r))["loss"]
        loss.backward()
        per_rank.append({
            "loss": loss.detach(),
            "dense_grads": {n: p.grad.clone() for n, p in ref.named_parameters() if not n.startswith("ec.")},
            "table_grads": {t: ref.ec.embeddings[t].weight.grad.clone() for t in TABLES},
        })
    return per_rank


@pytest.mark.slow
@pytest.mark.parametrize("sharding,dense", CASES)
def test_sharded_forward_and_gradients_equal_unsharded(sharded_results, sharding, dense):
    res = sharded_results[f"{sharding}-{dense}"]
    r0 = res[0]
    assert r0["dtensor_grads"] == (dense == "fsdp2")  # FSDP2 really sharded every dense parameter
    # the plan really uses the requested sharding type for every table
    for t in TABLES:
        line = next(l for l in r0["plan"].splitlines() if f"ec.{t}:" in l)
        assert f" {sharding} " in line, r0["plan"]
    if sharding in ("row_wise", "column_wise"):  # the item table is split over both ranks
        line = next(l for l in r0["plan"].splitlines() if "ec.t_item:" in l)
        assert "rank0:" in line and "rank1:" in line, r0["plan"]

    ref = _reference(sharding, r0, dense)
    if dense == "fsdp2":  # the history bias is placed and trained like any dense parameter
        assert "history_bias.weight" in ref[0]["dense_grads"]
        assert ref[0]["dense_grads"]["history_bias.weight"].abs().max() > 1e-4

    # ---- forward: each rank's loss is the unsharded loss of its batch ----
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["loss"], ref[r]["loss"], **LOSS_TOL)
    assert abs(float(ref[0]["loss"]) - float(ref[1]["loss"])) > 1e-3  # batches differ: a real check

    # ---- dense gradients: DDP mean over ranks, identical on every rank ----
    names = sorted(ref[0]["dense_grads"])
    assert names and sorted(res[0]["dense_grads"]) == names
    nonzero = 0
    for n in names:
        g0, g1 = ref[0]["dense_grads"][n], ref[1]["dense_grads"][n]
        expected = (g0 + g1) / WORLD
        for r in range(WORLD):
            torch.testing.assert_close(res[r]["dense_grads"][n], expected, **GRAD_TOL, msg=lambda m: f"{n}: {m}")
        nonzero += int(expected.abs().max() > 1e-6)
        if (g0 - g1).abs().max() > 1e-4:  # rank 0's own gradient alone is not what DDP gives
            assert not torch.allclose(res[0]["dense_grads"][n], g0, **GRAD_TOL), n
    assert nonzero >= len(names) - 2, "dense gradients are (almost) all zero: the check would be vacuous"

    # ---- tables: one fused SGD step applies -lr * (MEAN over ranks of the table gradient) ----
    assert r0["gradient_division"] is True  # TorchRec divides the all-to-all backward by world size
    for t in TABLES:
        delta = r0["after"][t] - r0["before"][t]
        g0, g1 = ref[0]["table_grads"][t], ref[1]["table_grads"][t]
        g_mean = (g0 + g1) / WORLD
        assert g_mean.abs().max() > 1e-3, t  # the table gets a real gradient
        torch.testing.assert_close(delta, -LR * g_mean, **GRAD_TOL, msg=lambda m: f"{t}: {m}")
        # not the sum over ranks, and not one rank's gradient alone
        assert not torch.allclose(delta, -LR * (g0 + g1), **GRAD_TOL), t
        for g in (g0, g1):
            assert not torch.allclose(delta, -LR * g, **GRAD_TOL), t
    # rows no batch looks up stay unchanged (the update is sparse)
    used = torch.cat([_batch(seed=r).features[k].values() for r in range(WORLD) for k in ("item_id", "neg_item_id")])
    untouched = torch.ones(I, dtype=torch.bool)
    untouched[used] = False
    if untouched.any():
        assert torch.equal(r0["after"]["t_item"][untouched], r0["before"]["t_item"][untouched])


@pytest.mark.slow
def test_equivalence_check_detects_a_perturbed_table(sharded_results):
    """The comparison is not vacuous: one perturbed row of the initial item table changes the loss
    by far more than the tolerance."""
    r0 = sharded_results["row_wise-ddp"][0]
    used = _batch(seed=0).features["item_id"].values()[0]
    perturbed = dict(r0, before={**r0["before"], "t_item": r0["before"]["t_item"].clone()})
    perturbed["before"]["t_item"][used] += 0.05
    ref = _reference("row_wise", perturbed)
    assert not torch.allclose(sharded_results["row_wise-ddp"][0]["loss"], ref[0]["loss"], **LOSS_TOL)
