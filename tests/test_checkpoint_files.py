"""Checkpoint directory protocol (single process): complete markers, re-saving a step, keep_last."""
import os

import torch

from pinfm_rec.train.checkpoint import complete_checkpoints, latest_checkpoint, save_checkpoint


def _save(d, step, model, value, keep_last=2):
    with torch.no_grad():
        model.weight.fill_(value)
    return save_checkpoint(str(d), step, model, None, None, {"step": step}, "name: t\n", 0, keep_last)


def test_resaving_a_step_replaces_it_and_a_killed_resave_keeps_the_old_copy(tmp_path):
    model = torch.nn.Linear(2, 2, bias=False)
    _save(tmp_path, 5, model, 1.0)
    path = _save(tmp_path, 5, model, 2.0)  # the same step again (every_steps + end of run)
    assert sorted(os.listdir(tmp_path)) == ["step_00000005"] and latest_checkpoint(str(tmp_path)) == path
    # a kill between "old copy aside" and "new copy in place": the old copy is still found
    os.rename(path, path + ".old")
    assert complete_checkpoints(str(tmp_path)) == [(5, path + ".old")]
    # the next save cleans up: one complete step_5 again, no .old left behind
    _save(tmp_path, 5, model, 3.0)
    assert sorted(os.listdir(tmp_path)) == ["step_00000005"]
    # keep_last prunes older steps; an incomplete directory (no COMPLETE) is never listed
    _save(tmp_path, 6, model, 4.0, keep_last=1)
    os.makedirs(tmp_path / "step_00000009")
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [6]
