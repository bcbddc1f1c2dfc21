"""Consistency of a whole spec across its sections: the one place for rules that span sections.

``load_spec`` calls ``cross_check`` on the top-level spec it built (``PretrainSpec``,
``FinetuneSpec``). Rules read the tree by dotted path and apply when those sections exist, so this
module imports no spec class (no layer runs back up). A rule inside one section lives in that
section (``bounds`` metadata, ``FieldError`` in its ``__post_init__``).

Rules:
* ``data.max_len`` <= ``model.trunk.max_len`` of the model in effect (for a fine-tune from a
  pretrained encoder: the ``model`` of the checkpoint's spec.yaml), else histories overflow the
  trunk's positions on the first long batch;
* ``model.output_head=false`` scores the trunk output against the item table: d_model == dim;
* pretraining has negatives: ``model.loss`` in-batch negatives, full catalogue, or sampled ids
  with ``data.num_negatives_per_row`` > 0;
* ``data.raw_ids`` (source ids in the batches) needs ``model.embedding.id_mode`` managed or hash (of
  the encoder checkpoint's model when fine-tuning from one; no rule without an encoder: the ranker's
  own tables hash), no ``encoder.unseen_items=zero`` (dense-id rule), and synthetic raw ids below a
  managed table's ``input_hash_size``;
* ``model.embedding.managed.id_hash=mix`` (the default) needs ``input_hash_size`` a power of two
  (the mix is a bijection on ``[0, 2**k)``) when the spec's own model has ``id_mode=managed``;
* the encoder checkpoint's item vocabulary matches synthetic ranking data (other sources are
  checked once prepared, in the recipe). An empty ``encoder.checkpoint`` with init=pretrained is
  refused by the recipe, not here: ``pinfm prepare-ranking`` loads such specs without one.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import yaml

from pinfm_rec.errors import SpecError

_MISSING = object()


def _get(spec: Any, dotted: str) -> Any:
    node = spec
    for part in dotted.split("."):
        node = getattr(node, part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _has(spec: Any, *keys: str) -> bool:
    return all(_get(spec, k) is not _MISSING for k in keys)


def _pretrained_dir(spec: Any) -> Optional[str]:
    """The encoder checkpoint whose architecture replaces ``model`` (fine-tuning), if any."""
    if not _has(spec, "encoder.init", "encoder.checkpoint"):
        return None
    if spec.encoder.init == "none" or not spec.encoder.checkpoint:
        return None
    return spec.encoder.checkpoint


def _pretrained_model(ckpt: Optional[str]) -> Optional[dict]:
    p = os.path.join(ckpt, "spec.yaml") if ckpt else ""
    if not p or not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            return (yaml.safe_load(f) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None  # the recipe reports an unreadable checkpoint with its path


def _check_max_len(spec: Any, fail) -> None:
    if not _has(spec, "data.max_len", "model.trunk.max_len"):
        return
    trunk_len, owner = spec.model.trunk.max_len, "model.trunk.max_len"
    saved = _pretrained_model(_pretrained_dir(spec))
    if saved is not None:
        trunk_len = int((saved.get("trunk") or {}).get("max_len", trunk_len))
        owner = f"trunk.max_len of encoder.checkpoint {spec.encoder.checkpoint}"
    if spec.data.max_len > trunk_len:
        fail("data.max_len", f"{spec.data.max_len} > {owner} ({trunk_len}): histories would not fit "
                             f"the trunk's positions; lower data.max_len or raise model.trunk.max_len")


def _check_output_head(spec: Any, fail) -> None:
    if not _has(spec, "model.output_head", "model.trunk.d_model", "model.embedding.dim"):
        return
    m = spec.model
    if not m.output_head and m.trunk.d_model != m.embedding.dim:
        fail("model.output_head", f"false needs model.trunk.d_model ({m.trunk.d_model}) == "
                                  f"model.embedding.dim ({m.embedding.dim})")


def _check_negatives(spec: Any, fail) -> None:
    if not _has(spec, "model.loss", "data.num_negatives_per_row"):
        return
    loss = spec.model.loss
    if (not loss.full_catalogue and loss.in_batch_negatives == 0 and loss.use_sampled_negatives
            and spec.data.num_negatives_per_row == 0):
        fail("data.num_negatives_per_row", "0 with model.loss.in_batch_negatives=0 leaves the loss no "
                                           "negatives: set one of them > 0 (or model.loss.full_catalogue=true)")


def _check_encoder(spec: Any, fail) -> None:
    if not _has(spec, "encoder.init", "encoder.checkpoint"):
        return
    ckpt = _pretrained_dir(spec)
    if not ckpt or not _has(spec, "data.source", "data.synthetic.num_items") or spec.data.source != "synthetic":
        return
    for name in ("encoder_meta.json", "train_state.json"):
        p = os.path.join(ckpt, name)
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    n = json.load(f).get("num_items")
            except (OSError, ValueError):
                return
            if n is not None and int(n) != spec.data.synthetic.num_items:
                fail("data.synthetic.num_items", f"{spec.data.synthetic.num_items}, but the encoder at {p} "
                                                 f"has num_items={n}: pretrain on this data's corpus")
            return


def _id_mode_in_effect(spec: Any) -> tuple:
    """(embedding id mode, managed input_hash_size, where it comes from ("" or " in <checkpoint>")) of the model in effect: the
    encoder checkpoint's ``model`` when fine-tuning from one, else ``model.embedding``."""
    emb = spec.model.embedding
    mode, hash_size, owner = emb.id_mode, emb.managed.input_hash_size, ""
    saved = _pretrained_model(_pretrained_dir(spec))
    if saved is not None:
        e = saved.get("embedding") or {}
        mode = e.get("id_mode", "error")
        hash_size = int((e.get("managed") or {}).get("input_hash_size", hash_size))
        owner = f" in encoder.checkpoint {spec.encoder.checkpoint} (its spec.yaml)"
    return mode, hash_size, owner


def _check_raw_ids(spec: Any, fail) -> None:
    if not _has(spec, "data.raw_ids", "model.embedding.id_mode") or not spec.data.raw_ids:
        return
    if _has(spec, "encoder.init") and spec.encoder.init == "none":
        return  # no encoder: only the ranker's own tables, which hash raw ids
    mode, hash_size, owner = _id_mode_in_effect(spec)
    if mode not in ("managed", "hash"):
        fail("data.raw_ids", f"true needs model.embedding.id_mode=managed (or hash){owner}, not {mode!r}: raw ids "
                             f"are not dense row numbers (set data.raw_ids=false, or use an encoder with id_mode "
                             f"managed/hash)")
    if _has(spec, "encoder.unseen_items") and spec.encoder.unseen_items == "zero":
        fail("encoder.unseen_items", "zero finds unseen items by dense id; with data.raw_ids=true use keep "
                                     "(a managed table admits new ids itself)")
    if mode == "managed" and _has(spec, "data.source", "data.synthetic.raw_id_offset", "data.synthetic.num_items") \
            and spec.data.source == "synthetic" and spec.data.synthetic.raw_id_offset:
        from pinfm_rec.data.ranking_synthetic import RAW_ID_STRIDE

        top = spec.data.synthetic.raw_id_offset + (spec.data.synthetic.num_items - 1) * RAW_ID_STRIDE
        if top >= hash_size:
            fail("data.synthetic.raw_id_offset", f"{spec.data.synthetic.raw_id_offset} gives raw ids up to {top}, "
                                                 f">= the managed table's input_hash_size {hash_size}")


def _check_id_hash(spec: Any, fail) -> None:
    keys = ("model.embedding.id_mode", "model.embedding.managed.id_hash", "model.embedding.managed.input_hash_size")
    if not _has(spec, *keys) or spec.model.embedding.id_mode != "managed" or _pretrained_model(_pretrained_dir(spec)) is not None:
        return
    m = spec.model.embedding.managed
    n = int(m.input_hash_size)
    if m.id_hash == "mix" and (n & (n - 1) or n > 2**62):
        fail("model.embedding.managed.input_hash_size",
             f"{n} is not a power of two up to 2**62: model.embedding.managed.id_hash=mix maps raw ids through a "
             f"bijection on [0, 2**k) (use e.g. 2**{min(62, max(1, n.bit_length() - 1))}, or set "
             f"id_hash=none for ids already spread evenly over [0, input_hash_size))")


RULES = (_check_max_len, _check_output_head, _check_negatives, _check_encoder, _check_raw_ids, _check_id_hash)


def cross_check(spec: Any, where: str) -> None:
    """Raise SpecError (naming ``where`` and the dotted key) if the sections of ``spec`` disagree."""

    def fail(key: str, message: str) -> None:
        raise SpecError(f"{where}: key '{key}': {message}")

    for rule in RULES:
        rule(spec, fail)
