"""Incremental export: a base snapshot, then per interval only the embedding rows that changed.

``DeltaExporter(out_dir).export(model, step)`` writes ``out_dir/base`` on its first call (the full
state: every table and the dense weights and buffers, managed-table slot state included) and
``out_dir/delta-<step>`` afterwards: for each table the rows that differ from the previous export
(row ids [R] + rows [R, D]; rows a training step touched change, so these are the rows touched since
the last export, re-initialised rows of evicted managed slots included) and the whole dense rest
(small next to the tables; a managed table's per-slot state, [slots] int64 buffers that grow with
the table, is diffed entry by entry like the rows). ``load_chain(out_dir)`` applies the deltas in step order to the base
and returns the state dict a full export at the last step would hold; ``chain_sizes`` gives the
bytes of each file, for delta vs full comparisons.

The changed rows are found by comparing against the previous export's tables, kept on rank 0 (CPU
memory of one copy of the tables); TorchRec's DeltaTracker (``torchrec.distributed.model_tracker``,
torchrec >= 1.7) tracks the ids in the step instead, which a larger deployment would use.
Works on an unsharded model and under DMP (ShardedTensors are gathered on rank 0: a collective, in
the tensor's own dtype: torch's ``ShardedTensor.gather`` stages shards in a float32 buffer unless told
the dtype, which rounds int64 raw ids above 2**24 in the managed tables' slot state).

Tables: EmbeddingCollection (``.embeddings.<table>.weight``) and EmbeddingBagCollection
(``.embedding_bags.<table>.weight``, a ranker's own tables) rows; everything else is the dense rest.
``RecipeDeltas`` is what the training recipes (pretrain, finetune) hold to write a chain at every
checkpoint when their spec sets ``delta_export=true``.
"""
from __future__ import annotations

import glob
import inspect
import json
import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

BASE = "base"
STATE_FILE = "state.pt"


def _is_table(key: str, value: torch.Tensor) -> bool:
    k = f".{key}"
    return (".embeddings." in k or ".embedding_bags." in k) and key.endswith(".weight") and value.dim() == 2


def _is_slot_state(key: str, value: torch.Tensor) -> bool:
    """A managed table's per-slot buffer (``MCHManagedCollisionModule._mch_*``: sorted raw ids, slot
    mapping, LRU/LFU metadata; [slots] int64): diffed entry by entry like table rows."""
    return "._mch_" in key and value.dim() == 1 and not value.dtype.is_floating_point


def _diffed(key: str, value: torch.Tensor) -> bool:
    return _is_table(key, value) or _is_slot_state(key, value)


def gather_full(v, rank: int, device: torch.device) -> Optional[torch.Tensor]:
    """The full tensor of ShardedTensor ``v`` on rank 0 (None elsewhere; collective), in ``v``'s dtype.
    torch's ``gather`` stages the shards in a buffer of its ``dtype`` argument, default float32: int64
    ids (managed-table slot state, raw ids up to 2**63) would come back rounded to 24 bits."""
    full = torch.empty(v.shape, dtype=v.dtype, device=device) if rank == 0 else None
    if "dtype" in inspect.signature(v.gather).parameters:
        v.gather(dst=0, out=full, dtype=v.dtype)
    else:  # older torch: enforce_dtype uses the shards' dtype
        v.gather(dst=0, out=full, enforce_dtype=True)
    return full


def plain_state(model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The model's state dict as plain CPU tensors on rank 0 (None on other ranks): ShardedTensors
    gathered (collective), DTensors made full."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    # the gather's buffer lives where the backend can write: on the GPU under nccl (a CPU buffer
    # fails there: "ProcessGroupNCCL::gather: invalid tensor type"), on the host under gloo
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    out: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if isinstance(v, ShardedTensor):
            v = gather_full(v, rank, dev)
        elif hasattr(v, "full_tensor"):
            v = v.full_tensor()
        if rank == 0 and isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu().clone()
    return out if rank == 0 else None


class DeltaExporter:
    """Writes a base snapshot, then deltas of changed table rows + the dense rest (see module doc)."""

    def __init__(self, out_dir: str) -> None:
        """An ``out_dir`` that already holds a chain (a resumed run) is continued: its tables are the
        reference of the next delta."""
        self.out_dir = out_dir
        self.prev: Optional[Dict[str, torch.Tensor]] = None  # tables at the last export (rank 0)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0 and os.path.isfile(os.path.join(out_dir, BASE, STATE_FILE)):
            self.prev = {k: v for k, v in load_chain(out_dir).items() if _diffed(k, v)}
        self.last_step: Optional[int] = None
        self.changed_rows = 0  # rows written by the last delta (all rows for the base)
        self.total_rows = 0

    def export(self, model: nn.Module, step: int) -> Optional[str]:
        """Export ``model`` at ``step`` (collective under DMP); returns the written dir on rank 0. A
        second export at the step just exported writes nothing (the same weights)."""
        if step == self.last_step:
            return None
        self.last_step = step
        state = plain_state(model)
        if state is None:
            return None
        tables = {k: v for k, v in state.items() if _diffed(k, v)}
        if self.prev is None:
            path = os.path.join(self.out_dir, BASE)
            payload = {"full": state}
        else:
            path = os.path.join(self.out_dir, f"delta-{step:09d}")
            rows, whole = {}, {}
            for k, w in tables.items():
                diff = w != self.prev[k]
                changed = torch.nonzero(diff.any(dim=1) if w.dim() == 2 else diff).flatten()
                part = w[changed].clone()
                if w.dim() == 1 and changed.numel() * (changed.element_size() + w.element_size()) \
                        >= w.numel() * w.element_size():
                    whole[k] = w  # slot state that moved a lot (a sorted array shifts): cheaper whole
                else:
                    rows[k] = (changed, part)
            payload = {"rows": rows, "dense": {**{k: v for k, v in state.items() if k not in tables}, **whole}}
        self.total_rows = sum(w.shape[0] for k, w in tables.items() if w.dim() == 2)  # table rows only
        self.changed_rows = self.total_rows if self.prev is None else \
            sum(int(i.numel()) for k, (i, _) in rows.items() if tables[k].dim() == 2)
        os.makedirs(path, exist_ok=True)
        torch.save(payload, os.path.join(path, STATE_FILE))
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump({"step": step, "kind": "base" if self.prev is None else "delta"}, f)
        self.prev = tables
        return path


class RecipeDeltas:
    """A training recipe's incremental exports: ``after_checkpoint(model, step)`` writes the base (first
    call) or a delta to ``out_dir`` when ``enabled`` (the spec's ``delta_export``), a no-op otherwise.
    Held by ``train.common.Recipe`` (pretrain and finetune): the interval is the checkpoint interval
    (``checkpoint.every_steps``, epoch ends where the recipe checkpoints them, the run's end). The
    exporter is made at the first export, after a resume has loaded its weights, and continues a chain
    already in ``out_dir``."""

    def __init__(self, out_dir: str, enabled: bool) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.exporter: Optional[DeltaExporter] = None

    def after_checkpoint(self, model: nn.Module, step: int) -> Optional[str]:
        """Collective under DMP; returns the written dir on rank 0."""
        if not self.enabled:
            return None
        if self.exporter is None:
            self.exporter = DeltaExporter(self.out_dir)
        return self.exporter.export(model, step)


def chain_dirs(out_dir: str) -> List[str]:
    """The base dir, then the delta dirs in step order."""
    base = os.path.join(out_dir, BASE)
    if not os.path.isfile(os.path.join(base, STATE_FILE)):
        raise FileNotFoundError(f"{base}: no base snapshot ({STATE_FILE}); export a base first")
    return [base] + sorted(glob.glob(os.path.join(out_dir, "delta-*")))


def load_chain(out_dir: str, upto_step: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The state dict after applying every delta (up to ``upto_step``) to the base, in step order."""
    dirs = chain_dirs(out_dir)
    state = torch.load(os.path.join(dirs[0], STATE_FILE), weights_only=False)["full"]
    for d in dirs[1:]:
        with open(os.path.join(d, "meta.json")) as f:
            if upto_step is not None and json.load(f)["step"] > upto_step:
                break
        delta = torch.load(os.path.join(d, STATE_FILE), weights_only=False)
        for k, (ids, rows) in delta["rows"].items():
            state[k][ids] = rows
        state.update(delta["dense"])
    return state


def chain_sizes(out_dir: str) -> Dict[str, int]:
    """{dir name: bytes of its state file} for the base and every delta."""
    return {os.path.basename(d): os.path.getsize(os.path.join(d, STATE_FILE)) for d in chain_dirs(out_dir)}
