"""TorchX components: each returns an AppDef that runs ``pinfm <command>`` under torchrun.

    torchx run components/pinfm.py:pretrain --spec specs/pretrain/synthetic-tiny.yaml -j 1x2
    torchx run -s slurm components/pinfm.py:pretrain --spec specs/pretrain/ml1m-gpu.yaml -j 2x8 --gpu 8
    torchx run components/pinfm.py:evaluate --spec specs/pretrain/ml1m-cpu.yaml
    torchx run components/pinfm.py:smoke
    torchx run components/pinfm.py:finetune --spec specs/finetune/synthetic-tiny.yaml -j 1x2

Built on ``torchx.components.dist.ddp`` (c10d rendezvous, one process per ``nproc_per_node``), so
the same component runs on the local_cwd, slurm and kubernetes schedulers configured in
``.torchxconfig``.
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist as dist_components

_MODULE = "pinfm_rec.cli"


def _app(
    command: str,
    spec: Optional[str],
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
    args = [command] + (["--spec", spec] if spec else []) + list(extra) + list(overrides)
    environment = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max(1, cpu // max(1, _nproc(j))))}
    environment.update(env or {})
    return dist_components.ddp(
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


def _nproc(j: str) -> int:
    try:
        return int(j.split("x")[-1])
    except ValueError:
        return 1


def pretrain(
    *overrides: str,
    spec: str = "specs/pretrain/synthetic-tiny.yaml",
    name: str = "pinfm-pretrain",
    image: str = ".",
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Pretrain PinFM (sharded EmbeddingCollection + DDP/FSDP2 trunk); resumes from the newest checkpoint.

    Args:
        overrides: dotted spec overrides, e.g. train.epochs=5 data.batch_size=256
        spec: YAML spec path (relative to the job's working directory)
        name: job name
        image: image for the scheduler (local_cwd: the working directory)
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (two gloo ranks on CPU) or 2x8 (two 8-GPU hosts)
        cpu: CPUs per replica
        gpu: GPUs per replica (0 = CPU/gloo)
        memMB: host memory per replica in MB
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
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Full-ranking HR@K / NDCG@K of a checkpoint on the valid and test splits.

    Args:
        overrides: dotted spec overrides
        spec: YAML spec path of the run to evaluate
        checkpoint: checkpoint dir (default: the run's newest complete checkpoint)
        name: job name
        image: image for the scheduler
        j: {nnodes}x{nproc_per_node}; any world size can read a checkpoint
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: host memory per replica in MB
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
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
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
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: host memory per replica in MB
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
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Fine-tune a TorchRec ranker (DLRM / DLRM_DCN) with the pretrained PinFM encoder (DCAT) on
    request-deduplicated impressions; reports AUC / GAUC / logloss.

    Args:
        overrides: dotted spec overrides, e.g. encoder.checkpoint=runs/mind-pre/encoder encoder.init=random
        spec: YAML spec path (relative to the job's working directory)
        name: job name
        image: image for the scheduler (local_cwd: the working directory)
        j: {nnodes}x{nproc_per_node}; any world size can load a pretraining checkpoint
        cpu: CPUs per replica
        gpu: GPUs per replica (0 = CPU/gloo)
        memMB: host memory per replica in MB
        h: a registered named resource (overrides cpu/gpu/memMB)
        env: extra environment variables, e.g. PINFM_DATA_DIR=/data
        max_retries: scheduler retries (a retried job resumes from its last checkpoint)
        rdzv_port: c10d rendezvous port on rank 0's host (multi-node)
    """
    return _app("finetune", spec, list(overrides), [], name, image, j, cpu, gpu, memMB, h, env, max_retries,
                rdzv_port)
