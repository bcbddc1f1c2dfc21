"""Raw int64 item ids through the ranking side (issue 18): synthetic ranking data with sparse 64-bit
ids (``data.synthetic.raw_id_offset``, ``data.raw_ids``), fine-tuned with a managed and a hash
encoder (the ranker's own tables hash them), evaluated, scored by ``pinfm score``; the fine-tune
recipe's incremental export (``delta_export``) equals its final checkpoint; spec and data checks."""
from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from finetune_logits import training_logits

from pinfm_rec.errors import DataError, SpecError

OFFSET = 2**40
FT = {
    "name": "ft-raw", "seed": 0, "tensorboard": False, "delta_export": True,
    "data": {"source": "synthetic", "max_len": 30, "batch_size": 32, "eval_batch_size": 64, "raw_ids": True,
             "synthetic": {"num_requests": 1200, "num_items": 600, "mean_len": 20, "candidates_next": 4,
                           "negatives_per_request": 12, "raw_id_offset": OFFSET}},
    "model": {"embedding": {"dim": 32, "item": {"num_embeddings": 512}},
              "trunk": {"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1, "max_len": 30}},
    "encoder": {"init": "random", "out_dim": 16, "cand_id_dropout": 0.1, "kernel": "pytorch"},  # no Triton interpreter
    "ranker": {"arch": "dlrm", "embedding_dim": 16, "dense_arch": [32, 16], "over_arch": [32, 1],
               "history_bag_len": 10},
    # on CPU a managed table needs plain SGD (FBGEMM has no CPU kernel to reset a re-used slot's state)
    "parallel": {"embedding_optimizer": "sgd", "embedding_lr": 0.1},
    "train": {"epochs": 3, "lr": 0.002, "warmup_steps": 2, "log_every": 5, "eval_every_epochs": 0},
    "checkpoint": {"every_steps": 30},  # an incremental export every epoch of 30 steps
}
# measured (seed 0, 90 steps): valid AUC dense 0.754, managed 0.743, hash 0.742; test AUC ~0.70-0.72
AUC_FLOOR = 0.66


def _raw(tmp, mode: str, **data):
    return {**FT, "run_dir": str(tmp / f"ft-{mode}"),
            "data": {**FT["data"], "cache_dir": str(tmp / "cache"), **data},
            "model": {**FT["model"], "embedding": {**FT["model"]["embedding"], "id_mode": mode}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pinfm_rec.spec import from_dict
    from pinfm_rec.train.finetune import FinetuneSpec, finetune

    tmp = tmp_path_factory.mktemp("rawft")
    out = {"tmp": tmp}
    for mode in ("managed", "hash"):
        spec = from_dict(FinetuneSpec, _raw(tmp, mode))
        out[mode] = {"spec": spec, "dir": spec.run_dir, "results": finetune(spec, force_cpu=True)}
    out["root"] = glob.glob(str(tmp / "cache" / "ranking-*"))[0]
    return out


def test_ranking_loader_emits_raw_ids(runs):
    from pinfm_rec.data.ranking import build_ranking_loader, prepare_ranking, read_item_map
    from pinfm_rec.data.ranking_store import load_ranking_store

    spec = runs["managed"]["spec"]
    info = prepare_ranking(spec.data)
    raw = read_item_map(info.root)
    assert raw.dtype == np.int64 and raw[0] == OFFSET and raw[5] == OFFSET + 5 * 7919
    np.testing.assert_array_equal(info.item_raw_ids, raw)
    batch = next(iter(build_ranking_loader(spec.data, info, "valid")))
    st = load_ranking_store(info.root).tables
    reqs = batch.request_ids.numpy()
    hist = batch.history.features["item_id"].values().numpy()
    assert hist.min() >= OFFSET and batch.cand_item.min() >= OFFSET  # beyond float32's exact range (2**24)
    # the raw ids are the item map of the stored dense ids, request by request
    c0, c1 = st.cand_offsets[reqs[0]], st.cand_offsets[reqs[0] + 1]
    np.testing.assert_array_equal(batch.cand_item.numpy()[: c1 - c0], raw[st.cand_item[c0:c1]])
    h_end = st.hist_offsets[reqs[0] + 1]
    n0 = int(batch.history.features["item_id"].lengths()[0])
    np.testing.assert_array_equal(hist[:n0], raw[st.hist_item[h_end - n0:h_end]])


@pytest.mark.parametrize("mode", ["managed", "hash"])
def test_finetune_on_raw_ids_learns(runs, mode):
    res = runs[mode]["results"]
    assert res["steps"] == 90
    for k in ("valid_auc", "valid_gauc", "test_auc", "test_gauc"):
        assert np.isfinite(res[k]) and res[k] > AUC_FLOOR, (k, res[k])
    losses = [p["train/loss"] for p in res["perf"] if "train/loss" in p]
    assert losses[-1] < losses[0] - 0.05, losses


def test_managed_tables_hold_raw_ids(runs):
    """The managed encoder's slots hold the raw ids of the data (all >= 2**40), never their dense ids."""
    from pinfm_rec.model.managed import slot_ids
    from pinfm_rec.serve.model_io import load_finetuned

    loaded = load_finetuned(runs["managed"]["dir"])
    raw, slot = slot_ids(loaded.model)
    ids = set((OFFSET + np.arange(600) * 7919).tolist())
    assert raw.numel() > 300 and set(raw.tolist()) <= ids  # exact int64 ids (no float rounding)
    assert slot.unique().numel() == slot.numel()


@pytest.mark.parametrize("mode", ["managed", "hash"])
def test_delta_chain_equals_final_checkpoint(runs, mode):
    from pinfm_rec.serve.model_io import load_finetuned
    from pinfm_rec.train.delta_export import chain_sizes, load_chain

    run = runs[mode]["dir"]
    sizes = chain_sizes(os.path.join(run, "deltas"))
    assert list(sizes) == ["base", "delta-000000060", "delta-000000090"]  # base at step 30 (the first checkpoint)
    assert all(b < sizes["base"] for k, b in sizes.items() if k != "base")
    chained = load_chain(os.path.join(run, "deltas"))
    final = load_finetuned(run).model.state_dict()
    assert set(final) <= set(chained)
    for k, v in final.items():
        torch.testing.assert_close(chained[k], v, msg=k, rtol=0, atol=0)
    # the ranker's own tables are exported as rows (not whole in every delta)
    delta = torch.load(sorted(glob.glob(os.path.join(run, "deltas", "delta-*", "state.pt")))[-1], weights_only=False)
    assert any("embedding_bags.t_r_cand" in k for k in delta["rows"])




@pytest.mark.parametrize("mode", ["managed", "hash"])
def test_score_raw_id_requests_equals_training_forward(runs, mode, tmp_path):
    from pinfm_rec.cli import main
    from pinfm_rec.serve.model_io import load_finetuned

    run = runs[mode]
    req, out = str(tmp_path / "req.parquet"), str(tmp_path / "scores.parquet")
    assert main(["score", "--run", run["dir"], "--make-input", "test", "--input", req, "--output", out,
                 "--cpu", "--batch-requests", "16"]) == 0
    items = [i for row in pq.read_table(req).column("cand_item").to_pylist() for i in row]
    assert min(items) >= OFFSET  # the request file carries raw ids
    got = pq.read_table(out).to_pydict()
    assert got["item_id"] == items
    ref = training_logits(run["spec"], load_finetuned(run["dir"]).checkpoint)
    theirs = np.array([ref[(r, j)] for r, j in zip(got["request_id"], got["cand_index"])])
    np.testing.assert_allclose(np.array(got["logit"]), theirs, atol=1e-5, rtol=1e-5)


def test_score_checks_request_ids(runs, tmp_path):
    import pyarrow as pa

    from pinfm_rec.cli import main
    from pinfm_rec.serve.model_io import load_finetuned
    from pinfm_rec.serve.requests_io import RequestFile, write_request_file

    req = str(tmp_path / "req.parquet")
    write_request_file(runs["root"], "test", req, max_requests=5, raw_ids=True)
    t = pq.read_table(req)
    cand = t.column("cand_item").to_pylist()
    cand[3][1] = -7
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(t.set_column(t.column_names.index("cand_item"), "cand_item", pa.array(cand, pa.list_(pa.int64()))),
                   bad)
    loaded = load_finetuned(runs["managed"]["dir"])
    rule = loaded.item_id_rule()
    assert rule[0] == 2**62 and "raw" in rule[1]
    with pytest.raises(DataError, match=r"bad.parquet: row 3 .*cand_item id -7"):
        RequestFile(bad, loaded.num_dense).check_item_ids(*rule)
    RequestFile(req, loaded.num_dense).check_item_ids(*rule)  # raw ids pass
    assert main(["score", "--run", runs["managed"]["dir"], "--input", bad, "--output",
                 str(tmp_path / "s.parquet"), "--cpu"]) == 2  # one line, exit 2
    # an id never seen in training is scored (the unknown-item row), not refused
    cand = t.column("cand_item").to_pylist()
    cand[0][0] = 2**61 + 12345
    new = str(tmp_path / "new.parquet")
    pq.write_table(t.set_column(t.column_names.index("cand_item"), "cand_item", pa.array(cand, pa.list_(pa.int64()))),
                   new)
    out = str(tmp_path / "new-scores.parquet")
    assert main(["score", "--run", runs["managed"]["dir"], "--input", new, "--output", out, "--cpu"]) == 0
    assert np.isfinite(pq.read_table(out).column("logit").to_numpy()).all()


# ---- spec and data checks (no training) ----

def _load(tmp, **over):
    from pinfm_rec.spec import load_spec
    from pinfm_rec.train.finetune import FinetuneSpec

    base = [f"run_dir={tmp}/x", "data.raw_ids=true", "parallel.embedding_optimizer=sgd"]
    return load_spec(FinetuneSpec, "specs/finetune/synthetic-tiny.yaml", base + [f"{k}={v}" for k, v in over.items()])


def test_spec_rejects_raw_ids_with_dense_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(SpecError, match=r"key 'data.raw_ids'.*model.embedding.id_mode=managed"):
        _load(tmp_path)  # synthetic-tiny's encoder has id_mode error
    assert _load(tmp_path, **{"model.embedding.id_mode": "managed"}).data.raw_ids
    assert _load(tmp_path, **{"encoder.init": "none"}).data.raw_ids  # the ranker alone hashes
    with pytest.raises(SpecError, match=r"key 'encoder.unseen_items'"):
        _load(tmp_path, **{"model.embedding.id_mode": "hash", "encoder.unseen_items": "zero"})
    with pytest.raises(SpecError, match=r"key 'data.synthetic.raw_id_offset'.*input_hash_size 1000000"):
        _load(tmp_path, **{"model.embedding.id_mode": "managed", "model.embedding.managed.input_hash_size": 10**6,
                           "data.synthetic.raw_id_offset": 2**40})
    # fine-tuning from a checkpoint: its model's id mode decides
    ckpt = tmp_path / "enc"
    ckpt.mkdir()
    (ckpt / "spec.yaml").write_text("model:\n  embedding: {id_mode: error}\n  trunk: {max_len: 50}\n")
    with pytest.raises(SpecError, match=r"key 'data.raw_ids'.*encoder.checkpoint"):
        _load(tmp_path, **{"model.embedding.id_mode": "managed", "encoder.init": "pretrained",
                           "encoder.checkpoint": str(ckpt)})


def test_stored_out_of_range_ids_name_file_and_row(tmp_path):
    import pyarrow as pa

    from pinfm_rec.data.ranking_store import CANDIDATES_FILE, REQUESTS_FILE, load_ranking_store
    from pinfm_rec.data.ranking_synthetic import write_synthetic_ranking

    root = str(tmp_path / "r")
    write_synthetic_ranking(root, num_requests=60, num_items=50, mean_len=10, progress=False, raw_id_offset=OFFSET)
    load_ranking_store(root)
    path = os.path.join(root, CANDIDATES_FILE)
    t = pq.read_table(path)
    items = t.column("item_id").to_numpy().copy()
    items[17] = OFFSET + 3  # a raw id where a dense row number belongs
    pq.write_table(t.set_column(t.column_names.index("item_id"), "item_id", pa.array(items)), path)
    os.utime(os.path.join(root, REQUESTS_FILE))  # the store cache keys on this file's mtime
    with pytest.raises(DataError, match=rf"candidates.parquet: row 17: item_id {OFFSET + 3} outside .*\[0, 50\)"):
        load_ranking_store(root)
    items[17] = 0
    pq.write_table(t.set_column(t.column_names.index("item_id"), "item_id", pa.array(items)), path)
    req = pq.read_table(os.path.join(root, REQUESTS_FILE))
    hist = req.column("hist_item").to_pylist()
    hist[4][0] = -1
    pq.write_table(req.set_column(req.column_names.index("hist_item"), "hist_item",
                                  pa.array(hist, pa.list_(pa.int64()))), os.path.join(root, REQUESTS_FILE))
    with pytest.raises(DataError, match=r"requests.parquet: row 4: hist_item -1"):
        load_ranking_store(root)


@pytest.mark.slow
def test_two_rank_managed_raw_id_finetune_exports_and_serves(tmp_path):
    """2 gloo ranks (torchrun): fine-tune on raw ids with the managed item table sharded row_wise
    (2 buckets), an incremental export every 5 steps. Its chain (gathered on rank 0) equals the final
    checkpoint loaded unsharded for serving, where the two ranks' slot states are re-sorted into one:
    every raw id admitted on either rank keeps its slot; `pinfm score` works on raw-id requests."""
    import subprocess
    import sys

    from torchrec.modules.mc_modules import MCHManagedCollisionModule
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from pinfm_rec.cli import main
    from pinfm_rec.model.id_mix import mix, unmix
    from pinfm_rec.model.managed import EMPTY_SLOT, slot_ids
    from pinfm_rec.serve.model_io import load_finetuned
    from pinfm_rec.train.delta_export import load_chain

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "pinfm_rec.cli", "finetune", "--cpu", "--spec", "specs/finetune/synthetic-tiny.yaml", f"run_dir={run}",
           f"data.cache_dir={tmp_path / 'cache'}", "data.raw_ids=true", f"data.synthetic.raw_id_offset={OFFSET}",
           "data.synthetic.num_requests=800", "data.max_len=30", "model.trunk.max_len=30",
           "model.embedding.id_mode=managed", "model.embedding.item.num_embeddings=512",
           # the default input_hash_size 2**62 and id_hash=mix: the ids 2**40 + k * 7919 (all in rank 0's
           # half of [0, 2**62) as they are) are spread over both ranks
           "parallel.embedding_optimizer=sgd", "parallel.embedding_lr=0.1", "encoder.kernel=pytorch",
           "train.epochs=2", "checkpoint.every_steps=5", "delta_export=true", "parallel.timeout_s=120",
           "tensorboard=false"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    chained = load_chain(str(run / "deltas"))
    loaded = load_finetuned(str(run))
    final = loaded.model.state_dict()
    mch_keys = [k for k in final if "._mch_" in k]
    assert mch_keys
    for k, v in final.items():
        if k not in mch_keys:
            torch.testing.assert_close(chained[k], v, msg=k, rtol=0, atol=0)
    pre = next(k[: -len("_mch_sorted_raw_ids")] for k in mch_keys if k.endswith("_mch_sorted_raw_ids"))
    raw_c, slot_c = chained[pre + "_mch_sorted_raw_ids"], chained[pre + "_mch_remapped_ids_mapping"]
    keep = raw_c != EMPTY_SLOT
    want = dict(zip(unmix(raw_c[keep], 62).tolist(), slot_c[keep].tolist()))  # the slot state holds mixed ids
    assert len(want) > 200 and min(want) >= OFFSET and max(want) < OFFSET + 600 * 7919
    # both ranks' slots hold raw ids, about equally: of the 600 catalogue ids 312 / 288 route to rank 0 / 1
    # (binomial: 300 +- 12), each rank has 255 slots for ids; measured 255 / 223 admitted (rank 0 full,
    # not every id trains). 40-60% leaves room for ~4 sd; unmixed, all would route to rank 0
    on_rank0 = sum(s < 256 for s in want.values())
    print(f"2-rank managed fine-tune: rank 0 holds {on_rank0} of the {len(want)} admitted raw ids")
    assert 0.4 * len(want) <= on_rank0 <= 0.6 * len(want), (on_rank0, len(want))
    # per rank the raw ids were sorted; concatenated they are not, until served (resort_slots)
    assert not bool((raw_c[1:] >= raw_c[:-1]).all())
    raw_l, slot_l = slot_ids(loaded.model)
    assert dict(zip(raw_l.tolist(), slot_l.tolist())) == want
    mch = next(m for m in loaded.model.modules() if isinstance(m, MCHManagedCollisionModule))
    ids = torch.tensor(sorted(want) + [OFFSET + 7919 * 10**6 + 1])  # + a raw id never admitted
    got = mch.remap({"f": JaggedTensor(values=mix(ids, 62), lengths=torch.tensor([ids.numel()]))})["f"].values()
    assert got[:-1].tolist() == [want[i] for i in sorted(want)] and int(got[-1]) == 511  # the unknown row
    res = tmp_path / "scores.parquet"
    assert main(["score", "--run", str(run), "--make-input", "test", "--input", str(tmp_path / "req.parquet"),
                 "--output", str(res), "--cpu"]) == 0
    logits = pq.read_table(res).column("logit").to_numpy()
    assert logits.size > 100 and np.isfinite(logits).all()
