"""Run directory ownership (lock), resume=false on a previous run, run ids, verified checkpoints."""
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from pinfm_rec.errors import CheckpointError, RunDirLockedError
from pinfm_rec.train import rundir
from pinfm_rec.train.checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_run_id,
)
from pinfm_rec.train.manifest import read_marker, verify


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(run_dir, **holder):
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, rundir.LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"since": "2026-01-01T00:00:00Z", "restart_count": 0, "elastic_run_id": "", **holder}, f)
    return path


def test_second_run_of_a_dir_is_refused_naming_the_holder(tmp_path):
    run = str(tmp_path / "run")
    first = rundir.RunDirLock(run)
    first.acquire()
    holder = json.load(open(first.path))
    assert holder["pid"] == os.getpid() and holder["host"]
    # another process of this host holds it (a live pid: the parent of this test process)
    _write_lock(run, host=holder["host"], pid=os.getppid(), proc_start=rundir._proc_start(os.getppid()), token="x")
    with pytest.raises(RunDirLockedError, match=rf"in use by another run \(host {holder['host']}, "
                       rf"pid {os.getppid()}, since 2026-01-01T00:00:00Z"):
        rundir.RunDirLock(run).acquire()
    first.release()  # not its lock any more: left in place
    assert os.path.exists(first.path)
    os.remove(first.path)
    second = rundir.RunDirLock(run)
    second.acquire()
    second.release()
    assert not os.path.exists(second.path)


def test_stale_locks_are_taken_over(tmp_path, caplog, monkeypatch):
    import socket

    run = str(tmp_path / "run")
    host = socket.gethostname()
    caplog.set_level(logging.WARNING)
    for holder, why in (
        ({"host": host, "pid": _dead_pid()}, "is no longer running"),
        ({"host": host, "pid": os.getppid(), "proc_start": "1"}, "now belongs to another process"),
    ):
        _write_lock(run, **holder)
        lock = rundir.RunDirLock(run)
        lock.acquire()
        assert json.load(open(lock.path))["pid"] == os.getpid()
        assert why in caplog.text
        lock.release()
    # another host: live while refreshed, stale after STALE_AFTER_S without a refresh
    path = _write_lock(run, host="elsewhere", pid=1)
    with pytest.raises(RunDirLockedError, match="host elsewhere, pid 1"):
        rundir.RunDirLock(run).acquire()
    old = time.time() - rundir.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    lock = rundir.RunDirLock(run)
    lock.acquire()
    assert "not refreshed for" in caplog.text
    lock.release()
    # a torchelastic restart of the same job takes over its previous attempt's lock, on any host
    _write_lock(run, host="elsewhere", pid=1, elastic_run_id="job7", restart_count=0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    lock = rundir.RunDirLock(run)
    lock.acquire()
    assert "attempt 0 of this torchelastic job" in caplog.text
    lock.release()


def _previous_run(run):
    os.makedirs(run / "checkpoints" / "step_00000010")
    (run / "results.json").write_text("{}")
    (run / "spec.yaml").write_text("name: old\n")


def test_resume_false_on_a_previous_run_refuses_archives_or_overwrites(tmp_path):
    run = tmp_path / "run"
    ck = str(run / "checkpoints")
    _previous_run(run)
    with pytest.raises(CheckpointError, match=r"holds a previous run \(checkpoints, results\.json\).*"
                       r"checkpoint\.on_existing=archive.*checkpoint\.on_existing=overwrite.*name="):
        rundir.claim(str(run), ck, resume=False, on_existing="error", is_main=True)
    assert not (run / rundir.LOCK_NAME).exists()  # an error releases the lock
    assert (run / "results.json").exists()
    lock, run_id = rundir.claim(str(run), ck, resume=False, on_existing="archive", is_main=True)
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(archived) == 1 and (archived[0] / "checkpoints" / "step_00000010").is_dir()
    assert (archived[0] / "results.json").exists() and not (run / "results.json").exists()
    assert sorted(os.listdir(run)) == ["RUN.lock", "checkpoints"]
    assert open(os.path.join(ck, "RUN_ID")).read().strip() == run_id
    lock.release()
    _previous_run(run)
    lock, run_id2 = rundir.claim(str(run), ck, resume=False, on_existing="overwrite", is_main=True)
    assert run_id2 != run_id and sorted(os.listdir(run)) == ["RUN.lock", "checkpoints"]
    assert os.listdir(ck) == ["RUN_ID"]
    lock.release()
    # resume=true keeps the run id
    lock, run_id3 = rundir.claim(str(run), ck, resume=True, on_existing="error", is_main=True)
    assert run_id3 == run_id2
    lock.release()


def _save(d, step, model, value, run_id, keep_last=2, protect=()):
    with torch.no_grad():
        model.weight.fill_(value)
    return save_checkpoint(str(d), step, model, None, None, {"step": step, "world_size": 1}, "name: t\n", 0,
                           keep_last, run_id=run_id, protect=protect)


def test_pruning_and_latest_only_see_the_current_run(tmp_path):
    model = torch.nn.Linear(2, 2, bias=False)
    set_run_id(str(tmp_path), "old")
    for s in (100, 200):
        _save(tmp_path, s, model, 1.0, "old")
    set_run_id(str(tmp_path), "new")
    _save(tmp_path, 10, model, 2.0, "new", keep_last=1)
    _save(tmp_path, 20, model, 3.0, "new", keep_last=1, protect=(10,))
    _save(tmp_path, 30, model, 4.0, "new", keep_last=1, protect=(10,))
    # the new run's pruning never deleted the old run's (newer) steps; step 10 was protected
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [10, 30, 100, 200]
    assert [s for s, _ in complete_checkpoints(str(tmp_path), "new")] == [10, 30]
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000030")  # not the old run's step 200
    assert latest_checkpoint(str(tmp_path), "old").endswith("step_00000200")
    marker = read_marker(str(tmp_path / "step_00000030"))
    assert marker["run_id"] == "new" and marker["step"] == 30
    assert {"train_state.json", "spec.yaml", ".metadata", "loader_rank0.pt"} <= set(marker["files"])
    assert json.load(open(tmp_path / "step_00000030" / "train_state.json"))["run_id"] == "new"


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    model = torch.nn.Linear(2, 2, bias=False)
    set_run_id(str(tmp_path), "r")
    older = _save(tmp_path, 1, model, 1.0, "r", keep_last=3)
    newer = _save(tmp_path, 2, model, 2.0, "r", keep_last=3)
    assert verify(newer) is None
    shard = next(n for n in os.listdir(newer) if n.endswith(".distcp"))
    with open(os.path.join(newer, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(newer, shard)) // 2)
    caplog.set_level(logging.WARNING)
    assert latest_checkpoint(str(tmp_path)) == older
    assert f"skipping checkpoint {newer}: {shard} has" in caplog.text and "truncated" in caplog.text
    # same size, other bytes: the checksum catches it
    lp = os.path.join(older, "loader_rank0.pt")
    data = bytearray(open(lp, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(lp, "wb").write(bytes(data))
    assert "CRC-32 differs" in verify(older)
    assert latest_checkpoint(str(tmp_path)) is None
    # loading a broken checkpoint anyway: one CheckpointError naming the path, not a zip-reader trace
    with pytest.raises(CheckpointError, match=rf"{newer}: cannot be loaded"):
        load_checkpoint(newer, torch.nn.Linear(2, 2, bias=False), None, 0)


def _cli(tmp_path, *extra):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pinfm_rec.cli", "pretrain", "--cpu", "--spec", "specs/pretrain/synthetic-tiny.yaml",
           f"run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache", *extra]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_refuses_a_held_run_dir_and_resume_false_on_a_previous_run(tmp_path):
    import socket

    run = tmp_path / "run"
    _write_lock(str(run), host=socket.gethostname(), pid=os.getpid(), proc_start=rundir._proc_start(os.getpid()))
    out = _cli(tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    msg = [line for line in out.stderr.splitlines() if line.startswith("pinfm: ")]
    assert len(msg) == 1 and msg[0].startswith(f"pinfm: run locked: {run} is in use by another run (host "
                                               f"{socket.gethostname()}, pid {os.getpid()}"), out.stderr[-2000:]
    assert not (run / "spec.yaml").exists()  # nothing of the refused run was written
    os.remove(run / rundir.LOCK_NAME)
    _previous_run(run)
    out = _cli(tmp_path, "checkpoint.resume=false")
    assert out.returncode == 2 and "checkpoint.on_existing=archive" in out.stderr, out.stderr[-2000:]
    assert (run / "spec.yaml").read_text() == "name: old\n" and not (run / rundir.LOCK_NAME).exists()


def test_stale_takeover_never_steals_a_lock_another_process_just_took(tmp_path, monkeypatch):
    """Two processes judge the same dead lock stale; the one that renames it second must not move
    the first one's fresh (live) lock aside: it puts it back and is refused."""
    import socket

    run = str(tmp_path / "run")
    _write_lock(run, host=socket.gethostname(), pid=_dead_pid())
    live = {"host": socket.gethostname(), "pid": os.getppid(), "token": "live", "since": "now"}
    real_rename = os.rename

    def rename_after_a_rival_took_over(src, dst):
        if src.endswith(rundir.LOCK_NAME):
            with open(src, "w") as f:  # the rival won the race: a live lock is in place now
                json.dump(live, f)
            monkeypatch.setattr(os, "rename", real_rename)
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_after_a_rival_took_over)
    with pytest.raises(RunDirLockedError, match=f"pid {os.getppid()}"):
        rundir.RunDirLock(run).acquire()
    assert json.load(open(os.path.join(run, rundir.LOCK_NAME)))["token"] == "live"
    assert not [n for n in os.listdir(run) if ".stale." in n]


def test_a_lock_with_a_bad_pid_is_unreadable_not_alive(tmp_path):
    run = str(tmp_path / "run")
    path = _write_lock(run, host="h", pid="x")
    with pytest.raises(RunDirLockedError):  # fresh: maybe being written
        rundir.RunDirLock(run).acquire()
    old = time.time() - rundir.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    lock = rundir.RunDirLock(run)
    lock.acquire()  # old and unreadable: taken over (os.kill(-1, 0) would have read "alive")
    lock.release()


def test_external_checkpoint_dir_only_loses_the_runs_entries(tmp_path):
    run, ck = tmp_path / "run", tmp_path / "shared_ckpts"
    os.makedirs(run)
    os.makedirs(ck / "step_00000010")
    (ck / "RUN_ID").write_text("old")
    (ck / "notes.txt").write_text("someone else's")
    rundir.clear_previous_run(str(run), str(ck), "overwrite")
    assert sorted(os.listdir(ck)) == ["notes.txt"]
    with pytest.raises(CheckpointError, match="checkpoints need a directory of their own"):
        rundir.claim(str(run), str(tmp_path), True, "error", True)


def test_a_damaged_manifest_is_not_accepted(tmp_path):
    d = tmp_path / "step_00000001"
    os.makedirs(d)
    (d / "COMPLETE").write_text('{"files": {"a": ')
    assert "damaged" in verify(str(d))
    (d / "COMPLETE").write_text("step 1\n")  # a pre-manifest marker stays accepted
    assert verify(str(d)) is None and read_marker(str(d)) == {}
