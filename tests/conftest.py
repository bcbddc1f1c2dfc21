"""Test-session setup.

Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it first
(the model imports the DCAT op), so without a GPU the interpreter is switched on here, before
collection imports anything.
"""
import os

try:  # torch is imported anyway by every test module
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
