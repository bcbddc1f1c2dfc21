"""Reading a pretraining checkpoint or encoder export (``runs/<name>/encoder``) from model code.

An export holds the DCP files of ``{"model": PinFM state}``, ``spec.yaml`` (the resolved
pretraining spec: its ``model`` section is the architecture) and ``encoder_meta.json`` (the
vocabulary sizes, ``pinfm_rec.features.VOCAB_KEYS``); a pretraining checkpoint has
``train_state.json`` with the same sizes instead.

``load_pretrained(model, path)`` finds every ``PinFM`` inside ``model`` by type (whatever the
attribute is called, inside DMP too) and loads it through DCP: any number of ranks, any sharding
plan. It is a collective when the model is sharded. ``encoder_module_paths`` /
``encoder_parameter_names`` find the ``PinFMEncoder`` modules of a model the same way (by type),
for per-module learning rates and freezing.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Set, Tuple

import torch
import torch.distributed.checkpoint as dcp
import yaml

from pinfm_rec.errors import EncoderError
from pinfm_rec.features import VOCAB_KEYS, vocab_sizes
from pinfm_rec.model.managed import legacy_spec_defaults
from pinfm_rec.model.pinfm import ModelSpec, PinFM
from pinfm_rec.spec import from_dict

META_FILES = ("encoder_meta.json", "train_state.json")


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise EncoderError(f"{path}: no such encoder export or pretraining checkpoint (runs/<name>/encoder)")
    if not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise EncoderError(f"{path}: not a complete checkpoint or encoder export (no COMPLETE marker)")


def read_pretrained(path: str) -> Tuple[ModelSpec, Dict[str, int]]:
    """(architecture, vocabulary sizes) of the encoder export / pretraining checkpoint at ``path``."""
    _require_dir(path)
    spec_p = os.path.join(path, "spec.yaml")
    if not os.path.isfile(spec_p):
        raise EncoderError(f"{spec_p}: missing; the path must be a pretraining checkpoint or encoder export")
    with open(spec_p) as f:
        raw = yaml.safe_load(f) or {}
    # a spec saved before embedding.managed.id_hash existed ran unmixed (model/managed.py)
    model_spec = from_dict(ModelSpec, legacy_spec_defaults(raw.get("model")) or {}, where=f"{spec_p}: model")
    for name in META_FILES:
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                meta = json.load(f)
            try:
                return model_spec, vocab_sizes(meta)
            except KeyError as e:
                raise EncoderError(f"{p}: {e.args[0]}") from e
    raise EncoderError(f"{path}: no {' or '.join(META_FILES)} with the vocabulary sizes ({', '.join(VOCAB_KEYS)})")


def check_vocab(path: str, vocab: Dict[str, int], saved: Dict[str, int], argument: str = "vocab") -> None:
    """Raise EncoderError naming ``argument`` if ``vocab`` (the user's sizes) differs from ``saved``."""
    bad = {k: (vocab[k], saved[k]) for k in saved if k in vocab and int(vocab[k]) != int(saved[k])}
    if bad:
        what = ", ".join(f"{k}={a} (the encoder has {b})" for k, (a, b) in bad.items())
        raise EncoderError(f"{argument}: {what}; the encoder at {path} was pretrained on other ids")


def load_pretrained(model: torch.nn.Module, path: str) -> int:
    """Load the pretrained PinFM weights at ``path`` into every ``PinFM`` module of ``model``
    (found by type; DMP-wrapped or not). Returns the number of tensors loaded per module."""
    _require_dir(path)
    targets = [m for m in model.modules() if isinstance(m, PinFM)]
    if not targets:
        raise EncoderError(f"load_pretrained: {type(model).__name__} holds no PinFM module (a PinFMEncoder)")
    n = 0
    for fm in targets:
        state = fm.state_dict()
        if any(isinstance(v, torch.Tensor) and v.is_meta for v in state.values()):
            raise EncoderError("load_pretrained: the encoder is still on 'meta'; shard it with DMP (or build it "
                               "on a real device) first")
        dcp.load({"model": state}, checkpoint_id=path)
        fm.load_state_dict(state)
        n = len(state)
    return n


def encoder_module_paths(model: torch.nn.Module) -> List[str]:
    """Module paths (as in ``model.named_modules()``) of every ``PinFMEncoder`` in ``model``, found
    by type whatever its attribute name; an encoder nested in another is not listed twice."""
    from pinfm_rec.model.encoder import PinFMEncoder  # encoder.py imports this module

    paths: List[str] = []
    for name, m in model.named_modules():
        if isinstance(m, PinFMEncoder) and not any(name.startswith(p + ".") for p in paths):
            paths.append(name)
    return paths


def encoder_parameter_names(model: torch.nn.Module) -> Set[str]:
    """Names (as in ``model.named_parameters()``, so DMP/DDP/FSDP2 prefixes included) of the
    parameters held by a ``PinFMEncoder`` inside ``model``: e.g. its own optimizer group at
    ``lr_mult`` x lr."""
    from pinfm_rec.model.encoder import PinFMEncoder

    owned = {id(p) for m in model.modules() if isinstance(m, PinFMEncoder) for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in owned}
