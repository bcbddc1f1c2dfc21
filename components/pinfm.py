"""TorchX components: each returns an AppDef that runs ``pinfm <command>`` under torch.distributed.run.

    torchx run components/pinfm.py:pretrain --spec specs/pretrain/synthetic-tiny.yaml -j 1x2 name=tiny-2ranks
    torchx run -s slurm components/pinfm.py:pretrain --spec specs/pretrain/ml1m-gpu.yaml -j 2x8 --gpu 8
    torchx run -s kubernetes components/pinfm.py:pretrain --image ghcr.io/your-org/pinfm_rec:latest -j 2x8 --gpu 8
    torchx run components/pinfm.py:evaluate --spec runs/ml1m-cpu/spec.yaml
    torchx run components/pinfm.py:smoke
    torchx run components/pinfm.py:finetune --spec specs/finetune/synthetic-tiny.yaml -j 1x2

Built on ``torchx.components.dist.ddp`` (c10d rendezvous, one process per ``nproc_per_node``), so
the same component runs on the local_cwd, slurm and kubernetes schedulers configured in
``.torchxconfig``. The launcher is ``<python> -m torch.distributed.run``: on a local or shared
file system (local_cwd, slurm; ``image`` is a directory) ``<python>`` is the interpreter that runs
``torchx`` (the project's .venv, activated or not); in a container image it is the image's
``python``. ``cpu`` / ``memMB`` of 0 are derived per node from the GPU count (``node_resources``).
``gpu=0`` means CPU/gloo: the role's environment sets ``CUDA_VISIBLE_DEVICES=""`` (before the user's
``env``, which may override it) so the ranks do not pick up a GPU of the host.
"""

import os
import shlex
import sys
from typing import Dict, List, Optional, Tuple

import torchx.specs as specs
from torchx.components import dist as dist_components

_MODULE = "pinfm_rec.cli"
CPU_PER_GPU, MEM_MB_PER_GPU = 16, 120 * 1024  # per-node request of a GPU job, per GPU ...
MAX_NODE_CPU, MAX_NODE_MEM_MB = 128, 960 * 1024  # ... capped at what an 8-GPU host offers
CPU_PER_PROC, MEM_MB_PER_PROC = 1, 4096  # per process of a CPU (gloo) job (OMP_NUM_THREADS=1 each)


def node_resources(gpu: int, nproc: int, cpu: int = 0, memMB: int = 0) -> Tuple[int, int]:
    """(cpu, memMB) per node: values > 0 are kept; 0 means derived, from the GPUs per node
    (16 CPUs and 120 GiB each, capped at 128 CPUs / 960 GiB) or, without GPUs, from the processes
    per node (1 CPU and 4 GiB each)."""
    if gpu > 0:
        auto_cpu, auto_mem = min(CPU_PER_GPU * gpu, MAX_NODE_CPU), min(MEM_MB_PER_GPU * gpu, MAX_NODE_MEM_MB)
    else:
        auto_cpu, auto_mem = CPU_PER_PROC * max(1, nproc), MEM_MB_PER_PROC * max(1, nproc)
    return (cpu if cpu > 0 else auto_cpu), (memMB if memMB > 0 else auto_mem)


def launcher(image: str) -> str:
    """The torchrun command: this interpreter's ``-m torch.distributed.run`` when the job runs
    from a directory on this file system, the image's ``python`` in a container image."""
    python = sys.executable if os.path.isdir(image) else "python"
    return f"{shlex.quote(python)} -m torch.distributed.run"


def _nproc(j: str) -> int:
    try:
        return int(j.split("x")[-1])
    except ValueError:
        return 1


def _app(
    command: str,
    spec: str,
    overrides: List[str],
    extra: List[str],
    name: str,
    image: str,
    j: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    env: Optional[Dict[str, str]],
    max_retries: int,
    rdzv_port: int,
) -> specs.AppDef:
    args = [command, "--spec", spec] + list(extra) + list(overrides)
    nproc = _nproc(j)
    cpu, memMB = node_resources(gpu, nproc, cpu, memMB)
    environment = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max(1, cpu // max(1, nproc))),
                   # a fresh rendezvous store per restart attempt, on any number of nodes
                   # (pinfm_rec/elastic.py: a shared one keeps the failed attempt's addresses)
                   "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if gpu == 0 and not h:  # CPU/gloo: hide the host's GPUs from the ranks (a named resource decides itself)
        environment["CUDA_VISIBLE_DEVICES"] = ""
    environment.update(env or {})
    app = dist_components.ddp(
        *args,
        m=_MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=environment,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )
    role = app.roles[0]
    # ddp() runs `bash -c "torchrun ..."`: torchrun is on PATH only in an activated venv
    assert role.args[0] == "-c" and role.args[1].startswith("torchrun "), role.args
    role.args[1] = launcher(image) + role.args[1][len("torchrun"):]
    role.name = command  # the slurm job / kubernetes task name (ddp() would call it after the module: cli)
    return app


def pretrain(
    *overrides: str,
    spec: str = "specs/pretrain/synthetic-tiny.yaml",
    name: str = "pinfm-pretrain",
    image: str = ".",
    j: str = "1x2",
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Pretrain PinFM (sharded EmbeddingCollection + DDP/FSDP2 trunk); resumes from the newest checkpoint
    of the run named by the spec (pass name=<new name> to train a new run).

    Args:
        overrides: dotted spec overrides, e.g. name=tiny-2ranks train.epochs=5 data.batch_size=256
        spec: YAML spec path (relative to the job's working directory)
        name: job name
        image: image for the scheduler (local_cwd, slurm: the working directory; kubernetes: a container image)
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (two gloo ranks on CPU) or 2x8 (two 8-GPU hosts)
        cpu: CPUs per node (0: 16 per GPU up to 128, or 1 per process without GPUs)
        gpu: GPUs per node (0 = CPU/gloo)
        memMB: host memory per node in MB (0: 120 GiB per GPU up to 960 GiB, or 4 GiB per process)
        h: a registered named resource (overrides cpu/gpu/memMB)
        env: extra environment variables, e.g. PINFM_DATA_DIR=/data
        max_retries: scheduler retries (a retried job resumes from its last checkpoint)
        rdzv_port: c10d rendezvous port on rank 0's host (multi-node)
    """
    return _app("pretrain", spec, list(overrides), [], name, image, j, cpu, gpu, memMB, h, env, max_retries, rdzv_port)


def evaluate(
    *overrides: str,
    spec: str = "specs/pretrain/synthetic-tiny.yaml",
    checkpoint: str = "",
    name: str = "pinfm-eval",
    image: str = ".",
    j: str = "1x1",
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Metrics of a run's checkpoint on the valid and test splits: HR@K / NDCG@K for a pretraining run,
    AUC / GAUC / NE for a fine-tuning run.

    Args:
        overrides: dotted spec overrides
        spec: YAML spec of the run to evaluate (or its saved runs/<name>/spec.yaml, or the run dir)
        checkpoint: checkpoint dir (default: the run's newest complete checkpoint)
        name: job name
        image: image for the scheduler
        j: {nnodes}x{nproc_per_node}; any world size can read a checkpoint
        cpu: CPUs per node (0: derived from the GPU count)
        gpu: GPUs per node
        memMB: host memory per node in MB (0: derived from the GPU count)
        h: a registered named resource
        env: extra environment variables
        rdzv_port: c10d rendezvous port (multi-node)
    """
    extra = ["--checkpoint", checkpoint] if checkpoint else []
    return _app("eval", spec, list(overrides), extra, name, image, j, cpu, gpu, memMB, h, env, 0, rdzv_port)


def smoke(
    *overrides: str,
    spec: str = "specs/pretrain/synthetic-tiny.yaml",
    steps: int = 30,
    name: str = "pinfm-smoke",
    image: str = ".",
    j: str = "1x1",
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """A few training steps printing the sharding plan and step times (CUDA when present).

    Args:
        overrides: dotted spec overrides
        spec: YAML spec path
        steps: number of training steps
        name: job name
        image: image for the scheduler
        j: {nnodes}x{nproc_per_node}
        cpu: CPUs per node (0: derived from the GPU count)
        gpu: GPUs per node
        memMB: host memory per node in MB (0: derived from the GPU count)
        env: extra environment variables
    """
    return _app("smoke", spec, list(overrides), ["--steps", str(steps)], name, image, j, cpu, gpu, memMB, None, env,
                0, 29500)


def finetune(
    *overrides: str,
    spec: str = "specs/finetune/synthetic-tiny.yaml",
    name: str = "pinfm-finetune",
    image: str = ".",
    j: str = "1x2",
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Fine-tune a TorchRec ranker (DLRM / DLRM_DCN) with the pretrained PinFM encoder (DCAT) on
    request-deduplicated impressions; reports AUC / GAUC / NE / log loss.

    Args:
        overrides: dotted spec overrides, e.g. encoder.checkpoint=runs/mind-pre/encoder encoder.init=random
        spec: YAML spec path (relative to the job's working directory)
        name: job name
        image: image for the scheduler (local_cwd, slurm: the working directory; kubernetes: a container image)
        j: {nnodes}x{nproc_per_node}; any world size can load a pretraining checkpoint
        cpu: CPUs per node (0: 16 per GPU up to 128, or 1 per process without GPUs)
        gpu: GPUs per node (0 = CPU/gloo)
        memMB: host memory per node in MB (0: 120 GiB per GPU up to 960 GiB, or 4 GiB per process)
        h: a registered named resource (overrides cpu/gpu/memMB)
        env: extra environment variables, e.g. PINFM_DATA_DIR=/data
        max_retries: scheduler retries (a retried job resumes from its last checkpoint)
        rdzv_port: c10d rendezvous port on rank 0's host (multi-node)
    """
    return _app("finetune", spec, list(overrides), [], name, image, j, cpu, gpu, memMB, h, env, max_retries,
                rdzv_port)
