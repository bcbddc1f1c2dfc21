"""Crash-safe checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<ckpt_dir>``::

    RUN_ID                    the id of the run that owns the directory (kept across resumes)
    step_00000200/            one complete checkpoint
        .metadata, *.distcp     DCP shards: sharded tables, dense trunk, optimizer state
        loader_rank{r}.pt       each rank's data-loader + RNG state (exact resume)
        train_state.json        step, epoch, world size, run id, metrics so far (pretraining: vocabulary sizes)
        spec.yaml               the resolved spec that produced it
        COMPLETE                written last: run id + every file's size and CRC-32 (train/manifest.py)
    step_00000300.tmp/        a save in progress (or killed mid-way): ignored, removed next save
    encoder/                  model-only export (tables + trunk) that fine-tuning loads

Every rank writes its DCP shard into ``step_N.tmp`` and sums its share of the files; after a
barrier rank 0 writes COMPLETE and renames the directory atomically. A SIGKILL at any point leaves
either the previous complete checkpoint or the new one. Before use a checkpoint is verified
against its manifest: a corrupt or partial newest one is skipped with a warning naming it and the
newest intact one is used. Pruning (keep_last) and the newest-checkpoint lookup only ever consider
checkpoints of the directory's current run (``RUN_ID``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Literal, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from pinfm_rec.errors import CheckpointError
from pinfm_rec.parallel import barrier, broadcast_object
from pinfm_rec.train import manifest
from pinfm_rec.spec import bounds

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{8})$")


@dataclass
class CheckpointSpec:
    """Where and how often to checkpoint (owned by train/checkpoint.py)."""

    dir: str = ""  # empty → <run_dir>/checkpoints
    every_steps: int = field(default=500, metadata=bounds(ge=0))  # 0 = only at the end
    keep_last: int = field(default=2, metadata=bounds(ge=1))
    resume: bool = True  # resume from the newest complete checkpoint when one exists
    # resume=false on a run dir holding a previous run: error (names the choices) | archive (moves it
    # to <run_dir>.<YYYYmmdd-HHMMSS>) | overwrite (deletes it)
    on_existing: Literal["error", "archive", "overwrite"] = "error"


RUN_ID_FILE = "RUN_ID"


def current_run_id(ckpt_dir: str) -> Optional[str]:
    """The id of the run owning ``ckpt_dir`` (None: none recorded, e.g. a pre-run-id directory)."""
    try:
        with open(os.path.join(ckpt_dir, RUN_ID_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def set_run_id(ckpt_dir: str, run_id: str) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = os.path.join(ckpt_dir, RUN_ID_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(run_id + "\n")
    os.replace(tmp, os.path.join(ckpt_dir, RUN_ID_FILE))


def _belongs(path: str, run_id: Optional[str]) -> bool:
    """A checkpoint is the run's when its marker names the run (one without a run id predates them)."""
    if run_id is None:
        return True
    marker = manifest.read_marker(path) or {}
    return marker.get("run_id") in (None, run_id)


def complete_checkpoints(ckpt_dir: str, run_id: Optional[str] = None) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint with a COMPLETE marker (of run ``run_id`` if given), oldest
    first. The files are not verified here (``latest_checkpoint`` does)."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    names = set(os.listdir(ckpt_dir))
    for name in names:
        m = _STEP_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if not m and name.endswith(".old") and name[:-4] not in names:  # a re-save killed between renames
            m = _STEP_RE.match(name[:-4])
        if m and os.path.isfile(os.path.join(path, manifest.MARKER)) and _belongs(path, run_id):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str, run_id: Optional[str] = None) -> Optional[str]:
    """The newest intact checkpoint of the directory's current run (``run_id``, default: its
    RUN_ID file). Newer ones that fail verification are skipped with a WARNING naming them."""
    run_id = run_id or current_run_id(ckpt_dir)
    for _, path in reversed(complete_checkpoints(ckpt_dir, run_id)):
        why = manifest.verify(path)
        if why is None:
            return path
        logger.warning("skipping checkpoint %s: %s; falling back to an older one", path, why)
    return None


def model_checkpoint(ckpt_dir: str) -> Optional[str]:
    """The checkpoint whose model a run stands for: its best-valid one when it early-stopped
    (``train.patience``; recorded in the newest checkpoint's train_state.json), else its newest
    intact one. What ``pinfm eval`` evaluates by default."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return None
    try:
        with open(os.path.join(path, "train_state.json")) as f:
            best = int((json.load(f).get("early_stop") or {}).get("best_step", -1))
    except (OSError, ValueError):
        return path
    best_path = os.path.join(ckpt_dir, f"step_{best:08d}")
    if best >= 0 and best_path != path:
        why = manifest.verify(best_path)
        if why is None:
            return best_path
        logger.warning("best-valid checkpoint %s unusable (%s): using the newest, %s", best_path, why, path)
    return path


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore the torch/numpy/python (and CUDA) RNG state saved by a checkpoint."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _model_state(model: torch.nn.Module) -> Dict[str, Any]:
    return model.state_dict()


def save_checkpoint(
    ckpt_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: Optional[Any],
    loader_state: Optional[dict],
    train_state: dict,
    spec_yaml: str,
    rank: int,
    keep_last: int = 2,
    run_id: Optional[str] = None,
    protect: Iterable[int] = (),
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path.

    Pruning keeps the newest ``keep_last`` checkpoints of run ``run_id`` plus the steps in
    ``protect`` (e.g. the best-valid one); other runs' checkpoints are never touched."""
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):  # leftovers of killed saves
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    state: Dict[str, Any] = {"model": _model_state(model)}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.save(state, checkpoint_id=tmp)
    torch.save({"loader": loader_state, "rng": _rng_state()}, os.path.join(tmp, f"loader_rank{rank}.pt"))
    world = _world()
    barrier()
    manifest.write_part(tmp, rank, world)
    barrier()
    if rank == 0:
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump({**train_state, "run_id": run_id}, f, indent=1)
        with open(os.path.join(tmp, "spec.yaml"), "w") as f:
            f.write(spec_yaml)
        manifest.write_marker(tmp, world, {"step": step, "run_id": run_id})
        # a step saved twice (e.g. every_steps and the end of the run) is replaced without a
        # moment with no complete copy: the old one moves aside (still found by
        # complete_checkpoints as step_N.old) until the new one is in place
        if os.path.exists(final):
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.rename(final, final + ".old")
        os.rename(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        keep = set(protect)
        for s, old in complete_checkpoints(ckpt_dir, run_id)[:-keep_last] if keep_last > 0 else []:
            if s not in keep:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written: %s", final)
    barrier()
    return final


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: Optional[Any],
    rank: int,
) -> tuple[dict, Optional[dict], Optional[dict]]:
    """Load in place (collective). Returns (train_state, this rank's loader state or None,
    this rank's RNG state or None).

    The RNG state is returned, not applied: the caller restores it with ``set_rng_state`` right
    before the first resumed step (creating the loader iterator draws from the global RNG).

    Works when the number of ranks or the sharding plan differs from the saving run (DCP reshards);
    the loader state is then dropped (the epoch restarts) because row shards differ.
    """
    state: Dict[str, Any] = {"model": _model_state(model)}
    if optimizer is not None:
        if hasattr(optimizer, "init_state"):
            optimizer.init_state()  # materialise lazy optimizer state so DCP can load into it
        state["optim"] = optimizer.state_dict()
    with _loading(path):
        dcp.load(state, checkpoint_id=path)
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optim"])
        with open(os.path.join(path, "train_state.json")) as f:
            train_state = json.load(f)
    loader_state, rng_state = None, None
    lp = os.path.join(path, f"loader_rank{rank}.pt")
    world = _world()
    if os.path.isfile(lp) and train_state.get("world_size") == world:
        with _loading(lp):
            saved = torch.load(lp, weights_only=False)
        loader_state = saved["loader"]
        rng_state = saved["rng"]
    elif rank == 0:
        logger.warning("%s: no loader state for world size %d; the epoch restarts", path, world)
    return train_state, loader_state, rng_state


def export_encoder(out_dir: str, model: torch.nn.Module, spec_yaml: str, meta: dict, rank: int) -> str:
    """Model-only DCP export (tables + dense) that fine-tuning loads on any number of ranks."""
    tmp = out_dir.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    dcp.save({"model": _model_state(model)}, checkpoint_id=tmp)
    barrier()
    manifest.write_part(tmp, rank, _world())
    barrier()
    if rank == 0:
        with open(os.path.join(tmp, "spec.yaml"), "w") as f:
            f.write(spec_yaml)
        with open(os.path.join(tmp, "encoder_meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        manifest.write_marker(tmp, _world(), {"step": meta.get("step")})
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
        logger.info("encoder exported: %s", out_dir)
    barrier()
    return out_dir


def load_model_state(path: str, model: torch.nn.Module, strict: bool = True) -> None:
    """Load only the model part of a checkpoint or encoder export into ``model`` (collective)."""
    if not os.path.isfile(os.path.join(path, manifest.MARKER)):
        raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker)")
    state = {"model": _model_state(model)}
    with _loading(path):
        dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"], strict=strict)


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_resume_compatible(path: str, spec_yaml: str, sections: tuple = ("model",),
                            spec_cls: Optional[type] = None, keys: tuple = ()) -> None:
    """Raise a clear error when the checkpoint at ``path`` was written by a run whose ``sections`` of
    the spec (the model architecture) differ from the current spec: its tensors would not fit.
    ``keys``: single dotted keys that must match too (those defining the loader's rows and batches,
    whose saved (epoch, step) position would otherwise silently point at other data).

    spec_cls (the top-level spec dataclass): the saved spec is re-validated through it first, so a
    key added to the code after the checkpoint was written compares as its default, not as None.
    """
    import yaml

    from pinfm_rec.spec import from_dict, to_dict

    saved_p = os.path.join(path, "spec.yaml")
    if not os.path.isfile(saved_p):
        return
    with open(saved_p) as f:
        saved = yaml.safe_load(f) or {}
    if isinstance(saved.get("model"), dict):  # saved before embedding.managed.id_hash existed: unmixed ids
        from pinfm_rec.model.managed import legacy_spec_defaults

        saved["model"] = legacy_spec_defaults(saved["model"])
    if spec_cls is not None:
        try:
            saved = to_dict(from_dict(spec_cls, saved))
        except (ValueError, TypeError):
            pass  # a spec with keys removed since: compare it as written
    now = yaml.safe_load(spec_yaml) or {}
    diffs = []
    for sec in sections:
        a, b = _flatten(saved.get(sec) or {}, sec), _flatten(now.get(sec) or {}, sec)
        # a table's sharding type does not change its tensors (DCP reshards): re-planning is allowed
        diffs += [f"{k}: checkpoint {a.get(k)!r} != now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k) and not k.endswith(".sharding")]
    flat_a, flat_b = _flatten(saved, ""), _flatten(now, "")
    diffs += [f"{k}: checkpoint {flat_a.get(k)!r} != now {flat_b.get(k)!r}" for k in keys
              if flat_a.get(k) != flat_b.get(k)]
    if diffs:
        raise CheckpointError(
            f"cannot resume from / load {path}: its run used a different {'/'.join(sections + keys)} "
            "spec (" + "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")
            + "). To train, use a new run name (name=...) or checkpoint.resume=false to start "
            "fresh; to evaluate it, pass the spec.yaml saved beside it."
        )


def resolve_resume(ckpt_dir: str, enabled: bool, run_id: Optional[str] = None) -> Optional[str]:
    """Rank 0 picks the newest intact checkpoint of run ``run_id``; everyone gets the same answer."""
    path = None
    if enabled and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        path = latest_checkpoint(ckpt_dir, run_id)
    return broadcast_object(path)


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


@contextlib.contextmanager
def _loading(path: str):
    """Turn a failure of reading a checkpoint (DCP, torch.load's zip reader, JSON) into one
    CheckpointError naming the path; the original stays chained for --debug."""
    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        first = (str(e).strip().splitlines() or [""])[-1].split(". ")[0][:300]
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {first}); it may be corrupt: "
                              f"delete it to resume from the previous checkpoint") from e
