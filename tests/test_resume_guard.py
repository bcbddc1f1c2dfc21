"""Resuming a run whose checkpoint has a different model spec is a clear error naming the keys."""
import os

import pytest

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
    with pytest.raises(ValueError, match=r"model\.trunk\.d_model: checkpoint 32 != now 64.*name=|checkpoint\.resume=false"):
        check_resume_compatible(str(tmp_path), other)
