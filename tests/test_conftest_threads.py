"""tests/conftest.py: pytest-xdist workers share the host's CPUs instead of each taking all."""

import os

import torch
from conftest import xdist_cpu_share


def test_cpu_share_splits_the_host_between_workers():
    assert xdist_cpu_share({}, cpus=16) is None  # one process: torch's default stays
    env = {"PYTEST_XDIST_WORKER": "gw3", "PYTEST_XDIST_WORKER_COUNT": "16"}
    assert xdist_cpu_share(env, cpus=16) == 1
    assert xdist_cpu_share(dict(env, PYTEST_XDIST_WORKER_COUNT="4"), cpus=16) == 4
    assert xdist_cpu_share(dict(env, PYTEST_XDIST_WORKER_COUNT="32"), cpus=16) == 1


def test_this_worker_uses_its_share():
    share = xdist_cpu_share()
    if share is not None:  # under xdist: torch keeps to the share, and so do processes tests start
        assert torch.get_num_threads() <= share and os.environ.get("OMP_NUM_THREADS")
