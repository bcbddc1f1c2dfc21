"""Pretraining recipe (``Recipe`` of train/common.py): setup → loop → cleanup.

setup: process group, dataset (prepared once by rank 0), PinFM with its tables on ``meta``, DMP
sharding + fused embedding optimizer, dense AdamW, loaders, TensorBoard, resume from the newest
complete checkpoint. loop: ``Trainer`` epochs with valid eval each epoch and checkpoints every N
steps. cleanup: test eval, results.json, encoder export, barrier + destroy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict

import numpy as np
import torch

from pinfm_rec import console
from pinfm_rec.data.loader import build_loader
from pinfm_rec.data.prepare import DataSpec, DatasetInfo, prepare_dataset
from pinfm_rec.errors import SpecError
from pinfm_rec.features import vocab_sizes
from pinfm_rec.model.embedding import table_shardings
from pinfm_rec.model.pinfm import ModelSpec, PinFM
from pinfm_rec.parallel import DistEnv, ParallelSpec, build_optimizer, shard_model
from pinfm_rec.spec import bounds
from pinfm_rec.train.checkpoint import CheckpointSpec, export_encoder
from pinfm_rec.train.common import (  # noqa: F401  (re-exported: eval, finetune and tests import them here)
    Built,
    Recipe,
    run_dir_of,
    seed_everything,
    setup_logging,
)
from pinfm_rec.train.common import prepare_on_rank0 as _prepare_on_rank0
from pinfm_rec.train.evaluate import evaluate_retrieval
from pinfm_rec.train.init_from import init_from
from pinfm_rec.train.loop import TrainSpec


@dataclass
class PretrainSpec:
    """Top-level spec of ``pinfm pretrain`` / ``pinfm eval`` / ``pinfm smoke``."""

    name: str = "pretrain"
    seed: int = field(default=0, metadata=bounds(ge=0))
    run_dir: str = ""  # empty → runs/<name>
    tensorboard: bool = True
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    # continued pretraining: start from this encoder export / checkpoint (weights only, train/init_from.py)
    init_from: str = ""
    # at every checkpoint also write an incremental export to <run_dir>/deltas (train/delta_export.py;
    # Recipe.deltas, shared with the fine-tune recipe)
    delta_export: bool = False


# spec keys that define the train loader's rows and batches (a resumed (epoch, step) must mean the same)
LOADER_KEYS = ("data.source", "data.path", "data.max_len", "data.min_events", "data.batch_size",
               "data.train_windows", "seed")


def prepare_on_rank0(data: DataSpec, env: DistEnv) -> DatasetInfo:
    """Rank 0 converts/generates (cached); the others wait, then read the same cache."""
    return _prepare_on_rank0(prepare_dataset, data, env)


def build(spec: PretrainSpec, env: DistEnv, with_optimizer: bool = True) -> Built:
    if spec.data.max_len > spec.model.trunk.max_len:  # else it fails only when a long batch comes
        raise SpecError(f"data.max_len ({spec.data.max_len}) > model.trunk.max_len "
                         f"({spec.model.trunk.max_len}): histories would not fit the trunk's positions")
    info = prepare_on_rank0(spec.data, env)
    seed_everything(spec.seed)
    # train counts per dense id; with raw ids (data.raw_ids) the table rows are not dense ids
    counts = None
    if info.item_raw_ids is None:
        counts = torch.as_tensor(np.asarray(info.item_counts), dtype=torch.float64)
    model = PinFM(
        spec.model,
        info,  # vocabulary sizes (pinfm_rec.features.vocab_sizes)
        item_counts=counts,
        device=torch.device("meta"),
        dense_device=env.device,
    )
    dmp, _ = shard_model(model, spec.parallel, env, table_shardings(spec.model.embedding), spec.data.batch_size)
    if spec.init_from:  # a resumed run's own checkpoint, loaded after build, replaces these weights
        init_from(dmp, spec.init_from, spec.model)
    optimizer, dense_params, dense_groups = None, [], []
    if with_optimizer:
        optimizer = build_optimizer(dmp, spec.train.lr, spec.train.weight_decay)
        dense_opt = dict(optimizer.optimizers)["dense"]
        dense_groups = dense_opt.param_groups
        dense_params = [p for g in dense_groups for p in g["params"]]
    autocast = torch.bfloat16 if (env.device.type == "cuda" and spec.parallel.bf16) else None
    return Built(env, info, dmp, optimizer, dense_params, dense_groups, autocast)


def run_eval(b: Built, spec: PretrainSpec, split: str) -> Dict[str, float]:
    loader = build_loader(spec.data, b.info, split, rank=b.env.rank, world_size=b.env.world_size, seed=spec.seed)
    return evaluate_retrieval(
        b.model.module,
        console.track(loader, f"eval {split}", spec.train.eval_max_batches),
        b.info.num_items,
        b.env.device,
        ks=spec.train.eval_ks,
        max_batches=spec.train.eval_max_batches,
        autocast_dtype=b.autocast,
        exclude_history=spec.train.eval_exclude_history,
        catalogue=None if b.info.item_raw_ids is None else torch.as_tensor(b.info.item_raw_ids),
    )


class PretrainRecipe(Recipe):
    spec_cls = PretrainSpec
    loader_keys = LOADER_KEYS
    make_loader = staticmethod(build_loader)

    def build(self) -> Built:
        return build(self.spec, self.env)

    def evaluate(self, split: str) -> Dict[str, float]:
        return run_eval(self.b, self.spec, split)

    def _vocab(self) -> dict:
        return vocab_sizes(self.b.info)

    def train_state_extra(self) -> dict:
        return self._vocab()

    def finish(self) -> None:
        meta = {**self._vocab(), "step": self.model_step, "source": self.spec.data.source}
        export_encoder(os.path.join(self.run_dir, "encoder"), self.b.model, self.spec_yaml, meta, self.env.rank)


def pretrain(spec: PretrainSpec, force_cpu: bool = False) -> Dict[str, float]:
    """Run pretraining end to end; returns the final metrics (also in <run_dir>/results.json)."""
    return PretrainRecipe(spec, force_cpu).run()
