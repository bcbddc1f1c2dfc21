"""Helpers for tests that spawn a gloo world of CPU processes (torch.multiprocessing.spawn)."""
import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_world(rank: int, port: int, world: int, **parallel_kw):
    """In a spawned process: join a ``world``-rank gloo group on localhost:``port`` (one thread per
    rank). Returns (ParallelSpec(backend=gloo, timeout 120 s, **parallel_kw), DistEnv)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from pinfm_rec.parallel import ParallelSpec, init_distributed

    pspec = ParallelSpec(backend="gloo", timeout_s=120, **parallel_kw)
    env = init_distributed(pspec, force_cpu=True)
    assert env.world_size == world and env.rank == rank
    return pspec, env
