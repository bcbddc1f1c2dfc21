"""TorchX components: lint as TorchX does, materialise AppDefs, and check `--help` is the docstring."""
import os
import subprocess
import sys

import pytest
from torchx.specs import file_linter
from torchx.specs.builders import materialize_appdef

import pinfm_rec.components.pinfm as comp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "components", "pinfm.py")


@pytest.mark.parametrize("fn", ["pretrain", "evaluate", "smoke", "finetune"])
def test_component_passes_torchx_linter(fn):
    assert file_linter.validate(PATH, fn) == []


def _cmd(app):
    role = app.roles[0]
    return " ".join([role.entrypoint] + list(role.args))


def test_pretrain_appdef_runs_cli_under_torchrun():
    app = materialize_appdef(comp.pretrain, ["-j", "1x2", "--spec", "specs/pretrain/ml1m-cpu.yaml", "train.epochs=3"])
    cmd = _cmd(app)
    assert "torchrun" in cmd and "--nproc_per_node 2" in cmd and "--nnodes 1" in cmd
    assert "-m pinfm_rec.cli pretrain --spec specs/pretrain/ml1m-cpu.yaml train.epochs=3" in cmd
    assert app.roles[0].env["PYTHONUNBUFFERED"] == "1"


def test_multinode_and_gpu_resources():
    app = materialize_appdef(comp.pretrain, ["-j", "2x8", "--gpu", "8", "--cpu", "64", "--memMB", "512000"])
    role = app.roles[0]
    assert role.num_replicas == 2 and role.resource.gpu == 8 and role.resource.cpu == 64
    assert "--nnodes 2" in _cmd(app) and "--nproc_per_node 8" in _cmd(app)


def test_eval_and_smoke_args():
    ev = _cmd(materialize_appdef(comp.evaluate, ["--checkpoint", "runs/x/checkpoints/step_00000010"]))
    assert "pinfm_rec.cli eval --spec specs/pretrain/synthetic-tiny.yaml --checkpoint runs/x/checkpoints/step_00000010" in ev
    sm = _cmd(materialize_appdef(comp.smoke, ["--steps", "7"]))
    assert "pinfm_rec.cli smoke --spec specs/pretrain/synthetic-tiny.yaml --steps 7" in sm


def test_finetune_appdef():
    cmd = _cmd(materialize_appdef(comp.finetune, ["-j", "1x2", "encoder.init=random"]))
    assert "--nproc_per_node 2" in cmd
    assert "pinfm_rec.cli finetune --spec specs/finetune/synthetic-tiny.yaml encoder.init=random" in cmd


def test_help_is_the_docstring():
    torchx = os.path.join(os.path.dirname(sys.executable), "torchx")
    out = subprocess.run([torchx, "run", "components/pinfm.py:pretrain", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Pretrain PinFM" in out.stdout and "nnodes" in out.stdout and "dotted spec overrides" in out.stdout
