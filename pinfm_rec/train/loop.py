"""The shared step loop: forward → NaN guard → backward (fused embedding update) → clip → step.

Recipes (pretrain, finetune) build the pieces and call ``run_epochs`` with a ``Trainer``; the loop
itself knows nothing about data sources or sharding.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch

from pinfm_rec.parallel import all_reduce_sum
from pinfm_rec.spec import FieldError, SpecError, bounds
from pinfm_rec.train.checkpoint import set_rng_state
from pinfm_rec.train.phases import PhaseTimer

logger = logging.getLogger(__name__)


@dataclass
class TrainSpec:
    """Optimisation schedule (owned by train/loop.py)."""

    epochs: int = field(default=10, metadata=bounds(ge=1))
    # stop after this many steps in total (0 = run all epochs)
    max_steps: int = field(default=0, metadata=bounds(ge=0))
    lr: float = field(default=1e-3, metadata=bounds(gt=0))  # dense AdamW
    weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    warmup_steps: int = field(default=100, metadata=bounds(ge=0))
    # cosine decay to lr * min_lr_ratio at the last step
    min_lr_ratio: float = field(default=0.1, metadata=bounds(ge=0, le=1))
    grad_clip: float = field(default=1.0, metadata=bounds(ge=0))  # 0 = off
    log_every: int = field(default=20, metadata=bounds(ge=1))
    eval_every_epochs: int = field(default=1, metadata=bounds(ge=0))  # 0 = only at the end
    # also evaluate valid every this many steps (0 = off), inside epochs: finer early stopping and
    # best-valid selection (patience counts these evaluations too; a step evaluated once is never
    # evaluated again at its epoch's end). With patience every new best is checkpointed.
    eval_every_steps: int = field(default=0, metadata=bounds(ge=0))
    eval_ks: List[int] = field(default_factory=lambda: [10, 50, 200], metadata=bounds(ge=1))
    eval_max_batches: int = field(default=0, metadata=bounds(ge=0))  # 0 = the whole split
    # retrieval eval: rank the target among all items except the user's history items
    # (generative-recommenders' protocol); false = among all items (SASRec's, the default)
    eval_exclude_history: bool = False
    # early stopping: stop after this many valid evaluations without a better early_stop_metric
    # (0 = off). When on, the best-valid model is kept (its checkpoint is never pruned) and is the
    # one evaluated on test and exported at the end.
    patience: int = field(default=0, metadata=bounds(ge=0))
    early_stop_metric: str = "ndcg@10"  # a valid metric's name (ranking: gauc, auc, ne, logloss, ...)

    def __post_init__(self) -> None:
        if self.patience > 0 and self.eval_every_epochs == 0 and self.eval_every_steps == 0:
            raise FieldError("patience", f"{self.patience} needs train.eval_every_epochs >= 1 or "
                                         "train.eval_every_steps >= 1 (early stopping counts valid evaluations)")


LOWER_IS_BETTER = ("logloss", "ne", "loss")


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss is NaN/inf; names the step and the requests of the batch."""


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    tokens: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    # early stopping (saved in every checkpoint's train_state.json as "early_stop")
    best_value: Optional[float] = None
    best_step: int = -1
    best_epoch: int = 0
    bad_evals: int = 0
    stopped: bool = False  # early-stopped: a resumed run trains no further

    EARLY_KEYS = ("best_value", "best_step", "best_epoch", "bad_evals", "stopped")

    def early_stop_state(self) -> dict:
        return {k: getattr(self, k) for k in self.EARLY_KEYS}

    def load_early_stop(self, saved: Optional[dict]) -> None:
        for k, v in (saved or {}).items():
            if k in self.EARLY_KEYS:
                setattr(self, k, v)


def update_early_stop(state: LoopState, metrics: Dict[str, float], spec: TrainSpec) -> bool:
    """After a valid evaluation at step ``state.step`` (in or at the end of epoch ``state.epoch``): track the best
    ``spec.early_stop_metric``; True when ``spec.patience`` evaluations in a row did not improve it."""
    name = spec.early_stop_metric
    if name not in metrics:
        raise SpecError(f"train.early_stop_metric: '{name}' is not a valid metric of this run; "
                        f"one of {sorted(k for k in metrics if k not in ('count', 'requests'))}")
    value = float(metrics[name])
    lower = name in LOWER_IS_BETTER or name.endswith("loss")
    if state.best_value is None or (value < state.best_value if lower else value > state.best_value):
        state.best_value, state.best_step, state.best_epoch, state.bad_evals = value, state.step, state.epoch + 1, 0
        return False
    state.bad_evals += 1
    if state.bad_evals >= spec.patience:
        state.stopped = True
        logger.info("early stop at step %d (epoch %d): valid %s did not improve for %d evaluations "
                    "(best %.4f at step %d, epoch %d)", state.step, state.epoch + 1, name, state.bad_evals,
                    state.best_value, state.best_step, state.best_epoch)
    return state.stopped


class Trainer:
    """Runs epochs of steps with logging, periodic evaluation and checkpoints.

    model: the DMP-wrapped module whose forward(batch) returns a dict with a scalar "loss".
    dense_params: parameters to clip (the fused embedding optimizer updates tables in backward).
    dense_groups: param groups whose lr follows the schedule.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer,
        dense_params: List[torch.nn.Parameter],
        dense_groups: List[dict],
        spec: TrainSpec,
        device: torch.device,
        world_size: int,
        log_fn: Callable[[Dict[str, float], int], None],
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.dense_params = dense_params
        self.dense_groups = dense_groups
        self.base_lrs = [g["lr"] for g in dense_groups]
        self.spec = spec
        self.device = device
        self.world_size = world_size
        self.log_fn = log_fn
        self.autocast_dtype = autocast_dtype
        self.phases = PhaseTimer(model, device)

    def set_lr(self, step: int, total: int) -> float:
        f = lr_factor(step, total, self.spec.warmup_steps, self.spec.min_lr_ratio)
        for g, base in zip(self.dense_groups, self.base_lrs):
            g["lr"] = base * f
        return self.base_lrs[0] * f if self.base_lrs else 0.0

    def train_step(self, batch, state: LoopState, total_steps: int) -> Dict[str, torch.Tensor]:
        with self.phases.phase("step"):  # step-time breakdown (train/phases.py; off unless PINFM_PHASE_TIMES=1)
            return self._train_step(batch, state, total_steps)

    def _train_step(self, batch, state: LoopState, total_steps: int) -> Dict[str, torch.Tensor]:
        lr = self.set_lr(state.step, total_steps)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None), \
                self.phases.phase("forward"):
            out = self.model(batch)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()).all():
            ids = batch.request_ids[:8].tolist()
            parts = {k: float(v) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
            raise NonFiniteLossError(
                f"non-finite loss at step {state.step} (epoch {state.epoch}): {parts}; "
                f"first request ids of the batch: {ids}"
            )
        with self.phases.phase("backward"):
            loss.backward()
        with self.phases.phase("optimizer"):
            if self.spec.grad_clip > 0 and self.dense_params:
                torch.nn.utils.clip_grad_norm_(self.dense_params, self.spec.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        out["lr"] = torch.tensor(lr)
        return out

    def run_epoch(
        self,
        batches: Iterable,
        state: LoopState,
        total_steps: int,
        on_step: Optional[Callable[[LoopState], None]] = None,
        rng_state: Optional[dict] = None,
        rng_before_iter: bool = False,
    ) -> bool:
        """One pass over ``batches``. Returns False when max_steps or an early stop inside the epoch
        (``state.stopped``, set by an ``eval_every_steps`` evaluation in ``on_step``) cut it short.

        rng_state: a checkpoint's RNG state, restored where it was captured relative to the creation
        of the loader iterator (which draws from the global RNG): after it for a mid-epoch checkpoint,
        before it (``rng_before_iter``) for one written between epochs, so a resumed run continues the
        exact random stream either way.
        """
        self.model.train()
        t0 = time.perf_counter()
        win_tokens, win_rows, win_steps = 0, 0, 0
        acc: Dict[str, float] = {}
        if rng_state is not None and rng_before_iter:
            set_rng_state(rng_state)
        it = iter(batches)
        if rng_state is not None and not rng_before_iter:
            set_rng_state(rng_state)
        for batch in it:
            if self.spec.max_steps and state.step >= self.spec.max_steps:
                return False
            if state.stopped:  # early-stopped by an evaluation inside the epoch (eval_every_steps)
                return False
            batch = batch.to(self.device, non_blocking=True)
            out = self.train_step(batch, state, total_steps)
            state.step += 1
            n_tok = int(batch.timestamps.numel())
            win_tokens += n_tok
            win_rows += batch.batch_size
            win_steps += 1
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    acc[k] = acc.get(k, 0.0) + float(v.detach())
            if state.step % self.spec.log_every == 0:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                counts = all_reduce_sum(torch.tensor([win_tokens, win_rows], dtype=torch.float64, device=self.device))
                stats = {f"train/{k}": v / win_steps for k, v in acc.items() if k != "lr"}
                stats["train/lr"] = acc.get("lr", 0.0) / win_steps
                stats["perf/tokens_per_s"] = float(counts[0]) / dt
                stats["perf/examples_per_s"] = float(counts[1]) / dt
                stats["perf/step_ms"] = 1000 * dt / win_steps
                stats["perf/peak_mem_mb"] = peak_memory_mb(self.device)
                stats.update(self.phases.summary())
                stats["epoch"] = state.epoch
                self.log_fn(stats, state.step)
                acc, win_tokens, win_rows, win_steps = {}, 0, 0, 0
                t0 = time.perf_counter()
            if on_step is not None:
                on_step(state)
        return True


def set_loader_epoch(loader, epoch: int) -> None:
    """Tell the loader (or its sampler) which epoch's order to produce."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def run_epochs(
    trainer: Trainer,
    loader,
    state: LoopState,
    total_steps: int,
    *,
    on_step: Optional[Callable[[LoopState], None]],
    eval_valid: Callable[[], Dict[str, float]],
    on_epoch_end: Callable[[bool], None],
    loader_state: Optional[dict] = None,
    rng_state: Optional[dict] = None,
    on_step_eval: Optional[Callable[[LoopState], None]] = None,
) -> None:
    """The epoch loop shared by the recipes, from ``state.epoch`` to ``trainer.spec.epochs``.

    A resumed mid-epoch ``loader_state`` is restored for the first epoch (else the loader's epoch
    is set), ``rng_state`` where it was captured (``Trainer.run_epoch``). After every ``eval_every_epochs`` finished
    epochs except the last, ``eval_valid()`` runs and its metrics join ``state.history``. Then
    ``on_epoch_end(finished)`` applies the recipe's checkpoint policy; an epoch cut short by
    ``max_steps`` (finished False) ends the loop. With ``patience`` the last epoch is evaluated too
    and ``update_early_stop`` may end the loop early (``state.stopped``).

    ``eval_every_steps`` > 0: valid is also evaluated after every that many steps (before
    ``on_step``), then ``on_step_eval(state)`` runs (the recipe checkpoints a new best there); an
    early stop there ends the epoch after that step. A step is evaluated once: an epoch whose last
    step was just evaluated is not evaluated again.
    """
    spec = trainer.spec
    early = spec.patience > 0
    if state.stopped:
        return

    def validate() -> None:
        m = eval_valid()
        state.history.append({"epoch": state.epoch + 1, "step": state.step, **{f"valid_{k}": v for k, v in m.items()}})
        logger.info("epoch %d step %d valid %s", state.epoch + 1, state.step,
                    json.dumps({k: round(v, 4) for k, v in m.items()}))
        if early:
            update_early_stop(state, m, spec)

    def evaluated_now() -> bool:
        return bool(state.history) and state.history[-1].get("step") == state.step

    step_hook = on_step
    if spec.eval_every_steps:
        def step_hook(st: LoopState) -> None:
            if st.step % spec.eval_every_steps == 0 and not evaluated_now():
                validate()
                if on_step_eval is not None:
                    on_step_eval(st)
            if on_step is not None:
                on_step(st)
    between_epochs = loader_state is None  # a checkpoint written at an epoch's end has no position
    for epoch in range(state.epoch, spec.epochs):
        state.epoch = epoch
        if loader_state is not None:
            loader.load_state_dict(loader_state)
            loader_state = None
        else:
            set_loader_epoch(loader, epoch)
        finished = trainer.run_epoch(loader, state, total_steps, step_hook, rng_state=rng_state,
                                     rng_before_iter=between_epochs)
        rng_state = None
        ev = spec.eval_every_epochs
        last = epoch + 1 == spec.epochs
        due = (bool(ev) and (epoch + 1) % ev == 0) or (early and last)
        # without early stopping the end evaluates the last model
        if finished and due and (early or not last) and not state.stopped and not evaluated_now():
            validate()
        on_epoch_end(finished)
        if not finished or state.stopped:
            break
