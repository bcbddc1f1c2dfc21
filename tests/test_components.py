"""TorchX components: lint as TorchX does, materialise AppDefs, check `--help` is the docstring, and
dry-run the slurm and kubernetes paths of .torchxconfig through the torchx CLI (what a cluster user
submits: the sbatch script / the Volcano job)."""
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


def test_pretrain_appdef_runs_cli_under_this_interpreters_torchrun():
    app = materialize_appdef(comp.pretrain, ["-j", "1x2", "--spec", "specs/pretrain/ml1m-cpu.yaml", "train.epochs=3"])
    cmd = _cmd(app)
    # no bare `torchrun` (on PATH only in an activated venv): the Python running torchx launches
    assert cmd.startswith(f"bash -c {sys.executable} -m torch.distributed.run "), cmd
    assert "--nproc_per_node 2" in cmd and "--nnodes 1" in cmd
    assert "-m pinfm_rec.cli pretrain --spec specs/pretrain/ml1m-cpu.yaml train.epochs=3" in cmd
    assert app.roles[0].env["PYTHONUNBUFFERED"] == "1" and app.roles[0].name == "pretrain"


def test_container_image_uses_its_python():
    cmd = _cmd(materialize_appdef(comp.pretrain, ["--image", "ghcr.io/org/pinfm:1", "-j", "1x8", "--gpu", "8"]))
    assert cmd.startswith("bash -c python -m torch.distributed.run "), cmd


def test_multinode_and_gpu_resources():
    app = materialize_appdef(comp.pretrain, ["-j", "2x8", "--gpu", "8", "--cpu", "64", "--memMB", "512000"])
    role = app.roles[0]
    assert role.num_replicas == 2 and role.resource.gpu == 8 and role.resource.cpu == 64
    assert role.resource.memMB == 512000 and role.env["OMP_NUM_THREADS"] == "8"
    assert "--nnodes 2" in _cmd(app) and "--nproc_per_node 8" in _cmd(app)


@pytest.mark.parametrize("gpu,nproc,want", [(8, 8, (128, 960 * 1024)), (2, 2, (32, 240 * 1024)),
                                            (16, 16, (128, 960 * 1024)), (0, 2, (2, 8192))])
def test_node_resources_follow_the_gpu_count(gpu, nproc, want):
    assert comp.node_resources(gpu, nproc) == want
    assert comp.node_resources(gpu, nproc, cpu=7, memMB=1000) == (7, 1000)  # explicit values win
    role = materialize_appdef(comp.pretrain, ["-j", f"1x{nproc}", "--gpu", str(gpu)]).roles[0]
    assert (role.resource.cpu, role.resource.memMB) == want


@pytest.mark.parametrize("fn", [comp.pretrain, comp.finetune, comp.evaluate, comp.smoke])
def test_cpu_jobs_hide_the_gpus_and_gpu_jobs_see_them(fn):
    """gpu=0 is CPU/gloo: on a GPU host the ranks must not see the GPU (CUDA_VISIBLE_DEVICES="");
    a user's env wins; a GPU job leaves the variable to the scheduler."""
    assert materialize_appdef(fn, []).roles[0].env["CUDA_VISIBLE_DEVICES"] == ""
    user = materialize_appdef(fn, ["--env", "CUDA_VISIBLE_DEVICES=1,PINFM_DATA_DIR=/d"]).roles[0].env
    assert user["CUDA_VISIBLE_DEVICES"] == "1" and user["PINFM_DATA_DIR"] == "/d"
    assert "CUDA_VISIBLE_DEVICES" not in materialize_appdef(fn, ["--gpu", "1"]).roles[0].env


def test_eval_and_smoke_args():
    ev = _cmd(materialize_appdef(comp.evaluate, ["--checkpoint", "runs/x/checkpoints/step_00000010"]))
    assert "pinfm_rec.cli eval --spec specs/pretrain/synthetic-tiny.yaml --checkpoint runs/x/checkpoints/step_00000010" in ev
    sm = _cmd(materialize_appdef(comp.smoke, ["--steps", "7"]))
    assert "pinfm_rec.cli smoke --spec specs/pretrain/synthetic-tiny.yaml --steps 7" in sm


def test_finetune_appdef():
    cmd = _cmd(materialize_appdef(comp.finetune, ["-j", "1x2", "encoder.init=random"]))
    assert "--nproc_per_node 2" in cmd
    assert "pinfm_rec.cli finetune --spec specs/finetune/synthetic-tiny.yaml encoder.init=random" in cmd


def _torchx(*args, timeout=120):
    # the torchx CLI through this interpreter (no `torchx` script beside python on some hosts)
    return subprocess.run([sys.executable, "-m", "torchx.cli.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_help_is_the_docstring():
    out = _torchx("run", "components/pinfm.py:pretrain", "--help")
    assert out.returncode == 0, out.stderr
    assert "Pretrain PinFM" in out.stdout and "nnodes" in out.stdout and "dotted spec overrides" in out.stdout


def test_slurm_dryrun_sbatch_from_torchxconfig():
    """The README's slurm command: no workspace copy (it hung copying .venv and runs/), per-node
    resources from the GPU count, this venv's interpreter launching torch.distributed.run."""
    out = _torchx("run", "--dryrun", "-s", "slurm", "components/pinfm.py:pretrain",
                  "--spec", "specs/pretrain/ml1m-gpu.yaml", "-j", "2x8", "--gpu", "8", timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Checking for changes in workspace" not in out.stderr
    sbatch = [l for l in out.stdout.splitlines() if l.startswith("#SBATCH --job-name")]
    assert len(sbatch) == 2, out.stdout[-3000:]  # one het group per node
    for line in sbatch:
        assert "--cpus-per-task=128" in line and f"--mem={960 * 1024}" in line and "--gpus-per-task=8" in line
        assert "--partition=gpu" in line and "--time=04:00:00" in line
    assert f"{sys.executable} -m torch.distributed.run" in out.stdout and "--nnodes 2 --nproc_per_node 8" in out.stdout
    assert "-m pinfm_rec.cli pretrain --spec specs/pretrain/ml1m-gpu.yaml" in out.stdout


def test_kubernetes_dryrun_without_docker():
    """Volcano job for an explicit image: no workspace image build (no docker daemon needed)."""
    pytest.importorskip("kubernetes", reason="the k8s extra (pip install -e .[k8s]); scripts/setup.sh installs it")
    out = _torchx("run", "--dryrun", "-s", "kubernetes", "components/pinfm.py:pretrain", "--image",
                  "ghcr.io/your-org/pinfm_rec:1", "--spec", "specs/pretrain/ml1m-gpu.yaml", "-j", "2x8", "--gpu", "8",
                  timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "kind: Job" in text and "queue: default" in text and "schedulerName: volcano" in text, text[-3000:]
    assert "name: pretrain-0" in text and "name: pretrain-1" in text  # one task per node
    assert text.count("image: ghcr.io/your-org/pinfm_rec:1") == 2
    assert text.count("nvidia.com/gpu: '8'") >= 2 and "memory: 983040M" in text and "cpu: 128000m" in text
    assert "python -m torch.distributed.run" in text and "--nnodes 2 --nproc_per_node 8" in text
