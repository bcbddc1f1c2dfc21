"""Spec loading: strict keys and types, dotted overrides, round trip."""
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from pinfm_rec.spec import FieldError, SpecError, apply_overrides, bounds, dump_spec, from_dict, load_spec
from pinfm_rec.train.pretrain import PretrainSpec


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


SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
TINY = os.path.join(SPECS, "pretrain", "synthetic-tiny.yaml")


@pytest.mark.parametrize(
    "override,key,says",
    [("train.epochs=-1", "train.epochs", ">= 1, got -1"),
     ("data.source=bogus", "data.source", "'ml-1m-sasrec'"),
     ("data.batch_size=0", "data.batch_size", ">= 1, got 0"),
     ("model.trunk.n_heads=3", "model.trunk.n_heads", "does not divide d_model (32)"),
     ("model.trunk.n_heads=0", "model.trunk.n_heads", ">= 1, got 0"),
     ("model.trunk.dropout=1.0", "model.trunk.dropout", ">= 0 and < 1"),
     ("train.lr=0", "train.lr", "> 0"),
     ("train.eval_ks=[10,0]", "train.eval_ks[1]", ">= 1, got 0"),
     ("model.embedding.item.sharding=diagonal", "model.embedding.item.sharding", "'row_wise'"),
     ("parallel.embedding_optimizer=lamb", "parallel.embedding_optimizer", "'rowwise_adagrad'"),
     ("model.loss.multi_token_k=2", "model.loss.multi_token_weight", "multi_token_k=2"),
     ("data.max_len=64", "data.max_len", "model.trunk.max_len (50)"),
     ("model.output_head=false", "model.output_head", "d_model (32) == model.embedding.dim (16)")],
)
def test_pretrain_spec_values_are_checked_at_load(override, key, says):
    extra = ["model.embedding.dim=16"] if key == "model.output_head" else []
    with pytest.raises(SpecError) as e:
        load_spec(PretrainSpec, TINY, [override] + extra)
    msg = str(e.value)
    assert f"'{key}'" in msg and "synthetic-tiny.yaml" in msg and says in msg, msg


def test_loss_without_negatives_is_refused_at_load():
    with pytest.raises(SpecError, match="'data.num_negatives_per_row'"):
        load_spec(PretrainSpec, TINY, ["model.loss.in_batch_negatives=0", "data.num_negatives_per_row=0"])
    ok = load_spec(PretrainSpec, TINY, ["model.loss.in_batch_negatives=0"])
    assert ok.data.num_negatives_per_row == 8


@pytest.mark.parametrize(
    "override,key",
    [("encoder.kernel=cuda", "encoder.kernel"), ("encoder.cand_id_dropout=1", "encoder.cand_id_dropout"),
     ("ranker.arch=wide", "ranker.arch"), ("ranker.dense_arch=[32,8]", "ranker.dense_arch"),
     ("data.source=criteo", "data.source"), ("data.valid_frac=0.5", "data.test_frac"),
     ("encoder.out_dim=0", "encoder.out_dim"), ("data.max_len=51", "data.max_len")],
)
def test_finetune_spec_values_are_checked_at_load(override, key):
    from pinfm_rec.train.finetune import FinetuneSpec

    extra = ["data.test_frac=0.5"] if key == "data.test_frac" else []
    with pytest.raises(SpecError, match=f"'{re.escape(key)}'"):
        load_spec(FinetuneSpec, os.path.join(SPECS, "finetune", "synthetic-tiny.yaml"), [override] + extra)


def test_finetune_max_len_is_checked_against_the_pretrained_trunk(tmp_path):
    from pinfm_rec.train.finetune import FinetuneSpec

    ckpt = tmp_path / "encoder"
    ckpt.mkdir()
    (ckpt / "spec.yaml").write_text(dump_spec(load_spec(PretrainSpec, TINY, ["model.trunk.max_len=60"])))
    (ckpt / "encoder_meta.json").write_text('{"num_items": 600}')
    ft = os.path.join(SPECS, "finetune", "synthetic-tiny.yaml")
    spec = load_spec(FinetuneSpec, ft, [f"encoder.checkpoint={ckpt}", "data.max_len=60", "model.trunk.max_len=60"])
    assert spec.data.max_len == 60
    with pytest.raises(SpecError, match=r"'data.max_len': 61 > trunk.max_len of encoder.checkpoint"):
        load_spec(FinetuneSpec, ft, [f"encoder.checkpoint={ckpt}", "data.max_len=61", "model.trunk.max_len=80"])
    with pytest.raises(SpecError, match=r"'data.synthetic.num_items': 700, but the encoder .* num_items=600"):
        load_spec(FinetuneSpec, ft, [f"encoder.checkpoint={ckpt}", "data.synthetic.num_items=700"])


def test_every_shipped_spec_loads():
    from pinfm_rec.data.scaling import auto_overrides, stats_from_lengths
    from pinfm_rec.train.finetune import FinetuneSpec

    for kind, cls in (("pretrain", PretrainSpec), ("finetune", FinetuneSpec)):
        for name in sorted(os.listdir(os.path.join(SPECS, kind))):
            path = os.path.join(SPECS, kind, name)
            # `auto` values (sasrec.yaml) resolved from example statistics, without the data
            overrides = auto_overrides(path, [], stats=stats_from_lengths([9] * 100, 50))
            assert isinstance(load_spec(cls, path, overrides), cls)


def test_bounds_and_field_errors_on_a_plain_section():
    @dataclass
    class Sec:
        n: int = field(default=1, metadata=bounds(ge=1))
        frac: float = field(default=0.5, metadata=bounds(gt=0, le=1))
        pair: List[int] = field(default_factory=lambda: [1, 2], metadata=bounds(ge=0))

        def __post_init__(self):
            if self.n > 5 and self.frac > 0.5:
                raise FieldError("frac", "must be <= 0.5 when n > 5")

    assert from_dict(Sec, {"n": 3, "frac": 1}).frac == 1.0
    for data, msg in (({"n": 0}, "'n' must be >= 1, got 0"), ({"frac": 0}, "'frac' must be > 0 and <= 1"),
                      ({"pair": [3, -1]}, "'pair[1]' must be >= 0"),
                      ({"n": 6, "frac": 0.9}, "key 'frac': must be <= 0.5 when n > 5")):
        with pytest.raises(SpecError) as e:
            from_dict(Sec, data, "x.yaml")
        assert msg in str(e.value) and "x.yaml" in str(e.value)
