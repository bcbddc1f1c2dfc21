"""train.eval_every_steps: valid evaluated inside epochs, the best step selected and checkpointed,
early stopping counted over those evaluations, a step never evaluated twice."""
from __future__ import annotations

import json

import pytest
import torch

from pinfm_rec.errors import SpecError
from pinfm_rec.spec import load_spec
from pinfm_rec.train.loop import LoopState, Trainer, TrainSpec, run_epochs


class _Batch:
    """What Trainer.run_epoch reads of a batch."""

    def __init__(self, i: int) -> None:
        self.x = torch.full((2, 1), float(i))
        self.timestamps = torch.zeros(3)
        self.batch_size = 2
        self.request_ids = torch.arange(2)

    def to(self, device, non_blocking=False):
        return self


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(1, 1)

    def forward(self, batch):
        return {"loss": self.w(batch.x).pow(2).mean()}


def _run(spec: TrainSpec, valid_by_step, steps_per_epoch: int = 10):
    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = Trainer(model, opt, list(model.parameters()), opt.param_groups, spec, torch.device("cpu"), 1,
                      log_fn=lambda *a: None)
    state = LoopState()
    seen, step_evals, epoch_ends = [], [], []

    def eval_valid():
        seen.append(state.step)
        return {"gauc": valid_by_step(state.step), "count": 1.0}

    loader = [_Batch(i) for i in range(steps_per_epoch)]
    total = spec.epochs * steps_per_epoch
    run_epochs(trainer, loader, state, total, on_step=None, eval_valid=eval_valid,
               on_epoch_end=lambda finished: epoch_ends.append((state.step, finished)),
               on_step_eval=lambda st: step_evals.append((st.step, st.best_step)))
    return state, seen, step_evals, epoch_ends


def test_eval_every_steps_picks_the_best_step_and_stops():
    """valid GAUC peaks at step 12 (inside epoch 2); evaluations every 4 steps: 4 8 10(epoch end) 12
    16 20(epoch end, also a multiple of 4: evaluated once) 24 ... patience 3 stops at step 24."""
    peak = {4: 0.55, 8: 0.57, 10: 0.58, 12: 0.60, 16: 0.59, 20: 0.58, 24: 0.56}
    spec = TrainSpec(epochs=4, warmup_steps=0, eval_every_epochs=1, eval_every_steps=4, patience=3,
                     early_stop_metric="gauc")
    state, seen, step_evals, epoch_ends = _run(spec, lambda s: peak.get(s, 0.5))
    assert seen == [4, 8, 10, 12, 16, 20, 24]  # step 20 once, though it ends epoch 2 and is a multiple of 4
    assert (state.best_step, state.best_value, state.best_epoch) == (12, 0.60, 2)
    assert state.stopped and state.step == 24  # no step after the evaluation that stopped it
    assert [h["step"] for h in state.history] == seen
    assert [h["epoch"] for h in state.history] == [1, 1, 1, 2, 2, 2, 3]
    # on_step_eval after every step evaluation (not the epoch-end one at step 10), best_step already updated
    assert step_evals == [(4, 4), (8, 8), (12, 12), (16, 12), (20, 12), (24, 12)]
    assert epoch_ends == [(10, True), (20, True), (24, False)]  # epoch 3 cut short by the stop


def test_eval_every_steps_without_epoch_evaluations_evaluates_the_end():
    """eval_every_epochs=0: only the step evaluations, plus the last step when early stopping is on."""
    spec = TrainSpec(epochs=2, warmup_steps=0, eval_every_epochs=0, eval_every_steps=6, patience=5,
                     early_stop_metric="gauc")
    state, seen, _, _ = _run(spec, lambda s: s / 100.0)
    assert seen == [6, 12, 18, 20] and state.best_step == 20 and not state.stopped
    # without patience nothing is selected: evaluations are only logged; the end is evaluated by the recipe
    state, seen, _, _ = _run(TrainSpec(epochs=2, warmup_steps=0, eval_every_epochs=0, eval_every_steps=6),
                             lambda s: 0.5)
    assert seen == [6, 12, 18] and state.best_step == -1


def test_patience_accepts_step_evaluations():
    from pinfm_rec.train.finetune import FinetuneSpec

    spec = load_spec(FinetuneSpec, None, ["train.patience=2", "train.eval_every_epochs=0",
                                          "train.eval_every_steps=25"])
    assert spec.train.eval_every_steps == 25
    with pytest.raises(SpecError, match=r"train\.patience.*eval_every_epochs >= 1 or train\.eval_every_steps"):
        load_spec(FinetuneSpec, None, ["train.patience=2", "train.eval_every_epochs=0"])
    with pytest.raises(SpecError, match=r"train\.eval_every_steps' must be >= 0"):
        load_spec(FinetuneSpec, None, ["train.eval_every_steps=-1"])


@pytest.mark.slow
def test_finetune_tests_the_best_step_checkpoint(tmp_path):
    """A ranker-only fine-tuning run evaluated every 5 steps, stopping on 'count' (it never improves
    after the first evaluation): best step 5, stop at step 20 (patience 3) inside epoch 2; results report
    step 5's valid metrics, its checkpoint outlives keep_last=1 and is the model tested."""
    from pinfm_rec.train.finetune import FinetuneRecipe, FinetuneSpec

    over = [f"run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache", "encoder.init=none", "tensorboard=false",
            "data.synthetic.num_requests=400", "train.epochs=3", "train.eval_every_steps=5", "train.patience=3",
            "train.early_stop_metric=count", "checkpoint.keep_last=1"]
    spec = load_spec(FinetuneSpec, "specs/finetune/synthetic-tiny.yaml", over)
    recipe = FinetuneRecipe(spec, force_cpu=True)
    res = recipe.run()
    assert recipe.steps_per_epoch == 10  # 320 train requests / 32
    hist = res["history"]
    assert [h["step"] for h in hist] == [5, 10, 15, 20] and [h["epoch"] for h in hist] == [1, 1, 2, 2]
    assert res["stopped_early"] and res["steps"] == 20 and (res["best_step"], res["best_epoch"]) == (5, 1)
    assert res["valid_gauc"] == hist[0]["valid_gauc"] and res["valid_gauc"] != hist[-1]["valid_gauc"]
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_00000005", "step_00000020"]
    assert json.loads((ck / "step_00000005" / "train_state.json").read_text())["early_stop"]["best_step"] == 5
    assert recipe.model_step == 5  # the model tested was reloaded from step 5's checkpoint
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_gauc"] == res["test_gauc"] and saved["best_step"] == 5
