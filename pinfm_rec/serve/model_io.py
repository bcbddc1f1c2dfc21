"""Loading a fine-tuned model (encoder + TorchRec ranker) for serving: one process, no sharding.

``load_finetuned(run)`` reads the fine-tuning run's checkpoint (the one ``pinfm eval`` would use:
best-valid when it early-stopped, else the newest intact one) and the spec saved beside it, builds
the same ``RankerWithEncoder`` the recipe builds (``build_ranker`` + ``PinFMEncoder``) with its
tables on a real device instead of DMP shards, and loads the weights through DCP (which reshards
whatever plan the run trained with). Sizes the recipe took from the ranking data (item vocabulary,
number of dense features) are read from the checkpoint's tensor shapes, so serving needs neither
the training data nor a process group. The encoder architecture comes from the pretrained export
named by ``encoder.checkpoint`` (as in training) or, for ``encoder.init=random`` without one, from
the spec's ``model`` section.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import yaml

from pinfm_rec.errors import CheckpointError, EncoderError, SpecError
from pinfm_rec.features import TABLE_VOCAB, VOCAB_KEYS
from pinfm_rec.model.encoder import PinFMEncoder
from pinfm_rec.model.pinfm import ModelSpec
from pinfm_rec.rankers.dlrm import CAND_FEATURE, RankerWithEncoder, build_ranker
from pinfm_rec.spec import from_dict

DENSE_IN = "ranker.dense_arch.model._mlp.0._linear.weight"  # [dense_arch[0], F + out_dim]
CAND_TABLE = "ranker.sparse_arch.embedding_bag_collection.embedding_bags.t_r_cand.weight"  # [num_items, E]
EC_PREFIX = "encoder.fm.ec.embeddings."
# embedding.id_mode=managed: the item table inside the managed collection, the others beside it
MANAGED_PREFIX = {"t_item": "encoder.fm.ec.items._embedding_module.embeddings.", "*": "encoder.fm.ec.rest.embeddings."}


@dataclass
class Loaded:
    """A fine-tuned model ready to serve: ``model`` (eval mode), the run's ``spec`` (FinetuneSpec),
    the ``checkpoint`` it came from, ``num_dense`` F and the history cut ``max_len``."""

    model: RankerWithEncoder
    spec: object
    checkpoint: str
    num_dense: int

    @property
    def max_len(self) -> int:
        return self.spec.data.max_len

    def item_id_rule(self) -> Tuple[Optional[int], str]:
        """(exclusive upper bound of the item ids a request may carry or None, what the ids are): dense
        row numbers of the ranker's tables unless the run trained on raw ids (``data.raw_ids``: any
        int64 >= 0, below ``input_hash_size`` for a managed encoder) or hashes them (``id_mode=hash``)."""
        enc = self.model.encoder
        emb = enc.fm.spec.embedding if enc is not None else None
        if self.spec.data.raw_ids:
            if emb is not None and emb.id_mode == "managed":
                return emb.managed.input_hash_size, "raw item ids (data.raw_ids=true, a managed encoder)"
            return None, "raw item ids (data.raw_ids=true)"
        if emb is not None and emb.id_mode == "hash":
            return None, "item ids hashed into the tables (embedding.id_mode=hash)"
        n = self.model.ranker_sizes[CAND_FEATURE] if self.model.ranker_sizes else None
        return n, "the fine-tuning data's dense item ids (the run has data.raw_ids=false)"


def checkpoint_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """{model parameter name: shape} stored in a DCP checkpoint (its metadata; nothing is read)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is the same user error
        raise CheckpointError(f"{path}: no readable DCP metadata ({type(e).__name__}: {e})") from e
    out = {}
    for k, m in meta.state_dict_metadata.items():
        if k.startswith("model.") and hasattr(m, "size"):
            out[k[len("model."):]] = tuple(m.size)
    return out


def resolve_checkpoint(run: str, checkpoint: Optional[str] = None) -> Tuple[str, str]:
    """(checkpoint dir, spec.yaml path) of a fine-tuning run dir (or a checkpoint dir itself)."""
    from pinfm_rec.train.checkpoint import model_checkpoint

    if checkpoint is None and os.path.isfile(os.path.join(run, "COMPLETE")):
        checkpoint = run  # a checkpoint dir given as the run
    if checkpoint is None:
        ckpt_dir = os.path.join(run, "checkpoints")
        checkpoint = model_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
        if checkpoint is None:
            raise CheckpointError(f"{run}: no complete fine-tuning checkpoint under {ckpt_dir}; give a "
                                  f"fine-tuning run dir (runs/<name>) or --checkpoint")
    spec_path = os.path.join(checkpoint, "spec.yaml")
    if not os.path.isfile(spec_path):
        spec_path = os.path.join(run, "spec.yaml")
    if not os.path.isfile(spec_path):
        raise CheckpointError(f"{checkpoint}: no spec.yaml beside the checkpoint or in {run}")
    return checkpoint, spec_path


def _read_spec(spec_path: str):
    from pinfm_rec.train.finetune import FinetuneSpec

    with open(spec_path) as f:
        raw = yaml.safe_load(f) or {}
    if not {"encoder", "ranker"} & set(raw):
        raise CheckpointError(f"{spec_path}: not a fine-tuning run (no encoder/ranker section); pinfm score "
                              f"needs a run of `pinfm finetune`")
    from pinfm_rec.model.managed import legacy_spec_defaults

    if "model" in raw:  # saved before embedding.managed.id_hash existed: unmixed ids
        raw = {**raw, "model": legacy_spec_defaults(raw["model"])}
    return from_dict(FinetuneSpec, raw, where=spec_path)


def _encoder_arch(spec, shapes: Dict[str, Tuple[int, ...]]) -> Tuple[ModelSpec, Dict[str, int]]:
    """(architecture, vocabulary sizes) of the fine-tuned encoder."""
    from pinfm_rec.model.pretrained import read_pretrained

    enc = spec.encoder
    model_spec = spec.model
    if enc.checkpoint:
        if not os.path.isdir(enc.checkpoint):
            raise EncoderError(f"encoder.checkpoint={enc.checkpoint}: not found; the encoder's architecture is "
                               f"read from its spec.yaml (copy the export along with the run)")
        model_spec, _ = read_pretrained(enc.checkpoint)
    managed = model_spec.embedding.id_mode == "managed"
    vocab = {}
    for table, key in TABLE_VOCAB.items():
        # managed: the item table's rows are slots (a multiple of the run's buckets), taken as its size
        prefix = MANAGED_PREFIX.get(table, MANAGED_PREFIX["*"]) if managed else EC_PREFIX
        shape = shapes.get(f"{prefix}{table}.weight")
        if shape is None:
            raise CheckpointError(f"checkpoint has no encoder table {table} (model.{prefix}{table}.weight)")
        vocab[key] = shape[0]
    if managed:  # the slots the run saved (rounded up to its buckets), whatever the spec asked for
        model_spec.embedding.item.num_embeddings = vocab[TABLE_VOCAB["t_item"]]
    return model_spec, {k: vocab[k] for k in VOCAB_KEYS}


def build_model(spec, shapes: Dict[str, Tuple[int, ...]], device: torch.device) -> Tuple[RankerWithEncoder, int]:
    """The recipe's model (``train.finetune.build_finetune``), unsharded on ``device``, sized from
    the checkpoint's ``shapes``; returns (model, F)."""
    if DENSE_IN not in shapes or CAND_TABLE not in shapes:
        raise CheckpointError(f"checkpoint has no ranker ({DENSE_IN} / {CAND_TABLE}); not a fine-tuning checkpoint")
    enc_spec = spec.encoder
    encoder = None
    out_dim = 0
    if enc_spec.init != "none":
        model_spec, vocab = _encoder_arch(spec, shapes)
        encoder = PinFMEncoder(model_spec, enc_spec, vocab, device=device, dense_device=device)
        out_dim = enc_spec.out_dim
    num_items = shapes[CAND_TABLE][0]
    dense_in = shapes[DENSE_IN][1]
    ranker = build_ranker(spec.ranker, num_items, dense_in, device=device, dense_device=device)
    from pinfm_rec.train.finetune import ranker_id_mode

    id_mode = ranker_id_mode(spec.data.raw_ids, encoder.fm.spec.embedding.id_mode if encoder is not None else "error")
    model = RankerWithEncoder(ranker, encoder, spec.ranker.history_bag_len, freeze_encoder=enc_spec.freeze,
                              num_items=num_items, id_mode=id_mode)
    return model, dense_in - out_dim


def check_servable(spec, where: str = "spec") -> None:
    """SpecError for a fine-tuning spec the serving path would score differently from training:
    ``data.cold_item_min_count`` > 0 (training withholds cold candidates' ids; the serving path does
    not compute that mask, so every candidate would be scored with its id: train/serve skew)."""
    k = spec.data.cold_item_min_count
    if k:
        raise SpecError(f"{where}: data.cold_item_min_count={k}: the model was trained with cold candidates' ids "
                        "withheld, and pinfm score / export do not compute that mask yet (every candidate would be "
                        "scored with its id); serve a run trained with data.cold_item_min_count=0")


def load_finetuned(run: str, checkpoint: Optional[str] = None, device: str | torch.device = "cpu",
                   kernel: Optional[str] = None) -> Loaded:
    """The fine-tuned model of ``run`` (a ``pinfm finetune`` run dir, or a checkpoint dir) on
    ``device`` in eval mode. kernel: the encoder's DCAT kernel (None: the run's ``encoder.kernel``,
    with ``auto`` meaning triton on CUDA and the PyTorch reference on CPU)."""
    from pinfm_rec.train.checkpoint import load_model_state

    device = torch.device(device)
    ckpt, spec_path = resolve_checkpoint(run, checkpoint)
    spec = _read_spec(spec_path)
    check_servable(spec, spec_path)
    shapes = checkpoint_shapes(ckpt)
    model, num_dense = build_model(spec, shapes, device)
    load_model_state(ckpt, model)
    if model.encoder is not None:
        from pinfm_rec.model.managed import resort_slots

        resort_slots(model)  # managed tables saved by several ranks: one sorted slot state
        k = kernel or spec.encoder.kernel
        model.encoder.spec.kernel = "pytorch" if k == "auto" and device.type != "cuda" else k
    return Loaded(model.eval(), spec, ckpt, num_dense)
