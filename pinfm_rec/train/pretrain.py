"""Pretraining recipe: setup → loop → cleanup.

setup: process group, dataset (prepared once by rank 0), PinFM with its tables on ``meta``, DMP
sharding + fused embedding optimizer, dense AdamW, loaders, TensorBoard, resume from the newest
complete checkpoint. loop: ``Trainer`` epochs with valid eval each epoch and checkpoints every N
steps. cleanup: test eval, results.json, encoder export, barrier + destroy.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch

from pinfm_rec.data.loader import build_loader
from pinfm_rec.data.prepare import DataSpec, DatasetInfo, prepare_dataset
from pinfm_rec.model.embedding import table_shardings
from pinfm_rec.model.pinfm import ModelSpec, PinFM
from pinfm_rec.parallel import (
    DistEnv,
    ParallelSpec,
    barrier,
    build_optimizer,
    init_distributed,
    shard_model,
    shutdown_distributed,
)
from pinfm_rec.spec import bounds, dump_spec
from pinfm_rec.train.checkpoint import (
    check_resume_compatible,
    CheckpointSpec,
    export_encoder,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from pinfm_rec.train.evaluate import evaluate_retrieval
from pinfm_rec.train.loop import LoopState, Trainer, TrainSpec, run_epochs
from pinfm_rec.train.tblog import TBLogger

logger = logging.getLogger("pinfm_rec")


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


# spec keys that define the train loader's rows and batches (a resumed (epoch, step) must mean the same)
LOADER_KEYS = ("data.source", "data.path", "data.max_len", "data.min_events", "data.batch_size",
               "data.train_windows", "seed")


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_dir_of(spec: PretrainSpec) -> str:
    return spec.run_dir or os.path.join("runs", spec.name)


def prepare_on_rank0(data: DataSpec, env: DistEnv) -> DatasetInfo:
    """Rank 0 converts/generates (cached); the others wait, then read the same cache."""
    if env.is_main:
        info = prepare_dataset(data)
    barrier()
    if not env.is_main:
        info = prepare_dataset(data)
    return info


@dataclass
class Built:
    env: DistEnv
    info: DatasetInfo
    model: torch.nn.Module  # DMP
    optimizer: object
    dense_params: list
    dense_groups: list
    autocast: Optional[torch.dtype]


def build(spec: PretrainSpec, env: DistEnv, with_optimizer: bool = True) -> Built:
    if spec.data.max_len > spec.model.trunk.max_len:  # else it fails only when a long batch comes
        raise ValueError(f"data.max_len ({spec.data.max_len}) > model.trunk.max_len "
                         f"({spec.model.trunk.max_len}): histories would not fit the trunk's positions")
    info = prepare_on_rank0(spec.data, env)
    seed_everything(spec.seed)
    counts = torch.as_tensor(np.asarray(info.item_counts), dtype=torch.float64)
    model = PinFM(
        spec.model,
        num_items=info.num_items,
        num_actions=info.num_actions,
        num_surfaces=info.num_surfaces,
        item_counts=counts,
        device=torch.device("meta"),
        dense_device=env.device,
    )
    dmp, _ = shard_model(model, spec.parallel, env, table_shardings(spec.model.embedding), spec.data.batch_size)
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
        loader,
        b.info.num_items,
        b.env.device,
        ks=spec.train.eval_ks,
        max_batches=spec.train.eval_max_batches,
        autocast_dtype=b.autocast,
    )


def pretrain(spec: PretrainSpec, force_cpu: bool = False) -> Dict[str, float]:
    """Run pretraining end to end; returns the final metrics (also in <run_dir>/results.json)."""
    wall0 = time.perf_counter()
    env = init_distributed(spec.parallel, force_cpu=force_cpu)
    setup_logging(env.rank)
    run_dir = run_dir_of(spec)
    ckpt_dir = spec.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    spec_yaml = dump_spec(spec)
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "spec.yaml"), "w") as f:
            f.write(spec_yaml)
        logger.info("resolved spec:\n%s", spec_yaml)
    b = build(spec, env)
    tb = TBLogger(run_dir, enabled=spec.tensorboard and env.is_main)
    tb.text("spec", spec_yaml)

    perf_log = []

    def log_fn(stats: Dict[str, float], step: int) -> None:
        tb.scalars(stats, step)
        perf_log.append({"step": step, **stats})
        if env.is_main:
            logger.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in stats.items()))

    train_loader = build_loader(spec.data, b.info, "train", rank=env.rank, world_size=env.world_size, seed=spec.seed)
    steps_per_epoch = len(train_loader)
    total = spec.train.epochs * steps_per_epoch
    if spec.train.max_steps:
        total = min(total, spec.train.max_steps)
    state = LoopState()
    loader_state, rng_state = None, None
    resume = resolve_resume(ckpt_dir, spec.checkpoint.resume)
    if resume:
        check_resume_compatible(resume, spec_yaml, ("model",), PretrainSpec, LOADER_KEYS)
        ts, loader_state, rng_state = load_checkpoint(resume, b.model, b.optimizer, env.rank)
        state.step, state.epoch = ts["step"], ts["epoch"]
        state.history = ts.get("history", [])
        logger.info("resumed from %s (step %d, epoch %d)", resume, state.step, state.epoch)

    trainer = Trainer(
        b.model, b.optimizer, b.dense_params, b.dense_groups, spec.train, env.device, env.world_size, log_fn, b.autocast
    )

    def checkpoint(st: LoopState, epoch_done: bool = False) -> None:
        ts = {"step": st.step, "epoch": st.epoch + (1 if epoch_done else 0), "world_size": env.world_size,
              "history": st.history, "num_items": b.info.num_items, "num_actions": b.info.num_actions,
              "num_surfaces": b.info.num_surfaces}
        lstate = None if epoch_done else train_loader.state_dict()
        save_checkpoint(ckpt_dir, st.step, b.model, b.optimizer, lstate, ts, spec_yaml, env.rank,
                        spec.checkpoint.keep_last)

    def on_step(st: LoopState) -> None:
        if spec.checkpoint.every_steps and st.step % spec.checkpoint.every_steps == 0:
            checkpoint(st)

    logger.info("train: %d steps/epoch x %d epochs (total %d steps) on %d rank(s), device %s",
                steps_per_epoch, spec.train.epochs, total, env.world_size, env.device)
    def eval_valid() -> Dict[str, float]:
        m = run_eval(b, spec, "valid")
        tb.scalars({f"valid/{k}": v for k, v in m.items() if k != "count"}, state.step)
        return m

    def on_epoch_end(finished: bool) -> None:
        # every finished epoch, and the last (partial) epoch when train.max_steps stops it: the end
        # of a run always leaves a checkpoint, whatever checkpoint.every_steps is
        checkpoint(state, epoch_done=finished)

    run_epochs(trainer, train_loader, state, total, on_step=on_step, eval_valid=eval_valid,
               on_epoch_end=on_epoch_end, loader_state=loader_state, rng_state=rng_state)

    valid = run_eval(b, spec, "valid")
    test = run_eval(b, spec, "test")
    results = {f"valid_{k}": v for k, v in valid.items()}
    results.update({f"test_{k}": v for k, v in test.items()})
    results.update({"steps": state.step, "world_size": env.world_size, "device": str(env.device),
                    "wall_s": time.perf_counter() - wall0, "perf": perf_log})
    tb.scalars({f"valid/{k}": v for k, v in valid.items() if k != "count"}, state.step)
    tb.scalars({f"test/{k}": v for k, v in test.items() if k != "count"}, state.step)
    if env.is_main:
        logger.info("final %s", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}))
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    meta = {"num_items": b.info.num_items, "num_actions": b.info.num_actions,
            "num_surfaces": b.info.num_surfaces, "step": state.step, "source": spec.data.source}
    export_encoder(os.path.join(run_dir, "encoder"), b.model, spec_yaml, meta, env.rank)
    tb.close()
    shutdown_distributed()
    return results
