"""One run per run directory: a lock held for the run, and what ``resume=false`` does to a previous run.

Lock ``<run_dir>/RUN.lock`` (JSON: host, pid, process start time, since, torchelastic job id and
restart count) is created with O_EXCL by rank 0 and refreshed every ``HEARTBEAT_S`` seconds by a
daemon thread; it is removed when the run ends (normally, by an error or by SIGINT/SIGTERM). A
second run of the same directory fails with ``RunDirLockedError`` naming the holder. A lock is
stale, and is taken over with a WARNING, when

* its host is this host and its pid no longer runs (or runs a different process: pid reused),
* it was written by an earlier attempt of this torchelastic job (same TORCHELASTIC_RUN_ID, lower
  TORCHELASTIC_RESTART_COUNT): a ``--max-restarts`` restart resumes, on any host,
* it is on another host and was not refreshed for ``STALE_AFTER_S`` seconds (its holder is dead).

``checkpoint.resume=false`` on a directory holding a previous run (checkpoints, results.json,
encoder/, tb/): ``checkpoint.on_existing=error`` (default) refuses with a CheckpointError naming
the choices; ``archive`` moves the previous run to ``<run_dir>.<YYYYmmdd-HHMMSS>/``; ``overwrite``
deletes it. The run id (``RUN_ID`` of the checkpoint dir) is new for a fresh run and kept across resumes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from typing import Optional

from pinfm_rec import errors
from pinfm_rec.errors import CheckpointError, PinfmError, RunDirLockedError
from pinfm_rec.parallel import broadcast_object
from pinfm_rec.train.checkpoint import current_run_id, set_run_id

logger = logging.getLogger(__name__)

LOCK_NAME = "RUN.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# entries a new run leaves in place: the lock, and the CLI's log file (already open for this run)
_KEEP = {LOCK_NAME, "log.txt"}
_PREVIOUS_RUN = ("results.json", "encoder", "tb")


def _proc_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(path: str) -> Optional[dict]:
    """A lock file's content, or None when it is missing or unreadable (being written, damaged)."""
    try:
        with open(path) as f:
            out = json.load(f)
        return out if isinstance(out, dict) else None
    except (OSError, ValueError):
        return None


def _holder_pid(holder: dict) -> int:
    try:
        return int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return -1


def _elastic() -> tuple[str, int]:
    return os.environ.get("TORCHELASTIC_RUN_ID", ""), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class RunDirLock:
    """The run directory's lock (rank 0 only): ``acquire`` / ``release``."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _mine(self) -> dict:
        job, restart = _elastic()
        return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "elastic_run_id": job,
                "restart_count": restart, "token": self.token}

    def _read(self) -> Optional[dict]:
        return _read_json(self.path)

    def stale_reason(self, holder: Optional[dict]) -> Optional[str]:
        """Why the lock ``holder`` is stale, or None when its run may still be alive."""
        try:
            age = time.time() - os.path.getmtime(self.path)
        except OSError:
            return "it vanished"
        if holder is None or _holder_pid(holder) <= 0:  # unreadable: killed while writing it, or writing now
            return f"unreadable and not refreshed for {age:.0f}s" if age > STALE_AFTER_S else None
        job, restart = _elastic()
        if job not in ("", "none") and holder.get("elastic_run_id") == job and int(holder.get("restart_count", 0)) < restart:
            return f"written by attempt {holder.get('restart_count')} of this torchelastic job (now {restart})"
        if holder.get("host") == socket.gethostname():
            pid = _holder_pid(holder)
            if pid == os.getpid():
                return "left by this process"
            if not _pid_alive(pid):
                return f"pid {pid} is no longer running"
            if holder.get("proc_start") and _proc_start(pid) not in (None, holder["proc_start"]):
                return f"pid {pid} now belongs to another process"
            return None
        if age > STALE_AFTER_S:
            return f"not refreshed for {age:.0f}s (a live holder refreshes it every {HEARTBEAT_S:.0f}s)"
        return None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                why = self.stale_reason(holder)
                if why is None:
                    raise RunDirLockedError(_held_message(self.path, holder)) from None
                logger.warning("%s: taking over a stale lock (%s)", self.path, why)
                aside = f"{self.path}.stale.{os.getpid()}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                if (_read_json(aside) or {}).get("token") != (holder or {}).get("token"):
                    # another process took the stale lock over between our read and our rename: what
                    # we moved aside is its live lock; put it back (link fails if a third one is there)
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                os.remove(aside)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._mine(), f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="pinfm-run-lock", daemon=True)
            self._thread.start()
            return
        raise RunDirLockedError(f"{self.path}: could not take the lock (other runs keep taking it)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        self._thread = None
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            try:
                os.remove(self.path)
            except OSError:
                pass


def _held_message(path: str, holder: Optional[dict]) -> str:
    run_dir = os.path.dirname(path)
    who = (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}" if holder
           else "a run that is writing its lock now")
    return (f"{run_dir} is in use by another run ({who}; lock {path}). Wait for it to end, or use another "
            f"name=...; if that run is dead on another host, delete {path}")


def previous_run(run_dir: str, ckpt_dir: str) -> list:
    """Paths left by an earlier run: checkpoints, results.json, encoder/, tb/."""
    found = []
    if os.path.isdir(ckpt_dir) and any(n.startswith("step_") for n in os.listdir(ckpt_dir)):
        found.append(ckpt_dir)
    found += [os.path.join(run_dir, n) for n in _PREVIOUS_RUN if os.path.exists(os.path.join(run_dir, n))]
    return found


def clear_previous_run(run_dir: str, ckpt_dir: str, mode: str) -> Optional[str]:
    """``checkpoint.resume=false``: apply ``checkpoint.on_existing`` to a previous run in
    ``run_dir``. Returns the archive dir (archive), else None."""
    found = previous_run(run_dir, ckpt_dir)
    if not found:
        return None
    if mode == "error":
        names = ", ".join(os.path.relpath(p, run_dir) for p in found)
        raise CheckpointError(
            f"{run_dir} holds a previous run ({names}) and checkpoint.resume=false would mix a new run into it: "
            f"add checkpoint.on_existing=archive (moves it to {run_dir.rstrip('/')}.<time>) or "
            f"checkpoint.on_existing=overwrite (deletes it), use another name=..., or drop "
            f"checkpoint.resume=false to resume it")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = f"{run_dir.rstrip('/')}.{stamp}" if mode == "archive" else None
    if dest:
        os.makedirs(dest)
    moves = [(os.path.join(run_dir, n), os.path.join(dest, n) if dest else None)
             for n in os.listdir(run_dir) if n not in _KEEP]
    if not os.path.abspath(ckpt_dir).startswith(os.path.abspath(run_dir) + os.sep) and os.path.isdir(ckpt_dir):
        # a checkpoint.dir elsewhere: only this run's entries move, never the directory itself
        cdest = f"{ckpt_dir.rstrip('/')}.{stamp}" if dest else None
        if cdest:
            os.makedirs(cdest)
        moves += [(os.path.join(ckpt_dir, n), os.path.join(cdest, n) if cdest else None)
                  for n in os.listdir(ckpt_dir) if n.startswith("step_") or n == "RUN_ID"]
    for src, to in moves:
        if to:
            os.rename(src, to)
        elif os.path.isdir(src) and not os.path.islink(src):
            shutil.rmtree(src)
        else:
            os.remove(src)
    logger.warning("checkpoint.resume=false: previous run in %s %s", run_dir,
                   f"archived to {dest}" if dest else "deleted (checkpoint.on_existing=overwrite)")
    return dest


def claim(run_dir: str, ckpt_dir: str, resume: bool, on_existing: str, is_main: bool) -> tuple[Optional[RunDirLock], str]:
    """Collective, before any other work: rank 0 locks ``run_dir``, applies ``resume=false`` /
    ``on_existing`` and fixes the run id; every rank gets the run id, or raises the same error.
    Returns (the lock on rank 0 else None, run id)."""
    lock, outcome = None, None
    if is_main:
        try:
            ck, rd = os.path.abspath(ckpt_dir), os.path.abspath(run_dir)
            if rd == ck or rd.startswith(ck + os.sep):
                raise CheckpointError(
                    f"checkpoint.dir {ckpt_dir} is the run dir {run_dir} or holds it: checkpoints need a directory "
                    f"of their own (leave checkpoint.dir empty for {os.path.join(run_dir, 'checkpoints')})")
            lock = RunDirLock(run_dir)
            lock.acquire()
            if not resume:
                clear_previous_run(run_dir, ckpt_dir, on_existing)
            run_id = current_run_id(ckpt_dir) if resume else None
            run_id = run_id or uuid.uuid4().hex[:16]
            set_run_id(ckpt_dir, run_id)
            outcome = ("ok", run_id)
        except Exception as e:
            if lock is not None:
                lock.release()
            if not isinstance(e, PinfmError):  # e.g. an OSError moving the previous run
                e = CheckpointError(f"{run_dir}: cannot prepare the run directory ({type(e).__name__}: {e})")
            broadcast_object((type(e).__name__, str(e)))
            raise e
    outcome = broadcast_object(outcome)
    if outcome[0] != "ok":
        raise getattr(errors, outcome[0], CheckpointError)(outcome[1])
    return lock, outcome[1]
