"""Continued pretraining (``pinfm pretrain ... init_from=<encoder export or checkpoint>``): the new
run starts from an existing model's weights, on newer data.

Tables, managed-table slot state (raw id -> slot, access metadata) and the trunk are read through
DCP into the new run's sharding plan (``model.pretrained.load_pretrained``); optimizer state, step
and schedule start fresh. With ``embedding.id_mode=managed`` the ids of the newer data are admitted
by the managed tables as they arrive (the dense remap of a new dataset would give the same item
another id: raw ids keep it). A run that resumes from its own checkpoint ignores ``init_from``.
"""
from __future__ import annotations

from dataclasses import asdict

from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from pinfm_rec.errors import CheckpointError, EncoderError, SpecError
from pinfm_rec.model.pinfm import ModelSpec
from pinfm_rec.model.pretrained import load_pretrained, read_pretrained


def _arch(spec: ModelSpec) -> dict:
    """What must match to load the weights: trunk, embedding dim, id mode, table sizes set in the spec, and
    a managed table's id mapping (id_hash, input_hash_size: the slot state holds ids mapped by them)."""
    emb = asdict(spec.embedding)
    return {"trunk": asdict(spec.trunk), "dim": emb["dim"], "id_mode": emb["id_mode"],
            "item_rows": emb["item"]["num_embeddings"], "output_head": spec.output_head,
            "time_features": spec.time_features,
            # managed: the slot state holds ids mixed (or not) by the checkpoint's rule
            "managed.id_hash": emb["managed"]["id_hash"] if emb["id_mode"] == "managed" else None,
            "managed.input_hash_size": emb["managed"]["input_hash_size"] if emb["id_mode"] == "managed" else None}


def init_from(model: nn.Module, path: str, spec: ModelSpec) -> int:
    """Load the PinFM weights at ``path`` into ``model`` (DMP-wrapped; collective). Returns the number
    of tensors loaded. SpecError naming the keys if the architecture differs from ``spec``."""
    saved, _ = read_pretrained(path)
    a, b = _arch(saved), _arch(spec)
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        raise SpecError(f"init_from={path}: model {', '.join(f'{k}={b[k]}' for k in diff)} but the checkpoint has "
                        f"{', '.join(f'{k}={a[k]}' for k in diff)}; continued pretraining keeps the architecture")
    try:
        return load_pretrained(model, path)
    except EncoderError:
        raise
    except (CheckpointException, RuntimeError, ValueError) as e:  # DCP (a BaseException): e.g. a table of another size
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"init_from={path}: cannot load its weights into this model ({first}); with a new "
                              f"vocabulary use embedding.id_mode=managed (raw ids, fixed table size)") from e
