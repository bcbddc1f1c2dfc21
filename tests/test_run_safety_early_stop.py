"""Early stopping (issue 14): patience counts valid evaluations without improvement; the best-valid
model is kept (never pruned), tested once and exported; the history says which epoch was best."""
import json
import os

import pytest

from pinfm_rec.errors import SpecError
from pinfm_rec.spec import load_spec
from pinfm_rec.train.loop import LoopState, TrainSpec, update_early_stop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "specs", "pretrain", "synthetic-tiny.yaml")


def test_patience_counts_evaluations_without_improvement():
    spec = TrainSpec(patience=2, early_stop_metric="ndcg@10")
    st = LoopState()
    seq = [(0.10, False), (0.12, False), (0.11, False), (0.12, True)]  # equal is no improvement
    for epoch, (v, stop) in enumerate(seq):
        st.epoch, st.step = epoch, 10 * (epoch + 1)
        assert update_early_stop(st, {"ndcg@10": v, "count": 5.0}, spec) is stop
    assert (st.best_value, st.best_step, st.best_epoch, st.stopped) == (0.12, 20, 2, True)
    # lower is better for losses; an unknown metric names the key and the choices
    st = LoopState()
    loss = TrainSpec(patience=1, early_stop_metric="logloss")
    assert not update_early_stop(st, {"logloss": 0.5}, loss)
    st.step = 7
    assert not update_early_stop(st, {"logloss": 0.4}, loss) and st.best_step == 7
    with pytest.raises(SpecError, match=r"train\.early_stop_metric: 'gauc' .* one of \['hr@10', 'ndcg@10'\]"):
        update_early_stop(LoopState(), {"hr@10": 0.1, "ndcg@10": 0.1, "count": 3.0}, TrainSpec(patience=1,
                                                                                             early_stop_metric="gauc"))


def test_patience_needs_valid_evaluations(tmp_path):
    from pinfm_rec.train.pretrain import PretrainSpec

    with pytest.raises(SpecError, match=r"train\.patience.*eval_every_epochs"):
        load_spec(PretrainSpec, TINY, ["train.patience=2", "train.eval_every_epochs=0"])
    from pinfm_rec.train.finetune import FinetuneSpec

    assert FinetuneSpec().train.early_stop_metric == "gauc" and PretrainSpec().train.early_stop_metric == "ndcg@10"
    # a fine-tune spec file with its own train: section (no metric named) still stops on GAUC
    ft = load_spec(FinetuneSpec, os.path.join(ROOT, "specs", "finetune", "synthetic-tiny.yaml"), ["train.patience=2"])
    assert ft.train.early_stop_metric == "gauc"


@pytest.mark.slow
def test_early_stop_tests_and_exports_the_best_valid_model(tmp_path):
    """'count' never improves after the first evaluation: with patience 1 the run stops after
    epoch 2 of 5 and epoch 1's model (kept although keep_last=1) is what test and the export see."""
    from pinfm_rec.train.pretrain import PretrainSpec, pretrain
    from pinfm_rec.train.standalone_eval import evaluate_checkpoint

    small = ["data.synthetic.num_users=240", "data.synthetic.num_items=120", "data.synthetic.mean_len=16",
             "data.max_len=16", "model.trunk.max_len=16", "data.batch_size=32", "model.trunk.n_layers=1",
             "train.epochs=5", "train.patience=1", "train.early_stop_metric=count", "checkpoint.keep_last=1",
             "checkpoint.every_steps=0", "tensorboard=false", f"run_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/c"]
    spec = load_spec(PretrainSpec, TINY, small)
    res = pretrain(spec, force_cpu=True)
    spe = res["history"][0]["step"]
    assert res["stopped_early"] and res["best_epoch"] == 1 and res["best_step"] == spe
    assert res["steps"] == 2 * spe and [h["epoch"] for h in res["history"]] == [1, 2]
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p for p in os.listdir(ck) if p.startswith("step_")) == [f"step_{spe:08d}", f"step_{2 * spe:08d}"]
    assert res["valid_hr@10"] == res["history"][0]["valid_hr@10"]
    assert json.load(open(tmp_path / "run" / "encoder" / "encoder_meta.json"))["step"] == spe
    # the test metrics are those of the best checkpoint
    again = evaluate_checkpoint(spec, force_cpu=True)  # `pinfm eval` picks the best-valid checkpoint
    assert again["checkpoint"] == str(ck / f"step_{spe:08d}")
    assert again["test_ndcg@10"] == res["test_ndcg@10"] and again["valid_hr@10"] == res["valid_hr@10"]
    # resuming the stopped run trains nothing more and reports the same
    res2 = pretrain(spec, force_cpu=True)
    assert res2["steps"] == res["steps"] and res2["test_ndcg@10"] == res["test_ndcg@10"]
