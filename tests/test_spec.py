"""Spec loading: strict keys and types, dotted overrides, round trip."""
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from pinfm_rec.spec import SpecError, apply_overrides, dump_spec, from_dict, load_spec


@dataclass
class Inner:
    lr: float = 1e-3
    ks: List[int] = field(default_factory=lambda: [10, 50])
    name: str = "x"


@dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    opt: Optional[int] = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_nested_values(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("steps: 5\ninner:\n  lr: 2\n  ks: [1, 2, 3]\n")
    s = load_spec(Outer, p)
    assert s.steps == 5 and s.inner.lr == 2.0 and isinstance(s.inner.lr, float)
    assert s.inner.ks == [1, 2, 3] and s.inner.name == "x" and s.opt is None


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("inner:\n  lrr: 0.1\n")
    with pytest.raises(SpecError) as e:
        load_spec(Outer, p)
    assert "inner.lrr" in str(e.value) and "bad.yaml" in str(e.value) and "lr" in str(e.value)


@pytest.mark.parametrize(
    "data,key",
    [({"steps": "ten"}, "steps"), ({"flag": 1}, "flag"), ({"inner": {"ks": [1, "a"]}}, "inner.ks[1]"),
     ({"inner": 3}, "inner"), ({"steps": 1.5}, "steps")],
)
def test_mistyped_values(data, key):
    with pytest.raises(SpecError) as e:
        from_dict(Outer, data, "f.yaml")
    assert f"'{key}'" in str(e.value)


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("steps: 5\n")
    s = load_spec(Outer, p, ["inner.lr=3e-4", "flag=true", "inner.ks=[7]", "opt=4"])
    assert s.inner.lr == pytest.approx(3e-4) and s.flag is True and s.inner.ks == [7] and s.opt == 4
    with pytest.raises(SpecError, match="inner.nope"):
        load_spec(Outer, p, ["inner.nope=1"])
    with pytest.raises(SpecError, match="dotted.key=value"):
        apply_overrides({}, ["steps"])


def test_dump_round_trip(tmp_path):
    s = load_spec(Outer, None, ["steps=7", "inner.name=abc"])
    out = tmp_path / "resolved.yaml"
    dump_spec(s, out)
    assert load_spec(Outer, out) == s


def test_missing_file():
    with pytest.raises(SpecError, match="not found"):
        load_spec(Outer, "/nonexistent/spec.yaml")


def test_data_longer_than_the_trunk_is_refused_before_training(tmp_path):
    import os

    import torch

    from pinfm_rec.parallel import DistEnv
    from pinfm_rec.spec import load_spec
    from pinfm_rec.train.pretrain import PretrainSpec, build

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = load_spec(PretrainSpec, os.path.join(root, "specs", "pretrain", "synthetic-tiny.yaml"),
                     ["data.max_len=64", "model.trunk.max_len=32", f"data.cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"data.max_len \(64\) > model.trunk.max_len \(32\)"):
        build(spec, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo"))
