"""SIGINT/SIGTERM stop a run cleanly (step finished, checkpoint written, exit 128+signal, one line);
a torchrun restart of a killed rank resumes; TensorBoard has no duplicate points after a resume."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pinfm_rec.errors import Preempted
from pinfm_rec.train.preempt import PreemptionGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "specs/pretrain/synthetic-tiny.yaml"
SMALL = ["data.synthetic.num_users=400", "data.synthetic.num_items=200", "data.synthetic.mean_len=20",
         "data.max_len=20", "model.trunk.max_len=20", "data.batch_size=16", "model.trunk.n_layers=1",
         "train.log_every=5", "train.eval_every_epochs=0", "checkpoint.every_steps=4", "checkpoint.keep_last=3",
         "train.epochs=6"]  # long enough that SIGTERM lands mid-training even on a loaded host


def test_guard_sets_a_flag_then_a_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as g:
        os.kill(os.getpid(), signal.SIGTERM)
        assert g.signum == signal.SIGTERM and g.agreed(None) == signal.SIGTERM
        with pytest.raises(Preempted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_tensorboard_resume_drops_the_interrupted_attempts_points(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pinfm_rec.train.tblog import TBLogger

    tb = TBLogger(str(tmp_path))
    for step in range(10):
        tb.scalars({"train/loss": 1.0}, step)
    tb.close()
    time.sleep(1.1)  # event files are named by the second
    tb = TBLogger(str(tmp_path), purge_step=6)  # resumed from a checkpoint at step 6
    for step in range(6, 12):
        tb.scalars({"train/loss": 2.0}, step)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == list(range(12))
    assert [e.value for e in events] == [1.0] * 6 + [2.0] * 6


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _cmd(tmp, run="run"):
    return [sys.executable, "-m", "pinfm_rec.cli", "pretrain", "--cpu", "--spec", SPEC, f"run_dir={tmp}/{run}",
            f"data.cache_dir={tmp}/cache"] + SMALL


def _wait_for(path, proc, log, limit=300):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, open(log).read()[-3000:]
        assert time.time() - t0 < limit
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_exits_143_and_resumes_exactly(tmp_path):
    ref = subprocess.run(_cmd(tmp_path, "ref"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    ref_res = json.load(open(tmp_path / "ref" / "results.json"))

    log = str(tmp_path / "first.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(tmp_path), cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        _wait_for(tmp_path / "run" / "checkpoints" / "step_00000004" / "COMPLETE", proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 143, open(log).read()[-3000:]
    text = open(log).read()
    lines = [line for line in text.splitlines() if line.startswith("pinfm: preempted:")]
    assert len(lines) == 1 and "SIGTERM received: stopped after step" in lines[0], text[-3000:]
    assert "Traceback" not in text
    step = int(lines[0].split("stopped after step ")[1].split(",")[0])
    assert step >= 4
    ck = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
    assert (ck / "COMPLETE").exists() and json.load(open(ck / "train_state.json"))["step"] == step
    assert not (tmp_path / "run" / "RUN.lock").exists()  # released on the way out
    assert not (tmp_path / "run" / "results.json").exists()

    again = subprocess.run(_cmd(tmp_path), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {ck} (step {step}," in again.stdout
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert res["steps"] == ref_res["steps"]
    for k in ("test_hr@10", "test_ndcg@10", "valid_hr@10"):
        assert res[k] == ref_res[k], (k, res[k], ref_res[k])


def _children(pid: int) -> list:
    out = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        out += [int(c) for c in open(task).read().split()]
    return out


@pytest.mark.slow
def test_torchrun_restart_of_a_killed_rank_resumes(tmp_path):
    # the restarted attempt forms a new gloo group although torchrun keeps one store across attempts
    # (pinfm_rec/elastic.py; this test failed now and then before that, with "Connection refused")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "-m", "pinfm_rec.cli", "pretrain", "--cpu", "--spec", SPEC, f"run_dir={tmp_path}/run",
           f"data.cache_dir={tmp_path}/cache", "parallel.timeout_s=60"] + SMALL
    log = str(tmp_path / "torchrun.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        _wait_for(tmp_path / "run" / "checkpoints" / "step_00000004" / "COMPLETE", proc, log)
        workers = [p for p in _children(proc.pid) if "pinfm_rec.cli" in open(f"/proc/{p}/cmdline").read()]
        ranks = {int(dict(kv.split("=", 1) for kv in open(f"/proc/{p}/environ").read().split("\0")
                          if "=" in kv)["RANK"]): p for p in workers}
        os.kill(ranks[1], signal.SIGKILL)  # a rank dies (OOM killer, hardware)
        assert proc.wait(timeout=600) == 0, open(log).read()[-4000:]
    text = open(log).read()
    resumed = [line for line in text.splitlines() if "resumed from" in line]
    assert resumed, text[-4000:]
    assert int(resumed[0].split("(step ")[1].split(",")[0]) >= 4
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert res["world_size"] == 2 and res["perf"][0]["step"] > 4
    total = json.load(open(sorted(glob.glob(str(tmp_path / "run" / "checkpoints" / "step_*")))[-1]
                           + "/train_state.json"))["step"]
    assert res["steps"] == total
