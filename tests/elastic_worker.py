"""A torchrun worker for tests/test_elastic_store.py: join the group through pinfm_rec's
init_distributed, all-reduce, then in attempt 0 rank 1 dies; in attempt 1 rank 1 starts late."""
import os
import sys
import time

import torch
import torch.distributed as dist

from pinfm_rec.parallel import ParallelSpec, init_distributed

attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank = int(os.environ["RANK"])
if attempt == 1 and rank == int(os.environ.get("LATE_RANK", "1")):
    time.sleep(float(os.environ.get("LATE_S", "4")))  # rank 0 reaches the store first
env = init_distributed(ParallelSpec(backend="gloo", timeout_s=30), force_cpu=True)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"attempt {attempt} rank {rank} sum {t.item():.0f}", flush=True)
if attempt == 0:
    dist.barrier()
    if rank == 1:
        os._exit(3)  # a rank dies; torchrun restarts the attempt
    time.sleep(30)  # rank 0 is killed by the agent
dist.barrier()
dist.destroy_process_group()
sys.exit(0)
