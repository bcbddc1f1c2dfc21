"""The `pinfm` console on real (tiny) runs, as a user sees it in a subprocess: the default output fits
one screen while the log file holds everything (on the CPU, `--cpu`, also on a GPU host: the
expected lines name the CPU device and plan); `pinfm eval` scores both kinds of run (pretraining:
HR/NDCG, fine-tuning: AUC/GAUC) and reproduces the metrics the run itself reported."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRE = "specs/pretrain/synthetic-tiny.yaml"
FT = "specs/finetune/synthetic-tiny.yaml"
PRE_SMALL = ["data.synthetic.num_users=400", "data.synthetic.num_items=300", "data.synthetic.mean_len=30",
             "data.max_len=30", "model.trunk.max_len=30", "data.batch_size=32", "train.log_every=5",
             "train.epochs=2", "checkpoint.every_steps=0"]
FT_SMALL = ["data.synthetic.num_requests=300", "train.epochs=1", "train.log_every=5"]
SCREEN_LINES, SCREEN_COLS = 30, 120


def _pinfm(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pinfm_rec.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _ok(out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _json_tail(stdout: str) -> dict:
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):]))


def _same_metrics(evaluated: dict, results: dict, names):
    for k in names:
        assert evaluated[k] == pytest.approx(results[k], abs=1e-5), (k, evaluated[k], results[k])


@pytest.mark.slow
def test_pretrain_output_fits_one_screen_and_eval_reproduces_it(tmp_path):
    run = tmp_path / "run"
    out = _pinfm("pretrain", "--cpu", "--spec", PRE, f"run_dir={run}", f"data.cache_dir={tmp_path}/cache", *PRE_SMALL)
    stdout = _ok(out)
    lines = stdout.splitlines()
    assert out.stderr.strip() == "", out.stderr[-3000:]
    assert len(lines) <= SCREEN_LINES, stdout
    assert max(len(l) for l in lines if str(run) not in l) <= SCREEN_COLS, stdout  # paths aside
    assert lines[0] == f"pinfm pretrain: spec {PRE} -> {run}/ (log: log.txt)"
    assert any(l.startswith("device cpu (gloo), world size 1; sharding plan:") for l in lines)
    assert any(l.split()[:2] == ["t_item", "row_wise"] for l in lines), stdout
    assert any(l.startswith("epoch 1/2 valid: hr@10 ") for l in lines), stdout
    assert any(l.startswith("train: ") and " loss " in l and " ex/s " in l for l in lines), stdout
    table = [l.split() for l in lines if l.split()[:1] in (["hr@10"], ["ndcg@10"])]
    res = json.load(open(run / "results.json"))
    assert [float(x) for x in table[0][1:]] == pytest.approx([res["valid_hr@10"], res["test_hr@10"]], abs=1e-4)
    for noise in ("planner.stats", "TBE=", "Warning", "resolved spec"):
        assert noise not in stdout, noise
    log = open(run / "log.txt").read()
    for text in ("torchrec.distributed.planner.stats", "TBE=", "py.warnings", "resolved spec", "final {"):
        assert text in log, text
    plan = json.load(open(run / "plan.json"))
    assert {t["table"]: t["sharding_type"] for t in plan["tables"]} == {
        "t_item": "row_wise", "t_action": "table_wise", "t_surface": "table_wise"}
    assert (run / "plan.txt").read_text().startswith("sharding plan, world size 1")

    # eval from the run dir alone (its spec.yaml): the newest checkpoint is the final model
    ev = _ok(_pinfm("eval", "--spec", str(run), "--cpu", "--json"))
    assert ev.splitlines()[0].startswith("pinfm eval (pretrain run): spec ")
    got = _json_tail(ev)
    _same_metrics(got, res, ["valid_hr@10", "valid_ndcg@10", "test_hr@10", "test_ndcg@200"])
    assert "valid_auc" not in got
    assert sorted(os.listdir(run / "checkpoints"))[-1] in got["checkpoint"]

    # a run whose tables trained with adam (GPU only) is evaluated on a CPU host as it is: the
    # evaluation-only build takes sgd for the never-stepped table optimizer
    adam = _json_tail(_ok(_pinfm("eval", "--spec", str(run), "--cpu", "--json", "parallel.embedding_optimizer=adam")))
    _same_metrics(adam, got, ["valid_hr@10", "test_hr@10", "test_ndcg@200"])

    verbose = _ok(_pinfm("eval", "--spec", str(run), "--cpu", "--verbose"))
    assert "torchrec.distributed.planner.stats" in verbose and "resolved spec" in verbose


@pytest.mark.slow
def test_eval_of_a_finetune_run_gives_ranking_metrics(tmp_path):
    run = tmp_path / "ft"
    out = _pinfm("finetune", "--spec", FT, f"run_dir={run}", f"data.cache_dir={tmp_path}/cache", "--cpu", *FT_SMALL)
    stdout = _ok(out)
    assert len(stdout.splitlines()) <= SCREEN_LINES, stdout
    assert any(l.split()[:1] == ["gauc"] for l in stdout.splitlines()), stdout
    res = json.load(open(run / "results.json"))
    ev = _ok(_pinfm("eval", "--spec", str(run / "spec.yaml"), "--cpu", "--json"))
    assert ev.splitlines()[0].startswith("pinfm eval (finetune run): spec ")
    got = _json_tail(ev)
    _same_metrics(got, res, ["valid_auc", "valid_gauc", "test_auc", "test_gauc", "test_logloss"])
    assert "valid_hr@10" not in got
