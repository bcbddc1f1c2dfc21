"""Test-session setup.

Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it first
(the model imports the DCAT op), so without a GPU the interpreter is switched on here, before
collection imports anything. With CUDA the kernels run compiled: test modules must not set
TRITON_INTERPRET themselves; they take the device from the ``kernel_device`` fixture.
"""
import os

import pytest

try:  # torch is imported anyway by every test module
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_index():
    """Triton releases before 3.7 convert an interpreted scalar (a 1-element numpy array) to a
    Python int with ``int(array)``, e.g. for ``range(n)`` over a loaded bound; numpy 2.5 made
    that a TypeError ("only 0-dimensional arrays can be converted to Python scalars"). Give
    those releases the later ``int(array.squeeze())``; newer ones already do that."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_pinfm_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._pinfm_patched = True
    interpreter._patch_lang_tensor = patched


_patch_interpreter_index()


def xdist_cpu_share(env=os.environ, cpus=None):
    """CPUs per pytest-xdist worker (None outside xdist): the host's CPUs split evenly between
    the workers. By default every worker's torch used every CPU: on a 16-core GPU host with 16
    workers, 256 intra-op threads made the CPU-bound tests thrash (gpu-suite.md run 7: an
    in-process fine-tune fixture took 362 s there)."""
    if not env.get("PYTEST_XDIST_WORKER") or not env.get("PYTEST_XDIST_WORKER_COUNT"):
        return None
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // max(1, int(env["PYTEST_XDIST_WORKER_COUNT"])))


_SHARE = xdist_cpu_share()
if _SHARE is not None:
    os.environ.setdefault("OMP_NUM_THREADS", str(_SHARE))  # for the processes tests start
    torch.set_num_threads(min(torch.get_num_threads(), _SHARE))


@pytest.fixture
def kernel_device() -> torch.device:
    """Where a kernel test runs: CUDA when present (compiled kernels), else the CPU (the
    Triton interpreter)."""
    return torch.device("cuda" if _has_cuda else "cpu")
