"""The process-group store of one torchrun restart attempt.

torchrun (torchelastic, c10d rendezvous) shares its rendezvous TCPStore with the workers
(``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps that same store across ``--max-restarts`` attempts,
while ``torch.distributed``'s env:// rendezvous assumes a fresh store per attempt and adds no prefix
(pytorch/pytorch#135712). A restarted rank can then read the DEAD attempt's gloo/nccl addresses of a
peer that has not re-published yet and fail with "Connection refused" (seen on a loaded host whenever
one rank of the new attempt starts late). :func:`attempt_store` gives each attempt its own key space
on that shared store.

Single node: the prefix is the attempt number ``TORCHELASTIC_RESTART_COUNT`` (all local ranks of an
attempt share it). Several nodes: agents count restarts independently (a node restarted for a
membership change does not count), so no shared attempt number exists; there the store is left as
torch makes it and a restart logs a warning naming ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which
gives every attempt a fresh store (the project's TorchX components set it).
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Optional

import torch.distributed as dist

logger = logging.getLogger(__name__)

OPT_OUT = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def attempt_store(timeout: datetime.timedelta) -> Optional[dist.Store]:
    """A store for ``init_process_group(store=...)`` private to this restart attempt, or None where
    torch's own env:// store is already private to it (no torchrun, an unshared agent store, or
    several nodes, see the module doc)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in env:
        return None
    attempt = int(env["TORCHELASTIC_RESTART_COUNT"])
    world, local_world = int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    if world != local_world:
        if attempt > 0:
            logger.warning(
                "torchrun restart %d on %d nodes shares the rendezvous store with the failed attempt; "
                "if the group does not form ('Connection refused'), launch with %s=1",
                attempt, world // max(1, local_world), OPT_OUT,
            )
        return None
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"pinfm/attempt_{attempt}", base)
