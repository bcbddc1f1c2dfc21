"""Exact resume: a run resumed from ANY of its checkpoints (mid-epoch or end of epoch) ends with
the metrics of the uninterrupted run, bit for bit, on 1 and 2 gloo ranks.

The interruption is simulated the way a kill -9 leaves a run: a fresh run dir holding only the
chosen checkpoint of the reference run (and its RUN_ID), then the same spec resumes from it.
"""
import json
import os
import shutil
import socket

import pytest
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "specs", "pretrain", "synthetic-tiny.yaml")
SMALL = ["data.synthetic.num_users=240", "data.synthetic.num_items=120", "data.synthetic.mean_len=16",
         "data.max_len=16", "model.trunk.max_len=16", "data.batch_size=32", "data.eval_batch_size=128",
         "model.trunk.n_layers=1", "train.log_every=4", "train.warmup_steps=2", "train.epochs=2",
         "checkpoint.every_steps=5", "checkpoint.keep_last=100", "tensorboard=false"]
METRICS = ("test_hr@10", "test_ndcg@10", "test_hr@50", "valid_ndcg@10")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain(run_dir: str, cache: str, extra=()):
    from pinfm_rec.spec import load_spec
    from pinfm_rec.train.pretrain import PretrainSpec, pretrain

    spec = load_spec(PretrainSpec, TINY, SMALL + [f"run_dir={run_dir}", f"data.cache_dir={cache}", *extra])
    return pretrain(spec, force_cpu=True)


def _checkpoints(run_dir: str) -> list:
    ck = os.path.join(run_dir, "checkpoints")
    out = []
    for name in sorted(os.listdir(ck)):
        if name.startswith("step_"):
            ts = json.load(open(os.path.join(ck, name, "train_state.json")))
            out.append((ts["step"], ts["epoch"], name))
    return out


def _scenario(tmp: str, rank: int) -> dict:
    """Reference run, then one resumed run per chosen checkpoint; returns their results (rank 0)."""
    ref_dir = os.path.join(tmp, "ref")
    out = {"ref": _pretrain(ref_dir, os.path.join(tmp, "cache"))}
    cks = _checkpoints(ref_dir)
    steps_per_epoch = out["ref"]["steps"] // 2
    # an end-of-epoch checkpoint (epoch counter advanced, no loader position) and a mid-epoch one
    end = next(c for c in cks if c[0] == steps_per_epoch and c[1] == 1)
    mid = next(c for c in cks if c[0] % steps_per_epoch)
    for label, (step, _, name) in (("epoch_end", end), ("mid_epoch", mid)):
        run = os.path.join(tmp, label)
        if rank == 0:
            os.makedirs(os.path.join(run, "checkpoints"))
            src = os.path.join(ref_dir, "checkpoints")
            shutil.copytree(os.path.join(src, name), os.path.join(run, "checkpoints", name))
            shutil.copy(os.path.join(src, "RUN_ID"), os.path.join(run, "checkpoints", "RUN_ID"))
        out[label] = _pretrain(run, os.path.join(tmp, "cache"))
        out[label]["resumed_step"] = step
    return out


def _check(out: dict) -> None:
    ref = out["ref"]
    for label in ("epoch_end", "mid_epoch"):
        res = out[label]
        assert res["steps"] == ref["steps"]
        assert res["perf"][0]["step"] > res["resumed_step"]  # it did resume, not retrain
        for k in METRICS:
            assert res[k] == ref[k], (label, k, res[k], ref[k])
        assert [h["valid_ndcg@10"] for h in res["history"]] == [h["valid_ndcg@10"] for h in ref["history"]]


def test_resume_from_any_checkpoint_is_exact_one_rank(tmp_path):
    _check(_scenario(str(tmp_path), 0))


def _worker(rank: int, world: int, ports: list, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    import pinfm_rec.train.pretrain as pre

    calls = iter(ports)
    real = pre.PretrainRecipe.run

    def run(self):  # every run of the scenario gets a fresh rendezvous port
        os.environ["MASTER_PORT"] = str(next(calls))
        return real(self)

    pre.PretrainRecipe.run = run
    out = _scenario(tmp, rank)
    # a live run (here: the test process, spawn's parent) holds the ref dir: rank 0 finds the lock,
    # rank 1 learns it by broadcast; both refuse before any work
    from pinfm_rec.errors import RunDirLockedError
    from pinfm_rec.train import rundir

    if rank == 0:
        with open(os.path.join(tmp, "ref", rundir.LOCK_NAME), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getppid(), "since": "then", "token": "t"}, f)
    try:
        _pretrain(os.path.join(tmp, "ref"), os.path.join(tmp, "cache"))
        out["locked"] = "not refused"
    except RunDirLockedError as e:
        out["locked"] = str(e)
    if rank == 1:
        with open(os.path.join(tmp, "locked_rank1.txt"), "w") as f:
            f.write(out["locked"])
    if rank == 0:
        with open(os.path.join(tmp, "out.json"), "w") as f:
            json.dump({k: r if isinstance(r, str) else {m: v for m, v in r.items() if m != "perf"}
                       | {"perf": r["perf"][:1]} for k, r in out.items()}, f)


@pytest.mark.slow
def test_resume_from_any_checkpoint_is_exact_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(2, [_free_port() for _ in range(4)], str(tmp_path)), nprocs=2, join=True)
    out = json.load(open(tmp_path / "out.json"))
    _check(out)
    for msg in (out["locked"], (tmp_path / "locked_rank1.txt").read_text()):
        assert f"in use by another run (host {socket.gethostname()}, pid {os.getpid()}, since then" in msg, msg
