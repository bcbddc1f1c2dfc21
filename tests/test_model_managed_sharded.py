"""id_mode=managed sharded with DMP (row_wise, 2 gloo ranks) computes what the unsharded managed
model computes for the same raw-id -> slot assignment.

Two processes shard a small managed PinFM with ``pinfm_rec.parallel.shard_model`` (TorchRec's
ManagedCollisionEmbeddingCollection sharder, 2 buckets, fused SGD) and run one training step each on
their own batch of raw 62-bit ids: the first step admits every id (routed, once mixed by
``id_hash=mix``, the default, to the rank owning its half of [0, input_hash_size)); the second step
is compared. The test process builds the unsharded
managed model with rank 0's weights before step 2 and the slots the sharded run gave each raw id,
and checks per rank: loss == unsharded loss on that rank's batch; table update == -lr * mean over ranks of the
unsharded table gradients (TorchRec's gradient division, as in test_sharded_equivalence.py); every
raw id holds exactly one slot (zero collisions), on the rank its bucket names; an incremental
export (base after step 1, delta after step 2) loads back to the full sharded state.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp
from test_model_managed import managed_model, raw_batch
from gloo_world import free_port, join_gloo_world

from pinfm_rec.model import table_shardings
from pinfm_rec.model.id_mix import mix, unmix
from pinfm_rec.model.managed import EMPTY_SLOT, slot_ids
from pinfm_rec.train.delta_export import DeltaExporter, load_chain, plain_state

WORLD, ROWS, LR, HASH = 2, 32, 0.1, 2**62
g = torch.Generator().manual_seed(1)
IDS = torch.cat([torch.randint(0, HASH // 2, (10,), generator=g), torch.randint(HASH // 2, HASH, (10,), generator=g)])
TABLES = {"t_item": "ec.items._embedding_module.embeddings.t_item.weight",
          "t_action": "ec.rest.embeddings.t_action.weight", "t_surface": "ec.rest.embeddings.t_surface.weight"}


def _model(device: str):
    return managed_model(rows=ROWS, device=device, buckets=WORLD, input_hash_size=HASH)


def _full_tables(dmp) -> dict:
    """{table: full weight} on rank 0 (None elsewhere; collective)."""
    state = plain_state(dmp)
    return {t: state[key] if state else None for t, key in TABLES.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    pspec, env = join_gloo_world(rank, port, WORLD, embedding_optimizer="sgd", embedding_lr=LR)
    import torch.distributed as dist

    from pinfm_rec.parallel import shard_model

    try:
        model = _model("meta")
        dmp, plan = shard_model(model, pspec, env, table_shardings(model.spec.embedding), batch_size=4)
        # step 1 admits every id of both ranks' batches; TorchRec's sharded MC-EC re-initialises the rows
        # of admitted slots (and their optimizer state), so the compared step is the second one
        dmp(raw_batch(IDS, seed=rank))["loss"].backward()
        exporter = DeltaExporter(os.path.join(out_dir, "export"))  # incremental export under DMP
        exporter.export(dmp, 1)
        before = _full_tables(dmp)
        dense_init = {k: v.detach().clone() for k, v in dmp.module.state_dict().items() if not k.startswith("ec.")}
        out = dmp(raw_batch(IDS, seed=rank))
        out["loss"].backward()
        after = _full_tables(dmp)
        exporter.export(dmp, 2)
        full = plain_state(dmp)
        chain_ok, gathered_raw = None, None
        if rank == 0:
            gathered_raw = torch.cat([v for k, v in full.items() if k.endswith("_mch_sorted_raw_ids")])
            chained = load_chain(os.path.join(out_dir, "export"))
            chain_ok = set(chained) == set(full) and all(torch.equal(chained[k], v) for k, v in full.items())
        raw, slot = slot_ids(dmp)
        kinds = {k: {t: p.sharding_type for t, p in v.items()} for k, v in plan.plan.items()}
        torch.save({"chain_ok": chain_ok, "gathered_raw": gathered_raw, "loss": out["loss"].detach(), "raw": raw, "slot": slot, "before": before,
                    "after": after, "dense_init": dense_init, "plan": kinds}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reference(r0: dict, raw: torch.Tensor, slot: torch.Tensor):
    """The unsharded managed model with rank 0's initial weights and the sharded slot assignment."""
    from torchrec.modules.mc_modules import MCHManagedCollisionModule

    ref = _model("cpu")
    state = dict(r0["dense_init"])
    state.update({key: r0["before"][t] for t, key in TABLES.items()})
    ref.load_state_dict(state, strict=False)
    mch = next(m for m in ref.modules() if isinstance(m, MCHManagedCollisionModule))
    by_slot = torch.full((ROWS,), EMPTY_SLOT, dtype=torch.long)
    by_slot[slot] = mix(raw, 62)  # the slot state holds the mixed ids (id_hash=mix)
    order = torch.argsort(by_slot, stable=True)
    mch._mch_sorted_raw_ids.copy_(by_slot[order])
    mch._mch_remapped_ids_mapping.copy_(torch.arange(ROWS)[order])
    ref.eval()  # no admission: the slots stay as given
    per_rank = []
    for r in range(WORLD):
        ref.zero_grad(set_to_none=True)
        loss = ref(raw_batch(IDS, seed=r))["loss"]
        loss.backward()
        per_rank.append({"loss": loss.detach(),
                         "grads": {t: ref.get_parameter(key).grad.clone() for t, key in TABLES.items()}})
    return per_rank


@pytest.mark.slow
def test_managed_sharded_equals_unsharded(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert res[0]["plan"]["ec.items"]["t_item"] == "row_wise"
    assert res[0]["chain_ok"]  # base + delta after step 2 == the full sharded state (slot buffers too)
    raw, slot = torch.cat([r["raw"] for r in res]), torch.cat([r["slot"] for r in res])
    seen = torch.cat([raw_batch(IDS, seed=r).features[k].values() for r in range(WORLD)
                      for k in ("item_id", "neg_item_id")])
    assert sorted(raw.tolist()) == sorted(set(seen.tolist()))  # every id of both ranks admitted once
    assert slot.unique().numel() == slot.numel()  # zero collisions across ranks
    # the export's gathered slot state holds the exact (mixed) ids (62-bit; no float32 staging on the way)
    g = res[0]["gathered_raw"]
    assert g.dtype == torch.int64 and sorted(unmix(g[g != EMPTY_SLOT], 62).tolist()) == sorted(raw.tolist())
    for r, out in enumerate(res):  # rank r holds slots [r*16, (r+1)*16) and the ids whose MIXED id is in bucket r
        assert bool(((out["slot"] // (ROWS // WORLD)) == r).all())
        assert bool(((mix(out["raw"], 62) // (HASH // WORLD)) == r).all()) and out["raw"].numel() > 0
    ref = _reference(res[0], raw, slot)
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["loss"], ref[r]["loss"], atol=1e-5, rtol=1e-5)
    for t in TABLES:
        want = -LR * (ref[0]["grads"][t] + ref[1]["grads"][t]) / WORLD
        torch.testing.assert_close(res[0]["after"][t] - res[0]["before"][t], want, atol=1e-6, rtol=1e-4)
    assert (ref[0]["grads"]["t_item"].abs().sum(1) > 0).sum() >= 10  # many item rows trained
