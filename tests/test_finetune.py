"""Fine-tuning: dedup == flat (loss + gradients) through the ranker, a 2-rank pretraining checkpoint
loaded on 1 rank gives the 2-rank encoder output, and a tiny end-to-end finetune learns."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pinfm_rec.data.ranking import RankingDataSpec, SyntheticRankingSpec, prepare_ranking
from pinfm_rec.data.ranking_batch import flatten_batch, random_ranking_batch
from pinfm_rec.model.embedding import EmbeddingSpec
from pinfm_rec.model.encoder import EncoderSpec, PinFMEncoder
from pinfm_rec.model.pinfm import ModelSpec
from pinfm_rec.model.trunk import TrunkSpec
from pinfm_rec.rankers.dlrm import RankerSpec, RankerWithEncoder, build_ranker, ranker_features

NUM_ITEMS = 40


def _model(seed: int, with_encoder: bool = True, arch: str = "dlrm") -> RankerWithEncoder:
    torch.manual_seed(seed)
    enc = None
    if with_encoder:
        ms = ModelSpec(embedding=EmbeddingSpec(dim=16),
                       trunk=TrunkSpec(d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_len=16))
        enc = PinFMEncoder(ms, EncoderSpec(kernel="pytorch", out_dim=8),
                            dict(num_items=NUM_ITEMS, num_actions=4, num_surfaces=3), device="cpu")
    rs = RankerSpec(arch=arch, embedding_dim=8, dense_arch=[16, 8], over_arch=[16, 1], history_bag_len=5)
    ranker = build_ranker(rs, NUM_ITEMS, 2 + (8 if with_encoder else 0), device="cpu")
    return RankerWithEncoder(ranker, enc, rs.history_bag_len).eval()


def test_ranker_features_expand_history_per_candidate():
    b = random_ranking_batch(torch.Generator().manual_seed(0), [3, 0, 8], [2, 1, 2], num_items=NUM_ITEMS)
    kjt = ranker_features(b, history_bag_len=5)
    hist = b.history.features["item_id"].values()
    assert kjt["r_cand_item"].values().tolist() == b.cand_item.tolist()
    assert kjt["r_hist_items"].lengths().tolist() == [3, 3, 0, 5, 5]
    assert kjt["r_hist_items"].values().tolist() == hist[:3].tolist() * 2 + hist[6:11].tolist() * 2


@pytest.mark.parametrize("arch", ["dlrm", "dlrm_dcn"])
def test_dedup_batch_equals_flat_batch_loss_and_grads(arch):
    """The same candidates as a request-deduplicated batch (DCAT) and as flat rows (history copied
    per candidate, full forward): same loss, same gradients for every parameter and table."""
    b = random_ranking_batch(torch.Generator().manual_seed(1), [4, 0, 9, 16], [3, 2, 0, 5], num_items=NUM_ITEMS)
    res = {}
    for layout in ("dedup", "flat"):
        m = _model(7, arch=arch)
        m.mode = "dcat" if layout == "dedup" else "flat"
        batch = b if layout == "dedup" else flatten_batch(b)
        out = m(batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        res[layout] = (out["loss"].detach(), grads)
    torch.testing.assert_close(res["dedup"][0], res["flat"][0], atol=1e-6, rtol=1e-5)
    g_d, g_f = res["dedup"][1], res["flat"][1]
    assert g_d.keys() == g_f.keys()
    assert any("encoder.fm.ec" in n for n in g_d) and any("ranker.sparse_arch" in n for n in g_d)
    for n in g_d:
        torch.testing.assert_close(g_d[n], g_f[n], atol=1e-5, rtol=1e-4, msg=n)
    assert sum(float(g.abs().sum()) for g in g_d.values()) > 0


def test_ranker_alone_and_frozen_encoder():
    b = random_ranking_batch(torch.Generator().manual_seed(2), [4, 6], [3, 2], num_items=NUM_ITEMS)
    alone = _model(0, with_encoder=False)
    assert alone(b)["loss"].ndim == 0
    m = _model(0)
    m.freeze_encoder = True
    m(b)["loss"].backward()
    assert m.encoder.fm.trunk.layers[0].qkv.weight.grad is None if hasattr(m.encoder.fm.trunk.layers[0], "qkv") \
        else all(p.grad is None for p in m.encoder.fm.trunk.parameters())
    assert m.encoder.proj.weight.grad is not None and m.encoder.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- 2 ranks -> 1 rank checkpoint

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ft_spec(tmp: str, ckpt: str):
    from pinfm_rec.train.finetune import FinetuneSpec

    spec = FinetuneSpec()
    spec.data = _ranking_spec(tmp)
    spec.encoder = EncoderSpec(init="pretrained", checkpoint=ckpt, out_dim=8, kernel="pytorch")
    spec.ranker = RankerSpec(embedding_dim=8, dense_arch=[16, 8], over_arch=[16, 1], history_bag_len=5)
    spec.run_dir = os.path.join(tmp, "ft")
    return spec


def _ranking_spec(tmp: str) -> RankingDataSpec:
    return RankingDataSpec(source="synthetic", cache_dir=os.path.join(tmp, "cache"), max_len=20, batch_size=16,
                           synthetic=SyntheticRankingSpec(num_requests=300, num_items=120, mean_len=15,
                                                          candidates_next=3, negatives_per_request=5))


def _encoder_output(spec, batch_seed: int):
    """Build the finetune model (collective), return encoder features + user vectors on a fixed batch."""
    from pinfm_rec.parallel import init_distributed
    from pinfm_rec.train.finetune import build_finetune

    env = init_distributed(spec.parallel, force_cpu=True)
    b = build_finetune(spec, env)
    info = b.info
    batch = random_ranking_batch(torch.Generator().manual_seed(batch_seed), [0, 5, 20, 11], [2, 3, 4, 1],
                                 num_items=info.num_items, num_actions=info.num_actions,
                                 num_surfaces=info.num_surfaces, num_dense=info.num_dense)
    enc = b.model.module.encoder.eval()
    with torch.no_grad():
        feats, user = enc.encode(batch)
    return feats, user


def _worker(rank: int, world: int, port: int, port2: int, tmp: str, pretrain_dir: str, dense: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from pinfm_rec.parallel import shutdown_distributed
    from pinfm_rec.spec import from_dict
    from pinfm_rec.train.pretrain import PretrainSpec, pretrain

    ckpt = os.path.join(tmp, "pre", "encoder")
    if world == 2:
        spec = from_dict(PretrainSpec, {
            "name": "pre", "run_dir": os.path.join(tmp, "pre"), "tensorboard": False,
            "data": {"source": "prepared", "path": pretrain_dir, "max_len": 20, "batch_size": 16,
                     "eval_batch_size": 64, "num_negatives_per_row": 4},
            "model": {"embedding": {"dim": 16, "item": {"sharding": "row_wise"}},
                      "trunk": {"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0, "max_len": 20}},
            "train": {"epochs": 1, "max_steps": 4, "eval_every_epochs": 0, "eval_max_batches": 1},
            "checkpoint": {"every_steps": 0},
            "parallel": {"timeout_s": 120, "dense": dense},
        })
        pretrain(spec, force_cpu=True)
        # a fresh rendezvous port for the second process group: re-using the first one right after
        # destroy_process_group can hang on the old TCPStore
        os.environ["MASTER_PORT"] = str(port2)
    ft = _ft_spec(tmp, ckpt)
    ft.parallel.timeout_s = 120  # a hang fails instead
    ft.parallel.dense = dense
    feats, user = _encoder_output(ft, batch_seed=3)
    if rank == 0:
        torch.save({"feats": feats, "user": user}, os.path.join(tmp, f"out_world{world}.pt"))
    shutdown_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("dense", ["ddp", "fsdp2"])
def test_checkpoint_from_2_ranks_loads_on_1_rank(tmp_path, dense):
    """Pretrain on 2 ranks (dense part in DDP or FSDP2), build the fine-tuning model from its encoder
    on 2 ranks (same dense wrapper) and on 1 rank: the encoder computes the same thing."""
    tmp = str(tmp_path)
    info = prepare_ranking(_ranking_spec(tmp))
    mp.spawn(_worker, args=(2, _free_port(), _free_port(), tmp, info.pretrain_dir, dense), nprocs=2, join=True)
    mp.spawn(_worker, args=(1, _free_port(), _free_port(), tmp, info.pretrain_dir, "ddp"), nprocs=1, join=True)
    two = torch.load(os.path.join(tmp, "out_world2.pt"))
    one = torch.load(os.path.join(tmp, "out_world1.pt"))
    torch.testing.assert_close(one["user"], two["user"], atol=1e-6, rtol=1e-5)
    assert one["user"][1:].abs().sum() > 0  # pretrained user vectors, not zeros
    # the candidate features also go through the (randomly initialised, seeded) projection: equal too
    torch.testing.assert_close(one["feats"], two["feats"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_finetune_cli_end_to_end_learns(tmp_path):
    """`pinfm finetune` on the synthetic spec: DLRM + random-init encoder beats random ranking."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "ft"
    cmd = [sys.executable, "-m", "pinfm_rec.cli", "finetune", "--cpu", "--spec", "specs/finetune/synthetic-tiny.yaml",
           f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "tensorboard=true",
           "data.synthetic.num_requests=800"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["encoder_init"] == "random" and res["steps"] > 0
    assert res["test_gauc"] > 0.65 and res["test_auc"] > 0.65, res
    assert 0 < res["test_logloss"] < 0.69  # better than a constant 0.5 prediction
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())


def test_ranker_ids_checked_or_hashed():
    b = random_ranking_batch(torch.Generator().manual_seed(3), [4, 2], [2, 3], num_items=NUM_ITEMS)
    model = _model(0, with_encoder=False)
    model.ranker_sizes = {"r_cand_item": NUM_ITEMS, "r_hist_items": NUM_ITEMS}
    want = model.logits(b)
    vals = b.history.features["item_id"].values()
    vals[-1] = NUM_ITEMS + 5  # an out-of-range history id, within the last history_bag_len items
    with pytest.raises(ValueError, match=r"r_hist_items.*id 45"):
        model.logits(b)
    model.id_mode = "hash"
    got = model.logits(b)  # hashed: id 45 -> 5, finite and different from the original batch
    assert torch.isfinite(got).all() and not torch.allclose(got, want)
    vals[-1] = 5
    torch.testing.assert_close(got, model.logits(b))


@pytest.mark.slow
def test_finetune_fsdp2_trains_like_ddp(tmp_path):
    """2 gloo ranks, one epoch of `pinfm finetune`: the dense part in FSDP2 (the wrapper walks into
    the ranker and the encoder, which both hold tables) gives the metrics DDP gives."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = {}
    for dense in ("ddp", "fsdp2"):
        run = tmp_path / dense
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pinfm_rec.cli", "finetune", "--cpu", "--spec", "specs/finetune/synthetic-tiny.yaml",
               f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
               "data.synthetic.num_requests=400", f"parallel.dense={dense}", "parallel.timeout_s=120"]
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        res[dense] = json.loads((run / "results.json").read_text())
    assert res["ddp"]["steps"] == res["fsdp2"]["steps"] > 0
    for k in ("valid_auc", "valid_gauc", "valid_logloss", "test_auc", "test_gauc", "test_logloss"):
        assert abs(res["ddp"][k] - res["fsdp2"][k]) < 1e-4, (k, res["ddp"][k], res["fsdp2"][k])
