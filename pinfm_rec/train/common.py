"""What the recipes share (torchtune style): ``Recipe.run`` = setup → train → cleanup.

A recipe (pretrain.py, finetune.py) subclasses ``Recipe`` and fills in the parts that differ:
``build`` (data + sharded model + optimizer), ``train_loader``, ``evaluate(split)`` and optional
``train_state_extra`` / ``result_extra`` / ``finish`` (e.g. the encoder export). Everything else is
written once here: process group and logging, the run directory (spec.yaml, TensorBoard), resume
from the newest checkpoint, the step/epoch loop with its checkpoint policy, the final valid/test
evaluation and results.json.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from pinfm_rec import console
from pinfm_rec.parallel import DistEnv, barrier, init_distributed, shutdown_distributed
from pinfm_rec.spec import dump_spec
from pinfm_rec.train import rundir
from pinfm_rec.train.checkpoint import (
    check_resume_compatible,
    load_checkpoint,
    load_model_state,
    resolve_resume,
    save_checkpoint,
)
from pinfm_rec.train.delta_export import RecipeDeltas
from pinfm_rec.train.loop import LoopState, Trainer, run_epochs
from pinfm_rec.train.preempt import PreemptionGuard, preempted
from pinfm_rec.train.tblog import TBLogger

logger = logging.getLogger("pinfm_rec")


def setup_logging(rank: int) -> None:
    if console.configured():  # the CLI routes records: console + the run's log.txt (pinfm_rec/console.py)
        return
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


def run_dir_of(spec) -> str:
    """``spec.run_dir`` or ``runs/<spec.name>``."""
    return spec.run_dir or os.path.join("runs", spec.name)


def ckpt_dir_of(spec) -> str:
    return spec.checkpoint.dir or os.path.join(run_dir_of(spec), "checkpoints")


def prepare_on_rank0(prepare: Callable[[object], object], data, env: DistEnv):
    """Rank 0 converts/generates (cached); the others wait, then read the same cache."""
    if env.is_main:
        info = prepare(data)
    barrier()
    if not env.is_main:
        info = prepare(data)
    return info


@dataclass
class Built:
    """What a recipe's ``build`` returns: the data description and the sharded model."""

    env: DistEnv
    info: object  # DatasetInfo | RankingInfo
    model: torch.nn.Module  # DMP
    optimizer: object
    dense_params: list
    dense_groups: list
    autocast: Optional[torch.dtype]


def _round(results: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()
            if k not in ("perf", "history")}


class Recipe:
    """setup → train → cleanup of one training run; subclasses provide the model and data parts."""

    spec_cls: type = object
    compat_sections: tuple = ("model",)  # spec sections a resumed checkpoint must match
    loader_keys: tuple = ()  # single keys defining the train loader's rows/batches
    checkpoint_every_epoch: bool = True  # else only when every_steps is set, or at the run's end

    def __init__(self, spec, force_cpu: bool = False) -> None:
        self.spec = spec
        self.force_cpu = force_cpu
        self.perf: List[dict] = []

    # ---- the parts a recipe provides ----
    def build(self) -> Built:
        raise NotImplementedError

    # make_loader(data_spec, info, split, *, rank, world_size, seed): the recipe's loader builder
    make_loader: Callable = staticmethod(lambda *a, **k: None)

    def train_loader(self):
        return self.make_loader(self.spec.data, self.b.info, "train", rank=self.env.rank,
                                world_size=self.env.world_size, seed=self.spec.seed)

    def evaluate(self, split: str) -> Dict[str, float]:
        raise NotImplementedError

    def train_state_extra(self) -> dict:
        return {}

    def result_extra(self) -> dict:
        return {}

    def describe(self, steps_per_epoch: int, total: int) -> str:
        return (f"train: {steps_per_epoch} steps/epoch x {self.spec.train.epochs} epochs (total {total} steps) "
                f"on {self.env.world_size} rank(s), device {self.env.device}")

    def finish(self) -> None:
        """After results.json (collective): e.g. export the encoder."""

    # ---- shared ----
    def run(self) -> Dict[str, float]:
        self.wall0 = time.perf_counter()
        self.lock, self.last_ckpt = None, (-1, "")
        try:
            with PreemptionGuard() as self.guard:
                self.setup()
                self.train()
                return self.cleanup()
        finally:
            if self.lock is not None:
                self.lock.release()

    def setup(self) -> None:
        spec = self.spec
        self.env = env = init_distributed(spec.parallel, force_cpu=self.force_cpu)
        setup_logging(env.rank)
        self.run_dir, self.ckpt_dir = run_dir_of(spec), ckpt_dir_of(spec)
        self.spec_yaml = dump_spec(spec)
        # before anything is written to the run dir: own it (lock), settle resume=false, fix the run id
        self.lock, self.run_id = rundir.claim(self.run_dir, self.ckpt_dir, spec.checkpoint.resume,
                                              spec.checkpoint.on_existing, env.is_main)
        if env.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "spec.yaml"), "w") as f:
                f.write(self.spec_yaml)
            logger.info("resolved spec:\n%s", self.spec_yaml)
        self.b = self.build()
        # delta_export=true: an incremental export (base, then changed rows) at every checkpoint
        self.deltas = RecipeDeltas(os.path.join(self.run_dir, "deltas"), bool(getattr(spec, "delta_export", False)))
        self.loader = self.train_loader()
        self.steps_per_epoch = len(self.loader)
        total = spec.train.epochs * self.steps_per_epoch
        self.total = min(total, spec.train.max_steps) if spec.train.max_steps else total
        self.state = LoopState()
        self.loader_state, self.rng_state = None, None
        resume = resolve_resume(self.ckpt_dir, spec.checkpoint.resume, self.run_id)
        if resume:
            check_resume_compatible(resume, self.spec_yaml, self.compat_sections, self.spec_cls, self.loader_keys)
            ts, self.loader_state, self.rng_state = load_checkpoint(resume, self.b.model, self.b.optimizer, env.rank)
            self.state.step, self.state.epoch = ts["step"], ts["epoch"]
            self.state.history = ts.get("history", [])
            self.state.load_early_stop(ts.get("early_stop"))
            console.echo(f"resumed from {resume} (step {self.state.step}, epoch {self.state.epoch})")
        # a resumed run drops the events its previous attempt logged after the checkpoint's step (a
        # fresh start over the events of an attempt that died before its first checkpoint: all of them)
        tb_dir = os.path.join(self.run_dir, "tb")
        leftovers = not resume and os.path.isdir(tb_dir) and bool(os.listdir(tb_dir))
        self.tb = TBLogger(self.run_dir, enabled=spec.tensorboard and env.is_main,
                           purge_step=self.state.step if resume else (0 if leftovers else None))
        self.tb.text("spec", self.spec_yaml)

    def log_fn(self, stats: Dict[str, float], step: int) -> None:
        self.tb.scalars(stats, step)
        self.perf.append({"step": step, **stats})
        if self.env.is_main:
            logger.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        self.bar.set_postfix(**{"loss": stats.get("train/loss", float("nan")),
                                "ex/s": stats.get("perf/examples_per_s", float("nan"))})

    def checkpoint(self, st: LoopState, epoch_done: bool = False) -> str:
        ts = {"step": st.step, "epoch": st.epoch + (1 if epoch_done else 0), "world_size": self.env.world_size,
              "history": st.history, "early_stop": st.early_stop_state(), **self.train_state_extra()}
        lstate = None if epoch_done else self.loader.state_dict()
        path = save_checkpoint(self.ckpt_dir, st.step, self.b.model, self.b.optimizer, lstate, ts,
                               self.spec_yaml, self.env.rank, self.spec.checkpoint.keep_last, run_id=self.run_id,
                               protect=(st.best_step,))  # the best-valid model outlives keep_last
        self.last_ckpt = (st.step, path)
        self.deltas.after_checkpoint(self.b.model, st.step)
        return path

    def train(self) -> None:
        spec, b, state = self.spec, self.b, self.state
        trainer = Trainer(b.model, b.optimizer, b.dense_params, b.dense_groups, spec.train, self.env.device,
                          self.env.world_size, self.log_fn, b.autocast)

        def on_step(st: LoopState) -> None:
            self.bar.update()
            if spec.checkpoint.every_steps and st.step % spec.checkpoint.every_steps == 0 \
                    and self.last_ckpt[0] != st.step:  # (a new best of this step is saved already)
                self.checkpoint(st)
            signum = self.guard.agreed(self.env.device)  # collective: every rank stops after this step
            if signum:
                done = self.last_ckpt[1] if self.last_ckpt[0] == st.step else self.checkpoint(st)
                raise preempted(signum, st.step, done)

        def eval_valid() -> Dict[str, float]:
            m = self.evaluate("valid")
            self.tb.scalars(_scalars("valid", m), state.step)
            at = f" step {state.step}" if spec.train.eval_every_steps else ""
            console.echo(f"epoch {state.epoch + 1}/{spec.train.epochs}{at} valid: {console.metrics_line(m)}")
            return m

        def on_step_eval(st: LoopState) -> None:
            # train.eval_every_steps with early stopping: a new best model is checkpointed now (the
            # checkpoint of the best step is never pruned; cleanup tests it)
            if spec.train.patience and st.best_step == st.step:
                self.checkpoint(st)

        def on_epoch_end(finished: bool) -> None:
            # the end of a run always leaves a checkpoint (a partial epoch cut by max_steps too)
            last = not finished or state.epoch + 1 == spec.train.epochs or state.stopped
            if self.checkpoint_every_epoch or spec.checkpoint.every_steps or spec.train.patience or last:
                self.checkpoint(state, epoch_done=finished)

        console.echo(self.describe(self.steps_per_epoch, self.total))
        self.bar = console.Progress(self.total, "train", initial=state.step)
        try:
            run_epochs(trainer, self.loader, state, self.total, on_step=on_step, eval_valid=eval_valid,
                       on_epoch_end=on_epoch_end, loader_state=self.loader_state, rng_state=self.rng_state,
                       on_step_eval=on_step_eval)
        finally:
            self.bar.close()

    def best_valid(self) -> Optional[Dict[str, float]]:
        """Early stopping: load the best-valid checkpoint's model (unless the current model is it)
        and return its recorded valid metrics; None when no evaluation happened."""
        state = self.state
        if state.best_step < 0:
            return None
        if state.best_step != state.step:
            path = os.path.join(self.ckpt_dir, f"step_{state.best_step:08d}")
            load_model_state(path, self.b.model)
            self.model_step = state.best_step
            console.echo(f"best valid {self.spec.train.early_stop_metric} at epoch {state.best_epoch} "
                         f"(step {state.best_step}): testing and exporting {path}")
        entry = next(h for h in reversed(state.history) if h["step"] == state.best_step)
        return {k[len("valid_"):]: v for k, v in entry.items() if k.startswith("valid_")}

    def cleanup(self) -> Dict[str, float]:
        env, state = self.env, self.state
        self.model_step = state.step  # the step of the model tested and exported (best_valid may change it)
        valid = self.best_valid() if self.spec.train.patience else None
        valid = valid if valid is not None else self.evaluate("valid")
        test = self.evaluate("test")  # read once, on the model that valid selected
        results = {f"valid_{k}": v for k, v in valid.items()}
        results.update({f"test_{k}": v for k, v in test.items()})
        results.update({"steps": state.step, "world_size": env.world_size, "device": str(env.device),
                        **self.result_extra(), "wall_s": time.perf_counter() - self.wall0,
                        "history": state.history, "perf": self.perf})
        if self.spec.train.patience:
            results.update({"best_epoch": state.best_epoch, "best_step": state.best_step,
                            "stopped_early": state.stopped})
        self.tb.scalars(_scalars("valid", valid), state.step)
        self.tb.scalars(_scalars("test", test), state.step)
        if env.is_main:
            logger.info("final %s", json.dumps(_round(results)))
            with open(os.path.join(self.run_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
        self.finish()
        self.tb.close()
        shutdown_distributed()
        return results


def _scalars(prefix: str, metrics: Dict[str, float]) -> Dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if k not in ("count", "requests")}
