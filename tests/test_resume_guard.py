"""Resuming a run whose checkpoint has a different model spec is a clear error naming the keys."""
import os

import pytest

from pinfm_rec.errors import CheckpointError
from pinfm_rec.spec import dump_spec, load_spec
from pinfm_rec.train.checkpoint import check_resume_compatible
from pinfm_rec.train.pretrain import PretrainSpec

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs", "pretrain",
                    "synthetic-tiny.yaml")


def test_resume_with_other_model_spec_is_a_clear_error(tmp_path):
    saved = load_spec(PretrainSpec, TINY)
    (tmp_path / "spec.yaml").write_text(dump_spec(saved))
    same = dump_spec(load_spec(PretrainSpec, TINY, ["train.epochs=9"]))
    check_resume_compatible(str(tmp_path), same)  # training-only changes resume fine
    other = dump_spec(load_spec(PretrainSpec, TINY, ["model.trunk.d_model=64"]))
    with pytest.raises(CheckpointError, match=r"model\.trunk\.d_model: checkpoint 32 != now 64.*name=|checkpoint\.resume=false"):
        check_resume_compatible(str(tmp_path), other)


def test_checkpoint_from_before_a_new_model_key_resumes(tmp_path):
    """A spec.yaml written before a model key existed (here: output_head, loss.full_catalogue) holds
    the defaults of those keys, not None: resuming it with the defaults is fine, with others not."""
    import yaml

    saved = yaml.safe_load(dump_spec(load_spec(PretrainSpec, TINY)))
    del saved["model"]["output_head"], saved["model"]["loss"]["full_catalogue"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(saved))
    now = dump_spec(load_spec(PretrainSpec, TINY))
    check_resume_compatible(str(tmp_path), now, ("model",), PretrainSpec)
    # without the class the missing keys read None
    with pytest.raises(CheckpointError, match=r"model\.output_head: checkpoint None != now True"):
        check_resume_compatible(str(tmp_path), now, ("model",))
    changed = dump_spec(load_spec(PretrainSpec, TINY, ["model.loss.full_catalogue=true"]))
    with pytest.raises(CheckpointError, match=r"model\.loss\.full_catalogue: checkpoint False != now True"):
        check_resume_compatible(str(tmp_path), changed, ("model",), PretrainSpec)


def test_resume_with_other_loader_rows_is_a_clear_error(tmp_path):
    from pinfm_rec.train.pretrain import LOADER_KEYS

    (tmp_path / "spec.yaml").write_text(dump_spec(load_spec(PretrainSpec, TINY)))
    ok = dump_spec(load_spec(PretrainSpec, TINY, ["train.epochs=9", "data.num_workers=0"]))
    check_resume_compatible(str(tmp_path), ok, ("model",), PretrainSpec, LOADER_KEYS)
    for override, key in (("data.train_windows=true", "data.train_windows"), ("data.batch_size=7", "data.batch_size")):
        other = dump_spec(load_spec(PretrainSpec, TINY, [override]))
        with pytest.raises(CheckpointError, match=rf"{key}: checkpoint .* != now"):
            check_resume_compatible(str(tmp_path), other, ("model",), PretrainSpec, LOADER_KEYS)


def test_eval_with_another_model_spec_is_a_clear_error(tmp_path):
    """`pinfm eval` checks the checkpoint's saved spec before loading (no silent partial load)."""
    from pinfm_rec.train.standalone_eval import evaluate_checkpoint

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "spec.yaml").write_text(dump_spec(load_spec(PretrainSpec, TINY)))
    (ck / "COMPLETE").write_text("step 1\n")
    spec = load_spec(PretrainSpec, TINY, ["model.trunk.n_layers=1", f"run_dir={tmp_path / 'run'}",
                                          f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(CheckpointError, match=r"model\.trunk\.n_layers: checkpoint 2 != now 1"):
        evaluate_checkpoint(spec, str(ck), force_cpu=True)
