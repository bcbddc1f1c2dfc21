"""Process groups, sharding and data parallelism: the only file of pinfm_rec that shards.

* ``init_distributed`` starts (or joins) the process group: nccl on CUDA, gloo on CPU; a single
  process without torchrun still gets a world of 1 so ``DistributedModelParallel`` works the same.
* ``shard_model`` attaches the FBGEMM fused optimizer to the embedding tables
  (``apply_optimizer_in_backward``), asks the planner for a plan under the per-table sharding
  constraints from the spec, logs it, and wraps the model in ``DistributedModelParallel``; the dense
  rest goes to DDP (default) or FSDP2 (``fully_shard`` per trunk block).
* ``build_optimizer`` combines DMP's fused embedding optimizer with a dense AdamW.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import torch
import torch.distributed as dist
from torch import nn

from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import (
    DataParallelWrapper,
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from pinfm_rec import console
from pinfm_rec.elastic import attempt_store
from pinfm_rec.errors import DeviceError
from pinfm_rec.spec import bounds

logger = logging.getLogger(__name__)

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")


@dataclass
class ParallelSpec:
    """How the model is spread over ranks (owned by parallel.py)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, else gloo
    dense: Literal["ddp", "fsdp2"] = "ddp"
    # adam: GPU only
    embedding_optimizer: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = "rowwise_adagrad"
    embedding_lr: float = field(default=0.05, metadata=bounds(gt=0))
    embedding_weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    bf16: bool = True  # autocast the dense trunk to bf16 on CUDA (ignored on CPU)
    timeout_s: int = field(default=1800, metadata=bounds(ge=1))

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.backend must be auto|nccl|gloo, got {self.backend!r}")
        if self.dense not in ("ddp", "fsdp2"):
            raise ValueError(f"parallel.dense must be ddp|fsdp2, got {self.dense!r}")
        if self.embedding_optimizer not in ("sgd", "adagrad", "rowwise_adagrad", "adam"):
            raise ValueError(
                f"parallel.embedding_optimizer must be sgd|adagrad|rowwise_adagrad|adam, "
                f"got {self.embedding_optimizer!r}"
            )


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(spec: ParallelSpec, force_cpu: bool = False) -> DistEnv:
    """Join the torchrun world (RANK/WORLD_SIZE set) or start a world of 1. Idempotent."""
    use_cuda = torch.cuda.is_available() and not force_cpu
    backend = spec.backend if spec.backend != "auto" else ("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            store = attempt_store(timeout)  # torchrun restarts: a key space per attempt (elastic.py)
            if store is None:
                dist.init_process_group(backend=backend, timeout=timeout)
            else:
                dist.init_process_group(backend=backend, timeout=timeout, store=store,
                                        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        else:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=timeout,
            )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown_distributed() -> None:
    """Barrier, then destroy the group (a barrier first avoids rare gloo aborts)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


_ADAM_ON_CPU = ("key 'parallel.embedding_optimizer': adam needs CUDA ({why}; FBGEMM's CPU fused kernels "
                "support sgd, adagrad, rowwise_adagrad): for a CPU run add "
                "parallel.embedding_optimizer=rowwise_adagrad parallel.embedding_lr=0.05")


def check_device(spec: ParallelSpec, force_cpu: bool = False) -> None:
    """Refuse, before any work (the CLI calls it before the run dir exists), what this process's
    device cannot run: ``adam`` for the tables or the ``nccl`` backend without CUDA. Raises
    DeviceError naming the key and what to set instead; the device is the one
    ``init_distributed`` will pick (CUDA when present and not ``force_cpu``)."""
    if torch.cuda.is_available() and not force_cpu:
        return
    why = "--cpu given" if force_cpu else "no CUDA device here"
    if spec.embedding_optimizer == "adam":
        raise DeviceError(_ADAM_ON_CPU.format(why=why))
    if spec.backend == "nccl":
        raise DeviceError(f"key 'parallel.backend': nccl needs CUDA ({why}): use parallel.backend=auto "
                          f"(nccl on CUDA, gloo elsewhere) or gloo")


def for_evaluation(spec: ParallelSpec, device: torch.device) -> ParallelSpec:
    """``spec`` for a model built only to be evaluated on ``device``: the tables' fused optimizer is
    never stepped, so one the device lacks (adam off CUDA) is replaced by sgd. A run trained on a GPU
    is then evaluated on a CPU host as it is."""
    if spec.embedding_optimizer == "adam" and device.type != "cuda":
        return dataclasses.replace(spec, embedding_optimizer="sgd")
    return spec


def _embedding_optimizer(spec: ParallelSpec, device: torch.device):
    name = spec.embedding_optimizer
    if name == "adam" and device.type != "cuda":
        raise DeviceError(_ADAM_ON_CPU.format(why=f"device {device}"))
    from torchrec.optim import rowwise_adagrad

    if name == "sgd":
        return torch.optim.SGD, {"lr": spec.embedding_lr}
    if name == "adagrad":
        return torch.optim.Adagrad, {"lr": spec.embedding_lr, "eps": 1e-8}
    if name == "rowwise_adagrad":
        return rowwise_adagrad.RowWiseAdagrad, {
            "lr": spec.embedding_lr,
            "eps": 1e-8,
            "weight_decay": spec.embedding_weight_decay,
        }
    return torch.optim.Adam, {"lr": spec.embedding_lr, "eps": 1e-8, "weight_decay": spec.embedding_weight_decay}


def _is_tables(m: nn.Module) -> bool:
    """An EC / EBC, unsharded or sharded by DMP (sharded modules carry ``_lookups``)."""
    return isinstance(m, (EmbeddingCollection, EmbeddingBagCollection)) or hasattr(m, "_lookups")


class FSDP2Wrapper(DataParallelWrapper):
    """Shards the dense rest of the model with FSDP2 (``fully_shard``), torchtitan style.

    Walks the module tree from the root: a child without tables becomes an FSDP2 unit (each of its
    ``layers`` first, then the child itself); a child holding sharded tables (an EC/EBC inside) is
    walked into, so e.g. the ranker's dense arches and the encoder's trunk inside a fine-tuning
    model are all sharded; the tables stay with DMP. Frozen children (no trainable parameter) are
    left replicated. Public methods other than ``forward`` that a unit's callers use are listed in
    the module's ``fsdp_forward_methods`` and registered so FSDP2 unshards around them too.
    Parameters held directly by a module that also holds tables cannot be placed: an error.
    """

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        # the mesh follows the run's device: FSDP2's default mesh takes CUDA whenever a GPU exists,
        # which breaks CPU/gloo runs (tests, --cpu) on a GPU host ("invalid device ordinal")
        self._mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        self._walk(dmp._dmp_wrapped_module, "")

    def _walk(self, module: nn.Module, prefix: str) -> None:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # torch >= 2.6

        stray = [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)]
        if stray:
            raise ValueError(
                f"FSDP2 wrapping: parameters held next to sharded tables are not supported: {stray}"
            )
        for name, child in module.named_children():
            if _is_tables(child):
                continue  # sharded tables stay with DMP
            if any(_is_tables(m) for m in child.modules()):
                self._walk(child, f"{prefix}{name}.")
                continue
            if not any(p.requires_grad for p in child.parameters()):
                continue
            for block in getattr(child, "layers", []) or []:
                fully_shard(block, mesh=self._mesh)
            fully_shard(child, mesh=self._mesh)
            for method in getattr(child, "fsdp_forward_methods", ()):
                register_fsdp_forward_method(child, method)


def _find_embedding_collections(model: nn.Module) -> Dict[str, nn.Module]:
    """EmbeddingCollection (sequence tables) and EmbeddingBagCollection (pooled, e.g. a ranker's)
    modules by path."""
    return {
        n: m for n, m in model.named_modules() if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection))
    }


def _sharders() -> list:
    # managed-collision ECs (embedding.id_mode=managed; row_wise only) wrap an EC of their own
    return [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder(), ManagedCollisionEmbeddingCollectionSharder()]


def _device_hbm(device: torch.device) -> Optional[int]:
    """Bytes of memory of a CUDA device (the planner's HBM budget per rank; TorchRec's default
    assumes 32 GB, too small for e.g. a 51 GB table on an H200); None on CPU (TorchRec's default)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def _planner(ecs: Dict[str, nn.Module], table_shardings: Dict[str, str], world_size: int, compute_device: str,
             local_world_size: int, hbm_cap: Optional[int], batch_size: Optional[int]) -> EmbeddingShardingPlanner:
    """The planner for ``world_size`` devices under the per-table sharding constraints (fused kernels)."""
    all_tables = [
        cfg.name
        for ec in ecs.values()
        for cfg in (ec.embedding_configs() if isinstance(ec, EmbeddingCollection) else ec.embedding_bag_configs())
    ]
    unknown = sorted(set(table_shardings) - set(all_tables))
    if unknown:
        raise ValueError(f"sharding given for unknown tables {unknown}; the model has {all_tables}")
    constraints = {}
    for table in all_tables:
        st = table_shardings.get(table, "auto")
        if st == "auto":
            types = list(SHARDING_TYPES)
        elif st in SHARDING_TYPES:
            types = [st]
        else:
            raise ValueError(f"table {table}: sharding must be one of {SHARDING_TYPES} or auto, got {st!r}")
        constraints[table] = ParameterConstraints(
            sharding_types=types, compute_kernels=[EmbeddingComputeKernel.FUSED.value]
        )
    topo = {"hbm_cap": hbm_cap} if hbm_cap else {}
    topology = Topology(world_size=world_size, compute_device=compute_device,
                        local_world_size=min(local_world_size, world_size), **topo)
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)


def dry_plan(model: nn.Module, table_shardings: Dict[str, str], world_size: int, compute_device: str = "cuda",
             hbm_gb: float = 141.0, local_world_size: int = 8, batch_size: Optional[int] = None) -> ShardingPlan:
    """The sharding plan ``shard_model`` would use on ``world_size`` devices (``local_world_size``
    per host, ``hbm_gb`` of memory each), computed here without a process group or any device:
    ``model`` holds its tables on ``meta``. The embedding optimizer is not attached, so the
    planner's estimate leaves out optimizer state (small for row-wise Adagrad)."""
    ecs = _find_embedding_collections(model)
    if not ecs:
        raise ValueError("dry_plan: the model has no EmbeddingCollection or EmbeddingBagCollection")
    hbm = int(hbm_gb * 2**30) if compute_device == "cuda" else None
    planner = _planner(ecs, table_shardings, world_size, compute_device, local_world_size, hbm, batch_size)
    with warnings.catch_warnings():  # TorchRec's dry-run caveats about dense tensor estimates
        warnings.simplefilter("ignore", FutureWarning)
        return planner.plan(model, _sharders())


def spec_plan_rows(spec, world_size: int, compute_device: str = "cuda", hbm_gb: float = 141.0,
                   gpus_per_host: int = 8) -> List[dict]:
    """``plan_rows`` of the plan a pretraining spec would get on ``world_size`` devices (``dry_plan``;
    ``pinfm plan``). Vocabulary sizes of a synthetic spec come from the spec (nothing is generated);
    other sources are prepared (cached) to read them."""
    from pinfm_rec.model.embedding import table_shardings
    from pinfm_rec.model.pinfm import PinFM

    data = spec.data
    if data.source == "synthetic":
        s = data.synthetic
        vocab = {"num_items": s.num_items, "num_actions": s.num_actions, "num_surfaces": s.num_surfaces}
    else:
        from pinfm_rec.data.prepare import prepare_dataset

        vocab = prepare_dataset(data)
    model = PinFM(spec.model, vocab, device=torch.device("meta"), dense_device="cpu")
    plan = dry_plan(model, table_shardings(spec.model.embedding), world_size, compute_device, hbm_gb,
                    gpus_per_host, data.batch_size)
    return plan_rows(plan)


def shard_model(
    model: nn.Module,
    spec: ParallelSpec,
    env: DistEnv,
    table_shardings: Dict[str, str],
    batch_size: Optional[int] = None,
    lr_mult: Optional[Dict[object, float]] = None,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Wrap ``model`` (its EmbeddingCollection / EmbeddingBagCollection modules on ``meta``) in DMP
    under the spec's constraints.

    table_shardings: table name → one of table_wise | row_wise | column_wise | auto (tables not
        named get auto).
    lr_mult: module path prefix, or module type (matched with isinstance, whatever the attribute
        name) → multiplier of ``spec.embedding_lr`` for the tables under it (e.g.
        {PinFMEncoder: 0.1} for a pretrained encoder inside a ranker).
    Returns the DMP module and the plan (also logged on rank 0).
    """
    ecs = _find_embedding_collections(model)
    if not ecs:
        raise ValueError("shard_model: the model has no EmbeddingCollection or EmbeddingBagCollection")
    opt_cls, opt_kwargs = _embedding_optimizer(spec, env.device)
    managed = any(isinstance(m, ManagedCollisionEmbeddingCollection) for m in model.modules())
    if managed and env.device.type != "cuda" and spec.embedding_optimizer != "sgd":
        raise DeviceError(
            f"parallel.embedding_optimizer={spec.embedding_optimizer} with managed-collision tables "
            f"(embedding.id_mode=managed) needs CUDA: FBGEMM has no CPU kernel to reset the optimizer "
            f"state of a re-used slot (reset_weight_momentum); use parallel.embedding_optimizer=sgd on CPU"
        )
    mults = []  # (module path prefix, multiplier)
    for key, mult in (lr_mult or {}).items():
        if isinstance(key, type):
            mults += [(n, mult) for n, m in model.named_modules() if isinstance(m, key)]
        else:
            mults.append((key, mult))
    for path, ec in ecs.items():
        kwargs = dict(opt_kwargs)
        for prefix, mult in mults:
            if path == prefix or path.startswith(prefix + "."):
                kwargs["lr"] = kwargs["lr"] * mult
        apply_optimizer_in_backward(opt_cls, ec.parameters(), kwargs)

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    planner = _planner(ecs, table_shardings, env.world_size, env.device.type, local_world,
                       _device_hbm(env.device), batch_size)
    pg = dist.GroupMember.WORLD
    plan = planner.collective_plan(model, _sharders(), pg)
    if env.is_main:
        logger.info("sharding plan (world_size=%d):\n%s", env.world_size, format_plan(plan))
        console.show_plan(plan_rows(plan), env.world_size, f"{env.device} ({env.backend})")
    wrapper = FSDP2Wrapper() if spec.dense == "fsdp2" else DefaultDataParallelWrapper()
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(pg),
        device=env.device,
        plan=plan,
        sharders=_sharders(),
        data_parallel_wrapper=wrapper,
    )
    return dmp, plan


def plan_rows(plan: ShardingPlan, bytes_per_value: int = 4) -> List[dict]:
    """One dict per table of a DMP plan (``dmp.plan``): module path, table, sharding type, compute
    kernel, ranks, rows, dim and the MB of weights each rank holds (fp32 tables by default;
    optimizer state not included). Tables without a sharding spec (data parallel) count in full
    on every rank of ``ranks`` when known."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            shards = list(getattr(ps.sharding_spec, "shards", None) or [])
            per_rank: Dict[int, float] = {}
            n_rows = dim = 0
            for s in shards:
                r = s.placement.rank()
                size = 1
                for d in s.shard_sizes:
                    size *= int(d)
                per_rank[r] = per_rank.get(r, 0.0) + size * bytes_per_value / 2**20
                n_rows = max(n_rows, int(s.shard_offsets[0]) + int(s.shard_sizes[0]))
                dim = max(dim, int(s.shard_offsets[1]) + int(s.shard_sizes[1]))
            ranks = sorted(per_rank) if per_rank else list(ps.ranks or [])
            rows.append({
                "module": module_path, "table": table, "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel, "ranks": ranks, "rows": n_rows, "dim": dim,
                "mb_per_rank": {str(r): round(per_rank[r], 6) for r in sorted(per_rank)},
            })
    return rows


def format_plan(plan: ShardingPlan) -> str:
    """One line per table: module path, table, sharding type, kernel, ranks and shard sizes."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            shards = ""
            if ps.sharding_spec is not None and hasattr(ps.sharding_spec, "shards"):
                shards = ", ".join(
                    f"rank{s.placement.rank()}:{list(s.shard_sizes)}@{list(s.shard_offsets)}"
                    for s in ps.sharding_spec.shards
                )
            lines.append(
                f"  {module_path}.{table}: {ps.sharding_type} kernel={ps.compute_kernel} ranks={ps.ranks} {shards}"
            )
    return "\n".join(lines)


def build_optimizer(dmp: DistributedModelParallel, lr: float, weight_decay: float) -> CombinedOptimizer:
    """DMP's fused embedding optimizer + AdamW over the dense parameters, as one KeyedOptimizer."""
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters(), include=False))
    dense_opt = KeyedOptimizerWrapper(
        dense, lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    )
    return CombinedOptimizer([("emb", dmp.fused_optimizer), ("dense", dense_opt)])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (no-op when there is one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 equal-shaped tensors from every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
