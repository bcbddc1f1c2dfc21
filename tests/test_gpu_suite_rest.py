"""scripts/gpu/suite_rest.py: which tests a cut `pytest -v` run (xdist or not) did not reach."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("suite_rest", os.path.join(ROOT, "scripts/gpu/suite_rest.py"))
suite_rest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite_rest)

LOG = """\
tests/test_spec.py::test_checked[train.lr=0-train.lr-> 0] 
[gw3] [ 41%] PASSED tests/test_spec.py::test_checked[train.lr=0-train.lr-> 0] 
[gw1] [ 42%] SKIPPED tests/test_data.py::test_real_ml1m 
[gw2] [ 43%] FAILED tests/test_a.py::test_b[x\\\\ny-3-expected 3 fields] 
tests/test_c.py::test_started_never_finished 
tests/test_d.py::test_serial[a b] PASSED                                   [ 50%]
tests/test_e.py::test_one ERROR
tests/test_f.py::test_g 
"""


def test_done_ids_are_whole_node_ids_with_an_outcome():
    done = suite_rest.done_ids(LOG)
    assert done == {"tests/test_spec.py::test_checked[train.lr=0-train.lr-> 0]",
                    "tests/test_data.py::test_real_ml1m",
                    "tests/test_a.py::test_b[x\\\\ny-3-expected 3 fields]",
                    "tests/test_d.py::test_serial[a b]", "tests/test_e.py::test_one"}


def test_rest_runs_only_what_the_log_did_not_name(monkeypatch, tmp_path):
    log = tmp_path / "suite.log"
    log.write_text(LOG)
    ran = []
    monkeypatch.setattr(suite_rest, "collected", lambda args=("tests",): [
        "tests/test_spec.py::test_checked[train.lr=0-train.lr-> 0]", "tests/test_c.py::test_started_never_finished",
        "tests/test_d.py::test_serial[a b]"])
    import pytest
    monkeypatch.setattr(pytest, "main", lambda args: ran.append(args) or 0)
    assert suite_rest.main([str(log), "-n", "4"]) == 0
    assert ran[0][-3:] == ["-n", "4", "tests/test_c.py::test_started_never_finished"]
    ran.clear()
    log.write_text(LOG + "[gw0] [ 99%] PASSED tests/test_c.py::test_started_never_finished \n")
    assert suite_rest.main([str(log)]) == 0 and not ran


def test_failed_ids_are_whole_ids_and_skip_the_summary_lines():
    # the rerun of failures (round.sh suite): whole ids; "-ra" summary lines ("FAILED id - msg")
    # are not read, or the message would become part of an id
    log = LOG + "FAILED tests/test_a.py::test_b[x\\\\ny-3-expected 3 fields] - AssertionError: no\n"
    assert suite_rest.failed_ids(log) == ["tests/test_a.py::test_b[x\\\\ny-3-expected 3 fields]",
                                          "tests/test_e.py::test_one"]
    assert len(suite_rest.done_ids(log)) == 5


def _sweep_wait(tmp_path, seconds, pid=None):
    """Runs round.sh's sweep_wait in a shell whose own command line names ml1m_sweep.sh (as the
    device call that started the sweep did): (exit code, seconds waited)."""
    import subprocess
    import time

    if pid is not None:
        (tmp_path / "sweep.pid").write_text(f"{pid}\n")
    cmd = f". scripts/gpu/sweep_wait.sh; sweep_wait {tmp_path} {seconds} # ml1m_sweep.sh in this command line"
    t0 = time.monotonic()
    rc = subprocess.run(["bash", "-c", cmd], cwd=ROOT).returncode
    return rc, time.monotonic() - t0


def test_sweep_wait_follows_the_sweeps_pid_file_not_command_lines(tmp_path):
    import subprocess

    assert _sweep_wait(tmp_path, 30)[1] < 5  # no sweep: no wait (pgrep -f waited out all 30 s here)
    import threading

    short = subprocess.Popen(["sleep", "2"])
    reaper = threading.Thread(target=short.wait)  # reaped when it ends (a zombie still answers kill -0)
    reaper.start()
    rc, waited = _sweep_wait(tmp_path, 30, short.pid)
    reaper.join()
    assert rc == 0 and 1 <= waited < 10
    assert _sweep_wait(tmp_path, 30)[1] < 5  # a stale pid file (the process is gone): no wait
    long = subprocess.Popen(["sleep", "60"])
    try:
        rc, waited = _sweep_wait(tmp_path, 2, long.pid)
        assert rc == 1 and waited < 10  # still running after the limit
    finally:
        long.kill()


def test_ml1m_sweep_removes_its_pid_file(tmp_path):
    import subprocess

    env = dict(os.environ, OUT=str(tmp_path), SEEDS="42")
    r = subprocess.run(["bash", "scripts/gpu/ml1m_sweep.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "run | valid hr@10" in r.stdout and not (tmp_path / "sweep.pid").exists()
    src = open(os.path.join(ROOT, "scripts/gpu/ml1m_sweep.sh")).read()
    assert 'echo $$ > "$OUT/sweep.pid"' in src
